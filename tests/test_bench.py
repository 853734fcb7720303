"""Every standalone benchmark (no Prefect server) runs end to end in --quick mode; its output's content
is checked (tests/bench_output.py says what is asserted). Marked slow: each is a child process."""

from __future__ import annotations

import ast
import re

import pytest

from tests.bench_output import ROUNDING, Ratio, figure, is_cosine, quotient_of, ratios, run_bench, verdict_is_the_goal

pytestmark = pytest.mark.slow
# the benchmarks that run without a Prefect server
STANDALONE = ["extraction_vs_timm_loop", "large_jpeg_decode", "precision_bf16", "incremental", "memory_flat",
              "head_training", "predictor_latency", "near_duplicates"]


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
    stacked = re.findall(r"^  C: 6 MLP heads, (\d+) x \d+, \d+ epochs, best of 2: separate ([\d.]+) s, "
                         r"stacked ([\d.]+) s, per-tensor ([\d.]+) s$", out, re.M)
    assert len(stacked) == 2, out  # at A's train size and at the grid's row cap
    for rows, separate, one_module, per_tensor in stacked:
        quotient_of(found[f"C: stacked / separate at {rows} rows"], float(one_module), float(separate), decimals=2)
        quotient_of(found[f"C: separate, per-tensor AdamW / fused at {rows} rows"], float(per_tensor),
                    float(separate), decimals=2)
    (cv,) = re.findall(r"^  D: C cross-validation, \d+ x \d+, 5 folds x 7 C, best of 3: batched ([\d.]+) s "
                       r"\(max \|p - optimum\| ([\d.e+-]+)\), scikit-learn ([\d.]+) s \(max \|p - optimum\| "
                       r"([\d.e+-]+)\)$", out, re.M)
    assert float(cv[1]) < 5e-3  # the batched solver's fits are the optimum to its tolerance
    quotient_of(found["D: scikit-learn one at a time / batched"], float(cv[2]), float(cv[0]), decimals=2)


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
