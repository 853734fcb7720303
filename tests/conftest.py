"""Test environment: a private $STAGE1_HOME with its own Prefect home and MLflow store, set before
prefect, mlflow or timm are imported; one Prefect test server per session, only for flow tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.common import HANG_TIMEOUT_S, TINY_EVA

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
# One intra-op thread for this process and every child, unless the caller chose (`OMP_NUM_THREADS=2 make
# test` runs threaded, and passes too). The models here are tiny, so a second OpenMP thread costs more than
# it gives, and on a loaded machine every parallel region waits for a descheduled thread: a head fit took
# 9.8 s with 2 threads and 1.6 s with 1 on a busy 2-core machine. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")



# The longest test files first. `make test` hands whole files to three workers (--dist loadfile) in
# collection order, each worker taking the next file when it is free; with the files in alphabetical order
# a long one could start last and run alone on a half-idle machine at the end. Longest first (the classic
# rule for balancing jobs over machines) ends the workers close together. Seconds each took in one run on
# a loaded 2-core machine, in order; a file missing here keeps its alphabetical place after these.
LONGEST_FIRST = (
    "test_operations.py",        # 524 s: five retrains on one module fixture
    "test_bench_runs.py",        # 397 s: flow benchmarks in child processes
    "test_bench.py",             # 356 s
    "test_flow.py",              # 281 s
    "test_servers.py",           # 268 s
    "test_faults_servers.py",    # 212 s
    "test_finetune.py",          # 202 s
    "test_bench_quality.py",     # 179 s
    "test_faults_home.py",       # 177 s
    "test_scale_out.py",         # (new; 111 s alone on an idle machine): a Dask cluster, flows, 2-process fine-tuning
    "test_postgres.py",          # 145 s
    "test_faults_interrupts.py",  # 134 s
    "test_train.py",             # 101 s
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="session")
def stage1_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=HANG_TIMEOUT_S):
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


# Fixtures of the fault tests (tests/test_faults_*.py) that more than one of their modules uses; module
# scope, so each module that asks builds them once.

@pytest.fixture(scope="module")
def tiny_eva_module():
    from stage1core.backbone import BackboneConfig

    return BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling="cls+avg",
                          model_kwargs=dict(TINY_EVA), input_size=32, seed=0)


@pytest.fixture(scope="module")
def crash_samples(tiny_demo):
    """48 small demo images (the 12 MP one left out to keep kills quick), sorted by sample id."""
    from stage1core.sources import SourceConfig, load_sources

    samples = load_sources([SourceConfig(path=str(tiny_demo), kind="folder")]).samples
    return [s for s in samples if os.path.getsize(s.locator) < 500_000][:48]


@pytest.fixture(scope="module")
def reference(crash_samples, tiny_eva_module, tmp_path_factory):
    """The features of `crash_samples` from an uninterrupted extraction in a forked child: what the crash
    tests compare with, and what the bundle tests train their head on."""
    from stage1core.features import FeatureStore, extract_features
    from tests.faults import CRASH_CFG, run_child

    root = tmp_path_factory.mktemp("reference")
    # warm up here, so forked children inherit timm's lazy imports instead of paying seconds each
    extract_features(crash_samples[:1], tiny_eva_module, CRASH_CFG, store_root=root / "warm", progress=False)
    info = run_child(crash_samples, tiny_eva_module, root, root, "ref")
    ids = sorted(s.sample_id for s in crash_samples)
    return {"info": info, "features": FeatureStore(info["store_dir"]).load(ids), "ids": ids}


@pytest.fixture
def keep_mlflow_tracking_uri():
    """tasks.tracking.client() sets MLflow's process-wide tracking URI; put back the session's."""
    import mlflow

    saved = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(saved)


# Property tests: no wall-clock checks (hypothesis's per-example deadline and its too_slow health check
# time the example generation, which a loaded machine slows down without anything being wrong; a test
# that sets suppress_health_check itself lists too_slow again). CI runs them with a fixed seed (a red CI
# must be reproducible); locally they explore.
try:
    from hypothesis import HealthCheck as _HealthCheck
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile(
        "stage1", deadline=None, suppress_health_check=[_HealthCheck.too_slow])
    _hypothesis_settings.register_profile("ci", parent=_hypothesis_settings.get_profile("stage1"),
                                          derandomize=True, print_blob=True)
    _hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "stage1")
except ImportError:  # hypothesis is a dev dependency
    pass
