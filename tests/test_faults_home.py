"""The `stage1` command and its $STAGE1_HOME: a home that does not exist yet (created first; the run,
its quarantine report and a fully cached rerun), a poisoned working directory, a read-only home, a full
disk before and during a run. docs/reliability.md maps each fault to its test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.common import HANG_TIMEOUT_S
from tests.faults import (
    cli_env,
    encode,
    mlflow_db,
    params_file,
    photo,
    prefect_db,
    query,
    run_stage1,
    text,
    write,
)


@pytest.fixture(scope="module")
def tiny_with_a_broken_image(tiny_demo, tmp_path_factory) -> Path:
    """The tiny demo data plus one undecodable image (1 of 121 rows: under the 1% quarantine limit)."""
    data = tmp_path_factory.mktemp("tiny-broken") / "data"
    shutil.copytree(tiny_demo, data)
    write(data / "roadwork" / "zz-broken.jpg", encode(photo(64, 64, seed=9), "JPEG")[:700])
    return data


@pytest.fixture(scope="module")
def fresh_home_runs(tiny_with_a_broken_image, tmp_path_factory):
    """Rows 2, 9, 11 and 13 in two commands: `stage1 train` on a home that does not exist yet, with
    MLFLOW_TRACKING_URI set, from a working directory holding a poisoned `inspect.py`; then the same
    command again (everything cached)."""
    tmp = tmp_path_factory.mktemp("fresh-home")
    home = tmp / "not" / "there" / "yet"
    cwd = tmp / "cwd"
    cwd.mkdir()
    marker = tmp / "shadowed"
    (cwd / "inspect.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nraise ImportError('shadow')\n")
    params = params_file(tmp, tiny_with_a_broken_image, "stage1-faults")
    env = cli_env(home, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'tracking.db'}")
    first = run_stage1(["train", "--params", str(params)], env, cwd)
    second = run_stage1(["train", "--params", str(params)], env, cwd)
    return {"home": home, "tmp": tmp, "marker": marker, "first": first, "second": second}


@pytest.mark.slow
def test_a_new_home_is_created_first_whatever_else_is_set(fresh_home_runs):
    out, err = text(fresh_home_runs["first"])
    assert fresh_home_runs["first"].returncode == 0, out[-3000:] + err[-5000:]
    for sub in ("prefect", "mlflow", "reports", "runs", "locks"):
        assert (fresh_home_runs["home"] / sub).is_dir()
    assert "Traceback" not in out + err and "Failed to create the Prefect home" not in out + err
    assert "model version: stage1-faults v1 (alias @challenger)" in out


@pytest.mark.slow
def test_no_child_process_imports_from_the_working_directory(fresh_home_runs):
    assert fresh_home_runs["first"].returncode == 0
    assert not fresh_home_runs["marker"].exists(), "a process imported inspect.py from the working directory"


@pytest.mark.slow
def test_the_run_reports_its_quarantine_in_the_summary_prefect_and_mlflow(fresh_home_runs):
    from mlflow.tracking import MlflowClient

    out, err = text(fresh_home_runs["first"])
    assert fresh_home_runs["first"].returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("quarantine:"))
    assert "quarantine: 1 of 121 images left out (0 unreadable, 1 undecodable), listed in " in line
    report = Path(line.rsplit(" listed in ", 1)[1])
    assert report.parent == fresh_home_runs["home"] / "reports"
    doc = json.loads(report.read_text())
    assert doc["counts"]["decode"] == 1 and doc["entries"][0]["locator"].endswith("zz-broken.jpg")
    run_id = next(x for x in out.splitlines() if x.startswith("MLflow run:")).split()[2]
    client = MlflowClient(tracking_uri=f"sqlite:///{fresh_home_runs['tmp'] / 'tracking.db'}")
    run = client.get_run(run_id)
    assert run.data.metrics["quarantine/decode"] == 1 and run.data.tags["quarantine.report"] == str(report)
    assert any(a.path.endswith(report.name) for a in client.list_artifacts(run_id, "quarantine"))
    summaries = query(prefect_db(fresh_home_runs["home"]), "select data from artifact where key = 'run-summary'")
    assert any(str(report) in row[0] for row in summaries)
    # the second run writes its own report, under its own name
    line2 = next(x for x in text(fresh_home_runs["second"])[0].splitlines() if x.startswith("quarantine:"))
    assert line2.rsplit(" listed in ", 1)[1] != str(report)


@pytest.mark.slow
def test_a_fully_cached_rerun_says_nothing_was_embedded(fresh_home_runs):
    out, err = text(fresh_home_runs["second"])
    assert fresh_home_runs["second"].returncode == 0, err[-3000:]
    assert "features: 0 embedded now, 120 from cache" in out
    assert "features: 120 embedded now, 0 from cache" in text(fresh_home_runs["first"])[0]
    assert "model version: stage1-faults v1 (alias @challenger)" in out  # no duplicate version


def _read_only(path: Path):
    """Make `path` read-only for the stage1 process: a read-only bind mount when root (root ignores
    permissions), else mode 0555."""
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0 or \
                subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a read-only mount here")
        return lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True)
    path.chmod(0o555)
    return lambda: path.chmod(0o755)


@pytest.mark.parametrize("filled", [False, True])
def test_a_read_only_home_is_one_clear_error_and_help_still_works(tmp_path, tiny_demo, filled):
    home = tmp_path / "home"
    home.mkdir()
    if filled:
        for sub in ("prefect", "mlflow"):
            (home / sub).mkdir()
        (home / "prefect" / "prefect.db").write_bytes(b"")
    undo = _read_only(home)
    try:
        env = cli_env(home)
        help_ = run_stage1(["--help"], env, tmp_path, timeout=HANG_TIMEOUT_S)
        assert help_.returncode == 0 and b"usage: stage1" in help_.stdout, help_.stderr[-2000:]
        started = time.monotonic()
        proc = run_stage1(["train", "--source", str(tiny_demo)], env, tmp_path, timeout=HANG_TIMEOUT_S)
        out, err = text(proc)
        assert proc.returncode == 2, out + err
        assert f"stage1: error: {home}" in err and "is read-only" in err and "STAGE1_HOME" in err
        assert "Traceback" not in out + err and err.count("\n") == 1
        assert time.monotonic() - started < 60
    finally:
        undo()


def _tmpfs(path: Path, size: str):
    """Mount a small tmpfs at `path` (root only; skipped elsewhere). Returns the unmount function."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a full disk is simulated with a small tmpfs, which needs root and mount")
    return lambda: subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_home_is_one_clear_error_before_any_server_starts(tmp_path, tiny_demo):
    home = tmp_path / "home"
    undo = _tmpfs(home, "2m")
    try:
        with open(home / "filler", "wb") as fh:
            with pytest.raises(OSError):
                while True:
                    fh.write(b"\0" * 65536)
        proc = run_stage1(["train", "--source", str(tiny_demo)], cli_env(home), tmp_path, timeout=HANG_TIMEOUT_S)
        out, err = text(proc)
        assert proc.returncode == 2, out + err
        assert "stage1: error:" in err and str(home) in err and ("no space left" in err or "MB free" in err)
        assert "Traceback" not in out + err and err.count("\n") == 1
        assert not (home / "prefect" / "prefect.db").exists()
    finally:
        undo()


@pytest.mark.slow
def test_a_disk_that_fills_during_a_run_fails_it_cleanly_and_the_rerun_completes(tmp_path, tiny_demo):
    home = tmp_path / "home"
    params = params_file(tmp_path, tiny_demo, "stage1-full")
    env = cli_env(home)
    undo = _tmpfs(home / "evaluations", "16k")  # metrics, plots and predictions land here: ENOSPC mid-run
    try:
        proc = run_stage1(["train", "--params", str(params)], env, tmp_path)
        out, err = text(proc)
    finally:
        undo()
    assert proc.returncode == 2, out[-3000:] + err[-3000:]
    assert f"stage1: error: no space left on the device of {home}" in err
    assert "Traceback" not in out + err
    assert query(prefect_db(home), "select state_type from flow_run") == [("FAILED",)]
    assert query(mlflow_db(home), "select status from runs") == [("FAILED",)]
    again = run_stage1(["train", "--params", str(params)], env, tmp_path)
    out, err = text(again)
    assert again.returncode == 0, out[-3000:] + err[-3000:]
    assert "features: 0 embedded now" in out  # nothing computed before the fault was lost
