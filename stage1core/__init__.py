"""stage1core: the ML library of stage1 (data, features, heads, calibration, guarantees, bundles).

It never imports prefect or mlflow; `tasks/` and `flows/` wrap it for orchestration and tracking.
"""

__version__ = "0.1.0"
