"""The benchmarks that run the flow (a Prefect server, MLflow, the demo) in --quick mode, in their own
file so that the test workers share them out; tests/bench_output.py says what is asserted."""

from __future__ import annotations

import pytest

from tests.bench_output import check_warm_over_cold, figure, ratios, run_bench

pytestmark = pytest.mark.slow


def test_cached_rerun_bench_quick_mode(tmp_path):
    out = run_bench("cached_rerun", tmp_path)
    check_warm_over_cold(out, ratios(out), cold="cold run", warm=["warm run", "warm again run"], goal="<= 5%")
    assert figure(out, r"^  cold run: [\d.]+ s, (\d+) images embedded") > 0


@pytest.mark.slow
def test_startup_bench_quick_mode(tmp_path):
    out = run_bench("startup", tmp_path, timeout=1200)
    check_warm_over_cold(out, ratios(out), cold=r"cold run \(empty home\)", warm=["warm run", "warm run again"],
                         goal="<= 10%")
    assert "warm run: where the time goes:" in out
