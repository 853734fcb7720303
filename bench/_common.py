"""Shared helpers for the benchmarks: machine description, timing, demo data, ratio lines.

Every benchmark measures its baseline in the same run, interleaved with the product's path, and prints
one `ratio:` line per goal; timings on a shared machine are noisy, ratios measured side by side less so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

DATA_ROOT = Path(os.environ.get("STAGE1_BENCH_DATA") or Path(tempfile.gettempdir()) / "stage1-bench-data")


def parse_args(doc: str | None, *, repeats: int = 3, configure: Callable | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved repetitions per side")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    if configure:
        configure(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats = 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def describe_machine() -> dict:
    import numpy
    import PIL
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except OSError:
        isa = []
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "isa": isa,
        "memory_gib": mem_gib, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": numpy.__version__, "pillow": PIL.__version__, "os": platform.platform(terse=True),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }
    print("machine: " + json.dumps(info))
    return info


def fresh_home(home: str | Path | None = None) -> str:
    """$STAGE1_HOME for a benchmark, with no outside Prefect or MLflow settings, configured before prefect
    is imported (the ephemeral Prefect server then lives under it); its path. A new temporary one unless
    `home` is given (created if missing; an earlier run's keeps its feature store and caches)."""
    home = str(home) if home else tempfile.mkdtemp(prefix="bench-stage1-home-")
    Path(home).mkdir(parents=True, exist_ok=True)
    os.environ["STAGE1_HOME"] = home
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME", "PREFECT_RESULTS_LOCAL_STORAGE_PATH"):
        os.environ.pop(key, None)
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    # a loaded machine can take more than Prefect's default 20 s to start the ephemeral server
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    from stage1core.home import configure_environment

    configure_environment()
    return home


def header(title: str, args: argparse.Namespace) -> None:
    print(f"== {title}{' (quick mode: smoke sizes, figures meaningless)' if args.quick else ''} ==")
    describe_machine()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleave(sides: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Run each side `repeats` times, alternating (a b, b a, a b ...), so machine noise hits both."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            seconds, _ = timed(sides[name])
            times[name].append(seconds)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio_line(name: str, value: float, *, goal: str | None = None, met: bool | None = None, unit: str = "x") -> str:
    verdict = "" if met is None else (" MET" if met else " NOT MET")
    line = f"ratio: {name} = {value:.3f}{unit}" + (f" (goal {goal}){verdict}" if goal else "")
    print(line, flush=True)
    return line


def figure(name: str, value, unit: str = "") -> None:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    print(f"  {name}: {text} {unit}".rstrip(), flush=True)


def demo_data(n_images: int, *, seed: int = 0, **fields) -> Path:
    """A procedural demo dataset, generated once per configuration and reused by later runs."""
    from stage1core.demo import DemoConfig, demo_dataset_ready, generate_demo_dataset

    config = DemoConfig(n_images=n_images, seed=seed, **fields)
    tag = hashlib.sha256(json.dumps([n_images, seed, sorted(fields.items())]).encode()).hexdigest()[:12]
    out = DATA_ROOT / f"demo-{n_images}-{tag}"
    if not demo_dataset_ready(out, config):
        print(f"generating {n_images} demo images into {out} (once; reused by later runs)", flush=True)
        generate_demo_dataset(out, config)
    return out


def bench_data(n_images: int, *, quick: bool) -> Path:
    """A benchmark's demo data: `n_images` images, without the large JPEGs in a --quick run."""
    return demo_data(n_images, n_large=0) if quick else demo_data(n_images)


def load_samples(path: Path):
    from stage1core.sources import SourceConfig, load_sources

    return load_sources([SourceConfig(path=str(path), kind="folder")]).samples


def demo_backbone(pooling: str = "avg"):
    from stage1core.backbone import DEMO_PACKAGE_WEIGHTS, BackboneConfig

    return BackboneConfig(name="tf_efficientnet_lite0", weights=DEMO_PACKAGE_WEIGHTS, pooling=pooling)


TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": 32}


def vit_small_backbone(pooling: str = "cls", *, tiny: bool = False):
    """ViT-S/16 DINOv3 architecture, random init (the real weights cannot be downloaded here); `tiny`
    swaps in a 2-layer 32 px model of the same architecture for --quick smoke runs."""
    from stage1core.backbone import RANDOM_WEIGHTS, BackboneConfig

    extra = {"model_kwargs": dict(TINY_VIT), "input_size": 32} if tiny else {}
    return BackboneConfig(name="vit_small_patch16_dinov3", weights=RANDOM_WEIGHTS, pooling=pooling, **extra)


def prepared_backbone(backbone, config=None) -> SimpleNamespace:
    """A backbone built as the product builds it (weights not verified) and its eval preprocessing:
    `spec`, `model`, `pre` (the preprocessing spec), `transform` and `draft` (the JPEG draft size)."""
    from stage1core.backbone import build_backbone, resolve_backbone
    from stage1core.features import FeatureConfig, draft_size, eval_transform, preprocessing_spec

    spec = resolve_backbone(backbone)
    model = build_backbone(spec, verify=False)
    pre = preprocessing_spec(model, spec, config or FeatureConfig())
    return SimpleNamespace(spec=spec, model=model, pre=pre, transform=eval_transform(pre), draft=draft_size(pre))


def decoded_images(prepared: SimpleNamespace, samples):
    """The samples' images decoded and transformed as the product does, stacked in one tensor (beforehand,
    so that a timed loop over them times the model alone)."""
    import torch

    from stage1core.images import decode_image

    return torch.stack([prepared.transform(decode_image(Path(s.locator).read_bytes(), draft_size=prepared.draft))
                        for s in samples])


def cosine_rows(a, b):
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def test_metrics(features_by_id: Callable, samples, *, epochs: int = 30) -> dict[str, float]:
    """Train a linear head on the train split, pick the decision at 0.5, report test accuracy/MCC/AUROC.

    `features_by_id(ids)` returns the features of those sample ids; the split is the product default.
    """
    import numpy as np
    from sklearn.metrics import accuracy_score, matthews_corrcoef, roc_auc_score

    from stage1core.splits import SplitConfig, make_splits
    from stage1core.train import TrainConfig, fit_head, predict_positive

    splits = make_splits(samples, SplitConfig(train=0.6, val=0.1, calib=0.1, test=0.2))

    def xy(name):
        part = splits[name]
        return features_by_id([s.sample_id for s in part]), np.array([s.label for s in part])

    (xt, yt), (xv, yv), (xs, ys) = xy("train"), xy("val"), xy("test")
    trained = fit_head(xt, yt, xv, yv, config=TrainConfig(epochs=epochs, patience=epochs))
    p = predict_positive(trained.model, xs)
    return {"n_test": int(len(ys)), "accuracy": float(accuracy_score(ys, p >= 0.5)),
            "mcc": float(matthews_corrcoef(ys, p >= 0.5)), "auroc": float(roc_auc_score(ys, p))}
