"""Benchmark 8: Predictor latency and throughput on CPU, from JPEG bytes to decision.

For the demo backbone (tf_efficientnet_lite0 with the efficientnet-lite0-package weights) and the
ViT-S/16 DINOv3 architecture (random init: the real weights cannot be downloaded here, the compute is
the same), a bundle is exported (MLP head trained briefly on random features: the head's quality does
not change its cost) and loaded with `load_bundle`. Latency: `predict([one image])`, p50/p95 over
demo JPEGs. Throughput: `predict(images, batch_size=32)`. Baseline for the ratio: the plain timm forward
of the same batches of 32 pre-decoded tensors (no decoding, no head, no policy).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c


def build_bundle(backbone, root: Path) -> str:
    import numpy as np

    from stage1core.backbone import build_backbone, feature_dim, resolve_backbone
    from stage1core.bundle import export_bundle
    from stage1core.features import FeatureConfig, preprocessing_spec
    from stage1core.guarantees import GuaranteeConfig, fnr_threshold
    from stage1core.train import TrainConfig, fit_head, predict_positive, save_head

    spec = resolve_backbone(backbone)
    model = build_backbone(spec, verify=False)
    dim = feature_dim(model, spec.pooling)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((256, dim)).astype(np.float32), np.arange(256) % 2
    trained = fit_head(x, y, x, y, config=TrainConfig(epochs=1))
    save_head(root / "head", trained)
    thr = fnr_threshold(predict_positive(trained.model, x)[y == 1], GuaranteeConfig(alpha=0.2, delta=0.2))
    pre = {**preprocessing_spec(model, spec, FeatureConfig()), "precision": "fp32"}
    return export_bundle(
        root / "bundles", name="bench", backbone=spec, preprocessing=pre, head_dir=root / "head",
        policy_files={"thresholds.json": {"policy": "threshold", **thr.to_json()},
                      "policy.json": {"policy": "threshold", "gate_min_confidence": None}},
        metrics={}, model_card="# benchmark bundle\n", inputs={"data_fingerprint": None},
    ).path


def main() -> None:
    args = c.parse_args(__doc__, configure=lambda p: p.add_argument("--images", type=int, default=64))
    c.header("8. Predictor latency and throughput (CPU)", args)
    import numpy as np
    import torch

    from stage1core.backbone import embed
    from stage1core.bundle import load_bundle

    n = 2 if args.quick else args.images
    samples = c.load_samples(c.bench_data(24 if args.quick else 600, quick=args.quick))[:n]
    images = [Path(s.locator).read_bytes() for s in samples]
    batch = 32
    for label, backbone in (("tf_efficientnet_lite0 (demo weights)", c.demo_backbone()),
                            ("vit_small_patch16_dinov3 (random init)", c.vit_small_backbone(tiny=args.quick))):
        root = Path(tempfile.mkdtemp(prefix="bench-predictor-"))
        predictor = load_bundle(build_bundle(backbone, root), device="cpu")
        predictor.predict(images[:2])  # warm-up
        latency = []
        for image in images:
            seconds, _ = c.timed(lambda image=image, p=predictor: p.predict([image]))
            latency.append(seconds * 1000)
        tensors = torch.stack([predictor._tensor(im) for im in images])

        def plain(tensors=tensors, predictor=predictor):
            with torch.inference_mode():
                for xb in tensors.split(batch):
                    embed(predictor.backbone, xb, predictor.spec.pooling)

        times = c.interleave({"predictor": lambda predictor=predictor: predictor.predict(images, batch_size=batch),
                              "plain": plain}, args.repeats)
        rate = {k: len(images) / c.median(v) for k, v in times.items()}
        print(f"{label}: {len(images)} demo JPEGs ({min(len(b) for b in images) // 1024}-"
              f"{max(len(b) for b in images) // 1024} KiB)")
        c.figure("latency, one image per call", f"p50 {np.percentile(latency, 50):.1f} ms, "
                 f"p95 {np.percentile(latency, 95):.1f} ms")
        c.figure(f"throughput at batch {batch}", f"{rate['predictor']:.1f} images/s "
                 f"(plain forward of pre-decoded tensors: {rate['plain']:.1f} images/s)")
        c.ratio_line(f"predictor / plain forward images/s, {label.split()[0]}", rate["predictor"] / rate["plain"])


if __name__ == "__main__":
    main()
