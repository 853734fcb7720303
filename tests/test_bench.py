"""Every benchmark runs end to end in --quick mode and prints a machine line and its ratio lines.

No timing goal is asserted: the figures of a --quick run mean nothing. What is asserted is the output's
content: each ratio line parses, its number is finite and in a sane range, it is the quotient of the
figures printed above it (to their printed precision), and its MET / NOT MET verdict agrees with its goal.
Each run is a child process of 5 to 60 seconds (the flow benchmark starts Prefect's ephemeral server), so
the whole module is marked slow.
"""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.common import HANG_TIMEOUT_S

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# the benchmarks that run without a Prefect server
STANDALONE = ["extraction_vs_timm_loop", "large_jpeg_decode", "precision_bf16", "incremental", "memory_flat",
              "head_training", "predictor_latency", "near_duplicates"]
# bench/_common.py ratio_line: "ratio: <name> = <value, 3 decimals><unit>[ (goal <goal>) MET|NOT MET]"
RATIO = re.compile(r"^ratio: (?P<name>.+?) = (?P<value>-?\d+\.\d{3}|-?nan|-?inf)(?P<unit>%|x)?"
                   r"(?: \(goal (?P<goal>.+)\) (?P<verdict>MET|NOT MET))?$", re.M)
GOAL = re.compile(r"(<=|>=|<|>) ?(\d+(?:\.\d+)?)")
ROUNDING = 0.0005  # half the last printed digit of a ratio


@dataclass(frozen=True)
class Ratio:
    value: float
    unit: str
    goal: str | None
    met: bool | None

    def goal_holds(self) -> bool | None:
        """Whether the value meets the goal's bound; None when the printed value is too close to tell."""
        op, bound = GOAL.search(self.goal).groups()
        bound = float(bound)
        if abs(self.value - bound) <= ROUNDING:
            return None
        return {"<=": self.value <= bound, "<": self.value < bound, ">=": self.value >= bound,
                ">": self.value > bound}[op]


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


def ratios(out: str) -> dict[str, Ratio]:
    """Every ratio line of `out` by name, each checked: finite, non-negative, a verdict iff a goal, and a
    verdict that agrees with the goal (a MET always meets the goal's bound)."""
    found = {m["name"]: Ratio(float(m["value"]), m["unit"] or "", m["goal"],
                              None if m["verdict"] is None else m["verdict"] == "MET") for m in RATIO.finditer(out)}
    assert found and len(found) == len(re.findall(r"^ratio: ", out, re.M)), out  # every ratio line parses
    for name, r in found.items():
        assert math.isfinite(r.value) and r.value >= 0, (name, r)
        assert r.unit in ("%", "x", ""), (name, r)
        assert (r.goal is None) == (r.met is None), (name, r)
        if r.met:
            assert r.goal_holds() in (True, None), (name, r)
    return found


def verdict_is_the_goal(r: Ratio) -> None:
    """For a ratio whose verdict weighs nothing but its own value: MET exactly when the goal holds."""
    assert r.goal_holds() in (r.met, None), r


def figure(out: str, pattern: str) -> float:
    """The one number a figure line's `pattern` (a regex with one group) captures."""
    (value,) = re.findall(pattern, out, re.M)
    return float(value)


def quotient_of(r: Ratio, num: float, den: float, *, decimals: int, scale: float = 1.0) -> None:
    """`r` is num / den (times `scale`), num and den printed to `decimals` places: it lies within the
    quotient's range over their rounding, and its own."""
    h = 0.5 * 10 ** -decimals
    low, high = scale * max(num - h, 0) / (den + h), scale * (num + h) / max(den - h, 1e-12)
    assert low - ROUNDING <= r.value <= high + ROUNDING, (r, num, den, low, high)


def is_cosine(r: Ratio) -> None:
    assert r.unit == "" and 0.9 <= r.value <= 1.0, r  # the same images through two paths: nearly parallel


