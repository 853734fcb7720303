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
    # --quick runs the command twice (cold, warm): a third run is a minute of CPU on a loaded 2-core machine
    check_warm_over_cold(out, ratios(out), cold=r"cold run \(empty home\)", warm=["warm run"], goal="<= 10%")
    assert "warm run again" not in out
    assert "warm run: where the time goes:" in out


def test_scale_out_bench_quick_mode(tmp_path):
    """bench/scale_out.py: one process vs chunks on two Dask workers (a Prefect server, a LocalCluster)."""
    from tests.bench_output import quotient_of, verdict_is_the_goal

    out = run_bench("scale_out", tmp_path)
    found = ratios(out)
    one = figure(out, r"^  one process: ([\d.]+) s")
    warm = figure(out, r"^  two workers, started cluster: ([\d.]+) s")
    total = figure(out, r"^  two workers: ([\d.]+) s")
    speedup = found["speed-up two workers / one process"]
    assert speedup.unit == "x" and speedup.goal == ">= 1.6x"
    verdict_is_the_goal(speedup)
    quotient_of(speedup, one, warm, decimals=2)
    quotient_of(found["speed-up two workers / one process, cluster start included"], one, total, decimals=2)
    efficiency = found["parallel efficiency"]
    assert efficiency.goal == ">= 0.8" and efficiency.value == pytest.approx(speedup.value / 2, abs=0.002)
    verdict_is_the_goal(efficiency)
    overhead = found["engine overhead per chunk / chunk compute"]
    assert overhead.unit == "%" and overhead.goal == "<= 5%"
    verdict_is_the_goal(overhead)
    assert "features bit-identical to one process: True" in out
    assert figure(out, r"^  chunks: \d+ of <= \d+ images on (\d+) worker processes") == 2
    assert figure(out, r"^  backbone builds: (\d+) ") == 2  # one per worker process, not one per chunk
    assert figure(out, r"^  smallest chunk with overhead <= 5%: (\d+) images") > 0
