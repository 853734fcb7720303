"""The quality and GPU benchmarks in --quick mode (a flow on demo images; a plain line without CUDA);
tests/bench_output.py says what is asserted."""

from __future__ import annotations

import re

import pytest

from tests.bench_output import quotient_of, ratios, run_bench

pytestmark = pytest.mark.slow


def test_gpu_bench_says_plainly_when_there_is_no_cuda(tmp_path):
    out = run_bench("gpu", tmp_path)
    import torch

    if torch.cuda.is_available():
        for name, r in ratios(out).items():
            assert name.startswith("fraction of bf16 peak") and r.unit == "%" and 0 < r.value <= 100, (name, r)
    else:
        assert "no CUDA device" in out and "ratio:" not in out


def test_real_data_quality_bench_scores_the_head_next_to_both_baselines(tmp_path):
    """--demo needs no Fashion-MNIST package: the flow on demo images, then one resplit."""
    out = run_bench("real_data_quality", tmp_path, args=("--demo",))
    table = {}
    for model in ("head", "logistic", "knn"):
        row = re.search(rf"^  {model} +(0?\.\d{{4}}|1\.0000) +(-?[01]\.\d{{4}}) +([01]\.\d{{4}})", out, re.M)
        assert row, out
        table[model] = {"accuracy_at_0.5": float(row[1]), "mcc_at_0.5": float(row[2]), "auroc": float(row[3])}
        assert 0 <= table[model]["accuracy_at_0.5"] <= 1 and 0 <= table[model]["auroc"] <= 1
    found = ratios(out)
    for key in ("accuracy_at_0.5", "mcc_at_0.5"):
        ((name, r),) = [(n, r) for n, r in found.items() if n.startswith("head / best baseline (") and n.endswith(key)]
        baseline = re.match(r"head / best baseline \((logistic|knn)\)", name)[1]
        assert r.goal == ">= 1.0"
        quotient_of(r, table["head"][key], table[baseline][key], decimals=4)
        if table["head"][key] != table[baseline][key]:  # printed to 4 places: equal ones cannot tell
            assert r.met == (table["head"][key] > table[baseline][key])
    assert re.search(r"^  split resplit-0: \d+ test, head (linear|mlp)/\w+: acc [01]\.\d{4}", out, re.M), out
    assert "mean head / mean best baseline test mcc over 1 other splits" in found
