"""Test environment: a private $STAGE1_HOME with its own Prefect home and MLflow store, set before
prefect, mlflow or timm are imported; one Prefect test server per session, only for flow tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.mkdtemp(prefix="stage1-test-home-"))
os.environ.update({
    "STAGE1_HOME": str(_HOME),
    "PREFECT_HOME": str(_HOME / "prefect"),
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(_HOME / "prefect" / "results"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "MLFLOW_TRACKING_URI": f"sqlite:///{_HOME / 'mlflow.db'}",
    "HF_HUB_OFFLINE": "1",
    "GIT_PYTHON_REFRESH": "quiet",
})
os.environ.pop("PREFECT_API_URL", None)

TINY_EVA = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32}


@pytest.fixture(scope="session")
def stage1_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A small demo dataset (with a large JPEG, PNGs and EXIF-rotated files), made once per session."""
    from stage1core.demo import DemoConfig, generate_demo_dataset

    out = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(out, DemoConfig(n_images=120, seed=3, n_large=1, png_fraction=0.1, exif_fraction=0.1))
    return out


@pytest.fixture
def tiny_eva_config():
    from stage1core.backbone import BackboneConfig

    return BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling="cls+avg",
                          model_kwargs=dict(TINY_EVA), input_size=32, seed=0)


# CI runs the property tests with a fixed seed (a red CI must be reproducible); locally they explore
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI"):
        _hypothesis_settings.load_profile("ci")
except ImportError:  # hypothesis is a dev dependency
    pass
