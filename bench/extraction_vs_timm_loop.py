"""Benchmark 1: the product's feature extraction against a plain timm loop over pre-decoded tensors.

Product: `extract_features` from image files (decode in DataLoader workers, transform, batch, embed,
write fp16 shards) into a fresh store. Baseline: the minimal loop
`model.forward_head(model.forward_features(x), pre_logits=True)` over tensors decoded beforehand (their
decoding is not timed). Same model, images, batch size, precision and threads. `--backbone demo`
(EfficientNet-Lite0, light compute: decoding is a large share) or `vit-s` (the ViT-S/16 DINOv3
architecture of production, random init).
Goal: product images/s >= 0.9x the plain loop's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c


def main() -> None:
    def configure(p):
        p.add_argument("--images", type=int, default=400)
        p.add_argument("--backbone", choices=["demo", "vit-s"], default="demo")

    args = c.parse_args(__doc__, configure=configure)
    c.header("1. feature extraction: product vs plain timm loop", args)
    import torch

    from stage1core.features import FeatureConfig, extract_features

    n = 24 if args.quick else args.images
    samples = c.load_samples(c.bench_data(n, quick=args.quick))
    from stage1core.backbone import BackboneConfig

    backbone = c.demo_backbone() if args.backbone == "demo" else BackboneConfig(
        name="vit_small_patch16_dinov3", weights="random", pooling="avg")
    config = FeatureConfig(batch_size=32, num_workers=2, precision="fp32", device="cpu")
    prepared = c.prepared_backbone(backbone, config)
    model = prepared.model
    tensors = c.decoded_images(prepared, samples)
    batches = [tensors[i:i + config.batch_size].contiguous(memory_format=torch.channels_last)
               for i in range(0, len(tensors), config.batch_size)]
    print(f"{len(samples)} demo images, {backbone.name}, batch {config.batch_size}, {config.precision}, "
          f"{torch.get_num_threads()} torch threads, {config.num_workers} decode workers")

    def plain_loop():
        with torch.inference_mode():
            for x in batches:
                model.forward_head(model.forward_features(x), pre_logits=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    runs = iter(range(10**6))

    def product():
        info = extract_features(samples, backbone, config, store_root=tmp / str(next(runs)), progress=False)
        assert info.n_computed == len(samples)

    product()  # warm-up: page cache, oneDNN kernels
    plain_loop()
    times = c.interleave({"plain timm loop (pre-decoded)": plain_loop, "product extract_features": product},
                         args.repeats)
    rates = {name: len(samples) / c.median(t) for name, t in times.items()}
    for name, t in times.items():
        c.figure(f"{name}", f"{rates[name]:.1f} images/s (median of {[round(v, 2) for v in t]} s)")
    ratio = rates["product extract_features"] / rates["plain timm loop (pre-decoded)"]
    c.ratio_line("product / plain loop images/s", ratio, goal=">= 0.9x", met=ratio >= 0.9)


if __name__ == "__main__":
    main()