def check_extraction_vs_timm_loop(out: str, found: dict[str, Ratio]) -> None:
    plain = figure(out, r"^  plain timm loop \(pre-decoded\): ([\d.]+) images/s")
    product = figure(out, r"^  product extract_features: ([\d.]+) images/s")
    r = found["product / plain loop images/s"]
    assert r.unit == "x" and r.goal == ">= 0.9x"
    verdict_is_the_goal(r)
    quotient_of(r, product, plain, decimals=1)


def check_large_jpeg_decode(out: str, found: dict[str, Ratio]) -> None:
    naive = figure(out, r"^  naive decode\+transform: ([\d.]+) ms/image")
    draft = figure(out, r"^  draft decode\+transform: ([\d.]+) ms/image")
    r = found["naive / draft decode time"]
    assert r.goal == ">= 4x"
    verdict_is_the_goal(r)
    quotient_of(r, naive, draft, decimals=1)
    cosine = found["feature cosine (min over images)"]
    is_cosine(cosine)
    assert cosine.value == pytest.approx(figure(out, r"^  feature cosine naive vs draft: min ([\d.]+)"), abs=6e-4)


def check_precision_bf16(out: str, found: dict[str, Ratio]) -> None:
    models = re.findall(r"^(\w+) \(.+\): \d+ images, batch", out, re.M)
    fp32 = [float(v) for v in re.findall(r"^  fp32: ([\d.]+) images/s", out, re.M)]
    bf16 = [float(v) for v in re.findall(r"^  bf16 autocast: ([\d.]+) images/s", out, re.M)]
    assert models == ["tf_efficientnet_lite0", "vit_small_patch16_dinov3"] and len(fp32) == len(bf16) == 2, out
    for model, f, b in zip(models, fp32, bf16, strict=True):
        quotient_of(found[f"bf16 / fp32 images/s, {model}"], b, f, decimals=1)
        is_cosine(found[f"min feature cosine, {model}"])
    delta = ast.literal_eval(re.search(r"^  bf16 - fp32 test metrics: (\{.*\})$", out, re.M)[1])
    r = found["|delta test accuracy| bf16 vs fp32"]
    assert r.value == pytest.approx(abs(delta["accuracy"]), abs=ROUNDING) and r.value <= 1
    # the verdict also asks every feature cosine to be >= 0.99
    cosines_ok = all(found[f"min feature cosine, {m}"].value >= 0.99 for m in models)
    if r.goal_holds() is not None:
        assert r.met == (r.goal_holds() and cosines_ok), (r, cosines_ok)
    assert ("and within the tolerance" in out) == r.met


def check_incremental(out: str, found: dict[str, Ratio]) -> None:
    new = figure(out, r"^\d+ demo images, (\d+) new")
    full = figure(out, r"^  full extraction: ([\d.]+) s")
    inc = figure(out, r"^  incremental run: ([\d.]+) s")
    assert figure(out, r"^  incremental run: .*, embedded (\d+) images") == new > 0  # only the new ones
    r = found["incremental / full wall time"]
    assert r.unit == "%" and r.goal == "<= 12%"
    verdict_is_the_goal(r)
    quotient_of(r, inc, full, decimals=2, scale=100)


def check_memory_flat(out: str, found: dict[str, Ratio]) -> None:
    rows = re.findall(r"^  (\d+) images: main (\d+) MiB, largest worker (\d+) MiB", out, re.M)
    (small, main_small, worker_small), (large, main_large, worker_large) = [tuple(map(int, row)) for row in rows]
    assert large > small
    main = found[f"peak RSS main process {large} / {small} images"]
    assert main.goal == "<= 1.2x"
    verdict_is_the_goal(main)
    quotient_of(main, main_large, main_small, decimals=0)
    quotient_of(found[f"peak RSS largest worker {large} / {small} images"], worker_large, worker_small, decimals=0)


