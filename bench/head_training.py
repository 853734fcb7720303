"""Benchmark 7: head training on cached features against extracting those features.

Head: `fit_head` (the product's loop: AdamW, cosine schedule, EMA, class weights) on N = 100,000 x 768
fp16 features (synthetic, two shifted Gaussians), 20 epochs with early stopping off, plus a 10,000-row
val split. Extraction: the product's `extract_features` with the ViT-S/16 DINOv3 architecture (random
init, cls+avg pooling = 768-d) on demo images; its measured images/s is extrapolated to N (not run on N
images: that would take hours here). Goal: head training is a small fraction of extraction.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c


def main() -> None:
    def options(p):
        p.add_argument("--n", type=int, default=100_000)
        p.add_argument("--epochs", type=int, default=20)
        p.add_argument("--images", type=int, default=64, help="images actually embedded to measure images/s")

    args = c.parse_args(__doc__, repeats=1, configure=options)
    c.header("7. head training on cached features vs extraction for the same N", args)
    import numpy as np

    from stage1core.features import FeatureConfig, extract_features
    from stage1core.train import TrainConfig, fit_head

    n, epochs, n_images = (2_000, 2, 4) if args.quick else (args.n, args.epochs, args.images)
    dim = 768
    rng = np.random.default_rng(0)

    def make(count):
        y = rng.integers(0, 2, count)
        x = rng.standard_normal((count, dim), dtype=np.float32) + 0.3 * y[:, None] * rng.standard_normal(dim) ** 2
        return x.astype(np.float16), y

    (xt, yt), (xv, yv) = make(n), make(max(n // 10, 100))
    config = TrainConfig(epochs=epochs, patience=epochs)
    train_s, trained = c.timed(lambda: fit_head(xt.astype(np.float32), yt, xv.astype(np.float32), yv, config=config))
    c.figure("head training", f"{train_s:.1f} s for {n} x {dim} fp16 features, {len(trained.history)} epochs "
             f"(batch {config.batch_size}, MLP head), val accuracy {trained.history[-1]['val_accuracy']:.3f}")

    samples = c.load_samples(c.demo_data(24, n_large=0) if args.quick else c.demo_data(600))[:n_images]
    backbone = c.vit_small_backbone(pooling="cls+avg", tiny=args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="bench-head-"))
    info = extract_features(samples, backbone, FeatureConfig(batch_size=32, num_workers=2), store_root=tmp,
                            progress=False)
    assert args.quick or info.dim == dim, info.dim
    extract_s = n / info.images_per_second
    c.figure("extraction (measured)", f"{info.images_per_second:.2f} images/s over {info.n_computed} demo images, "
             f"ViT-S/16 DINOv3 architecture, 224 px, fp32, CPU")
    c.figure("extraction for N (extrapolated)", f"{extract_s:.0f} s = {extract_s / 3600:.1f} h for {n} images")
    c.ratio_line("head training / extraction time for the same N", train_s / extract_s * 100, unit="%",
                 goal="small fraction (< 5%)", met=train_s / extract_s < 0.05)


if __name__ == "__main__":
    main()
