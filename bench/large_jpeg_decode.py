"""Benchmark 2: decoding 4032x3024 JPEGs to the model's 224 px input, naive against the product.

Naive: PIL open, full decode, EXIF transpose, convert to RGB, then the eval transform (resize + crop).
Product: `decode_image(..., draft_size=...)`, which asks libjpeg for a DCT-domain 1/2, 1/4 or 1/8 scale
first, then the same transform. Goal >= 4x faster; the features of the two paths must agree (cosine
similarity with the demo backbone, reported per image).
"""

from __future__ import annotations

import io
from pathlib import Path

import _common as c


def main() -> None:
    args = c.parse_args(__doc__, repeats=3)
    c.header("2. large-JPEG decoding: naive full decode vs JPEG draft", args)
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    from stage1core.backbone import embed
    from stage1core.images import decode_image

    n = 2 if args.quick else 8
    root = c.demo_data(n, n_large=n, png_fraction=0.0, exif_fraction=0.0)
    files = [Path(s.locator).read_bytes() for s in c.load_samples(root)]
    prepared = c.prepared_backbone(c.demo_backbone())
    spec, model, pre = prepared.spec, prepared.model, prepared.pre
    transform, draft = prepared.transform, prepared.draft
    sizes = {Image.open(io.BytesIO(b)).size for b in files}
    print(f"{len(files)} JPEGs of {sorted(sizes)}, draft target {draft} px, output {pre['input_size'][1:]}")

    def naive(data: bytes):
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        return transform(image)

    def product(data: bytes):
        return transform(decode_image(data, draft_size=draft))

    naive(files[0]), product(files[0])  # warm-up
    times = c.interleave({"naive": lambda: [naive(b) for b in files],
                          "draft": lambda: [product(b) for b in files]}, args.repeats)
    per_image = {k: c.median(v) / len(files) * 1000 for k, v in times.items()}
    for k, ms in per_image.items():
        c.figure(f"{k} decode+transform", f"{ms:.1f} ms/image")
    drafted = decode_image(files[0], draft_size=draft)
    c.figure("draft decodes at", f"{drafted.size[0]}x{drafted.size[1]}")
    with torch.inference_mode():
        fa = embed(model, torch.stack([naive(b) for b in files]), spec.pooling).numpy()
        fb = embed(model, torch.stack([product(b) for b in files]), spec.pooling).numpy()
    cos = c.cosine_rows(fa, fb)
    c.figure("feature cosine naive vs draft", f"min {cos.min():.4f}, mean {cos.mean():.4f}")
    ratio = per_image["naive"] / per_image["draft"]
    c.ratio_line("naive / draft decode time", ratio, goal=">= 4x", met=ratio >= 4)
    c.ratio_line("feature cosine (min over images)", float(np.min(cos)), unit="")


if __name__ == "__main__":
    main()
