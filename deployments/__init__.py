"""Entry points: the `stage1` command line and (later) Prefect deployments and `serve`."""
