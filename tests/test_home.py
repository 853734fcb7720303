"""The state root: building a path under it touches no file, and importing an entry point sets the
environment (before Prefect is imported) without creating anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stage1core.home import home_path

REPO = Path(__file__).resolve().parent.parent


def test_home_path_builds_a_path_and_creates_it_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGE1_HOME", str(tmp_path / "home"))
    path = home_path("evaluations", "baselines")
    assert path == (tmp_path / "home" / "evaluations" / "baselines").resolve()
    assert not (tmp_path / "home").exists()
    assert home_path("locks", create=True).is_dir()


@pytest.mark.parametrize("module", ["flows", "tasks", "deployments.cli"])
def test_importing_an_entry_point_sets_the_environment_and_touches_no_file(tmp_path, module):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "HF_HUB_")) and k != "STAGE1_HOME"}
    env.update(STAGE1_HOME=str(home), PYTHONPATH=str(REPO))
    script = (f"import importlib, json, os, sys; importlib.import_module({module!r}); "
              "print(json.dumps({'prefect': 'prefect' in sys.modules, 'env': dict(os.environ)}))")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=True)
    seen = json.loads(out.stdout.splitlines()[-1])
    assert not seen["prefect"]  # set before Prefect reads its settings
    assert seen["env"]["PREFECT_HOME"] == str(home.resolve() / "prefect")
    assert seen["env"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{home.resolve() / 'mlflow' / 'mlflow.db'}"
    assert seen["env"]["HF_HUB_OFFLINE"] == "1"
    assert not home.exists()
