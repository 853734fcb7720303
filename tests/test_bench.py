"""Every benchmark runs end to end in --quick mode and prints a machine line and a ratio line.

No timing is asserted: the figures of a --quick run mean nothing. Each run is a child process of 5 to 60
seconds (the flow benchmark starts Prefect's ephemeral server), so the whole module is marked slow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.common import HANG_TIMEOUT_S

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# the benchmarks that run without a Prefect server
STANDALONE = ["extraction_vs_timm_loop", "large_jpeg_decode", "precision_bf16", "incremental", "memory_flat",
              "head_training", "predictor_latency", "near_duplicates"]


def run_bench(name: str, tmp_path: Path, timeout: float = HANG_TIMEOUT_S, args: tuple[str, ...] = ()) -> str:
    env = {**os.environ, "STAGE1_BENCH_DATA": str(tmp_path.parent / "bench-data")}
    # a bench is a script run from a shell, which imports its helpers (bench/_common.py) from its own
    # folder; the test session's environment carries stage1's PYTHONSAFEPATH=1 (stage1core.home), which
    # is meant for stage1's own children and would drop that folder from the path
    env.pop("PYTHONSAFEPATH", None)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert re.search(r'^machine: \{.*"cores"', proc.stdout, re.M), proc.stdout
    return proc.stdout


@pytest.mark.parametrize("name", STANDALONE)
def test_bench_quick_mode_prints_machine_and_ratio(name, tmp_path):
    out = run_bench(name, tmp_path)
    ratios = re.findall(r"^ratio: .+ = (-?[\d.]+|nan)", out, re.M)
    assert ratios, out


def test_cached_rerun_bench_quick_mode(tmp_path):
    out = run_bench("cached_rerun", tmp_path)
    assert re.search(r"^ratio: warm / cold wall time = [\d.]+%", out, re.M), out
    assert "cold run:" in out and "warm run:" in out


@pytest.mark.slow
def test_startup_bench_quick_mode(tmp_path):
    out = run_bench("startup", tmp_path, timeout=1200)
    assert re.search(r"^ratio: warm / cold wall time = [\d.]+%", out, re.M), out
    assert "cold run (empty home):" in out and "warm run: where the time goes:" in out


def test_gpu_bench_says_plainly_when_there_is_no_cuda(tmp_path):
    out = run_bench("gpu", tmp_path)
    import torch

    if torch.cuda.is_available():
        assert re.search(r"^ratio: fraction of bf16 peak", out, re.M), out
    else:
        assert "no CUDA device" in out


def test_real_data_quality_bench_scores_the_head_next_to_both_baselines(tmp_path):
    """--demo needs no Fashion-MNIST package: the flow on demo images, then one resplit."""
    out = run_bench("real_data_quality", tmp_path, args=("--demo",))
    for model in ("head", "logistic", "knn"):
        assert re.search(rf"^  {model} +0?\.\d{{4}} +-?[01]\.\d{{4}} +[01]\.\d{{4}}", out, re.M), out
    assert re.search(r"^ratio: head / best baseline \((logistic|knn)\) test accuracy_at_0.5 = [\d.]+x", out, re.M), out
    assert re.search(r"^  split resplit-0: \d+ test, head (linear|mlp)/\w+: acc [01]\.\d{4}", out, re.M), out
    assert re.search(r"^ratio: mean head / mean best baseline test mcc over 1 other splits = [\d.]+x", out, re.M), out