def check_head_training(out: str, found: dict[str, Ratio]) -> None:
    extract = figure(out, r"^  A: extraction: ([\d.]+) s")
    grid = figure(out, r"^  A: head selection: ([\d.]+) s")
    one = figure(out, r"^  A: one MLP head \(selection off\): ([\d.]+) s")
    a = found["A: head selection / extraction time, same images"]
    assert a.unit == "%" and a.goal == "small fraction (< 25%)"
    verdict_is_the_goal(a)
    quotient_of(a, grid, extract, decimals=1, scale=100)
    quotient_of(found["A: head selection / one head"], grid, one, decimals=1)
    big = figure(out, r"^  B: head selection: ([\d.]+) s")
    extrapolated = figure(out, r"^  B: extraction for N \(extrapolated\): ([\d.]+) s")
    b = found["B: head selection / extraction time for the same N"]
    assert b.unit == "%" and b.goal == "small fraction (< 10%)"
    verdict_is_the_goal(b)
    quotient_of(b, big, extrapolated, decimals=1 if extrapolated < 1 else 0, scale=100)


def check_predictor_latency(out: str, found: dict[str, Ratio]) -> None:
    labels = re.findall(r"^(\w+) .*: \d+ demo JPEGs", out, re.M)
    rates = re.findall(r"^  throughput at batch \d+: ([\d.]+) images/s \(plain forward of pre-decoded tensors: "
                       r"([\d.]+) images/s\)", out, re.M)
    assert labels and len(labels) == len(rates), out
    for label, (predictor, plain) in zip(labels, rates, strict=True):
        quotient_of(found[f"predictor / plain forward images/s, {label}"], float(predictor), float(plain), decimals=1)
    for p50, p95 in re.findall(r"^  latency, one image per call: p50 ([\d.]+) ms, p95 ([\d.]+) ms", out, re.M):
        assert 0 < float(p50) <= float(p95)


def check_near_duplicates(out: str, found: dict[str, Ratio]) -> None:
    radius, diameter = (int(v) for v in re.search(r"^  defaults: radius (\d+), diameter (\d+)", out, re.M).groups())
    kept = found["demo bursts kept whole at the defaults"]
    assert kept.unit == "%" and kept.goal == ">= 95%" and kept.value <= 100
    verdict_is_the_goal(kept)
    row = rf"^  demo: r=\s*{radius} diameter {diameter}\s*: \d+ groups, largest \d+, bursts kept whole (\d+)%"
    assert kept.value == pytest.approx(figure(out, row), abs=0.5 + ROUNDING)  # the figure is a whole percent
    largest = found["fashion largest group / images at the defaults"]
    assert largest.unit == "%" and largest.goal == "<= 5%" and 0 < largest.value <= 100
    verdict_is_the_goal(largest)
    hashed = figure(out, r"^  fashion: images / hashed / flat / undecodable: \d+ / (\d+) /")
    group = figure(out, rf"^  fashion: r=\s*{radius} diameter {diameter}\s*: \d+ groups, largest (\d+)")
    quotient_of(largest, group, hashed, decimals=0, scale=100)


CHECKS = {name: globals()[f"check_{name}"] for name in STANDALONE}


@pytest.mark.parametrize("name", STANDALONE)
def test_bench_quick_mode_prints_machine_and_ratio(name, tmp_path):
    out = run_bench(name, tmp_path)
    CHECKS[name](out, ratios(out))


def check_warm_over_cold(out: str, found: dict[str, Ratio], *, cold: str, warm: list[str], goal: str) -> None:
    """The warm / cold ratio is the fastest warm run over the cold run, and no warm run embedded anything."""
    seconds = {label: figure(out, rf"^  {label}: ([\d.]+) s") for label in (cold, *warm)}
    r = found["warm / cold wall time"]
    assert r.unit == "%" and r.goal == goal
    verdict_is_the_goal(r)
    quotient_of(r, min(seconds[label] for label in warm), seconds[cold], decimals=2, scale=100)
    for label in warm:
        assert re.search(rf"^  {label}: .*\b0 images embedded", out, re.M), out


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
