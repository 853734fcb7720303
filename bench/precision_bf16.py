"""Benchmark 3: fp32 against bf16 autocast for feature extraction on CPU (and on GPU when present).

Speed: the backbone forward over the same pre-decoded batches, fp32 vs `torch.autocast(bfloat16)`,
interleaved, for the demo backbone (EfficientNet-Lite0) and the ViT-S/16 DINOv3 architecture (random
init). Agreement: per-image cosine of the two precisions' features. Effect: a linear head trained and
tested on the demo split with fp32 features against bf16 features (full extraction through the product).
Tolerance for making bf16 the default: min cosine >= 0.99 and |delta test accuracy| <= 0.01.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c


def main() -> None:
    def options(p):
        p.add_argument("--images", type=int, default=600, help="demo images for the test-metric comparison")
        p.add_argument("--speed-images", type=int, default=64, help="images per timed forward pass")

    args = c.parse_args(__doc__, configure=options)
    c.header("3. precision: fp32 vs bf16 autocast", args)
    import torch

    from stage1core.backbone import embed
    from stage1core.features import FeatureConfig, FeatureStore, extract_features

    n = 24 if args.quick else args.images
    samples = c.load_samples(c.bench_data(n, quick=args.quick))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = 32
    results = {}
    models = {"tf_efficientnet_lite0 (demo weights)": c.demo_backbone(),
              "vit_small_patch16_dinov3 (random init)": c.vit_small_backbone(tiny=args.quick)}
    for label, backbone in models.items():
        prepared = c.prepared_backbone(backbone)
        spec, model = prepared.spec, prepared.model.to(device)
        count = min(len(samples), 4 if args.quick else args.speed_images)
        x = c.decoded_images(prepared, samples[:count]).to(device)
        batches = list(x.split(batch))

        def run(bf16: bool, batches=batches, model=model, pooling=spec.pooling):
            out = []
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                for xb in batches:
                    out.append(embed(model, xb, pooling).float())
            if device.type == "cuda":
                torch.cuda.synchronize()
            return torch.cat(out).cpu().numpy()

        fp32, bf16 = run(False), run(True)  # warm-up (oneDNN picks kernels on first call)
        times = c.interleave({"fp32": lambda: run(False), "bf16": lambda: run(True)}, max(args.repeats, 2))
        rate = {k: count / c.median(v) for k, v in times.items()}
        cos = c.cosine_rows(fp32, bf16)
        print(f"{label}: {count} images, batch {batch}, {device.type}")
        c.figure("fp32", f"{rate['fp32']:.1f} images/s")
        c.figure("bf16 autocast", f"{rate['bf16']:.1f} images/s")
        c.figure("feature cosine fp32 vs bf16", f"min {cos.min():.4f}, mean {cos.mean():.4f}")
        results[label] = (rate["bf16"] / rate["fp32"], float(cos.min()))
        c.ratio_line(f"bf16 / fp32 images/s, {label.split()[0]}", rate["bf16"] / rate["fp32"])
        c.ratio_line(f"min feature cosine, {label.split()[0]}", float(cos.min()), unit="")

    # test metrics with each precision, through the product's extraction (demo backbone: real signal)
    tmp = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    metrics = {}
    for precision in ("fp32", "bf16"):
        cfg = FeatureConfig(batch_size=batch, num_workers=2, precision=precision)
        info = extract_features(samples, c.demo_backbone(), cfg, store_root=tmp, progress=False)
        store = FeatureStore(info.store_dir)
        metrics[precision] = c.test_metrics(store.load, samples, epochs=5 if args.quick else 30)
        c.figure(f"{precision} product extraction", f"{info.images_per_second:.1f} images/s")
        c.figure(f"{precision} test metrics", metrics[precision])
    delta = {k: metrics["bf16"][k] - metrics["fp32"][k] for k in ("accuracy", "mcc", "auroc")}
    c.figure("bf16 - fp32 test metrics", {k: round(v, 4) for k, v in delta.items()})
    within = all(cos >= 0.99 for _, cos in results.values()) and abs(delta["accuracy"]) <= 0.01
    faster = all(speed > 1.0 for speed, _ in results.values())
    c.ratio_line("|delta test accuracy| bf16 vs fp32", abs(delta["accuracy"]), goal="<= 0.01", met=within, unit="")
    print(f"verdict: bf16 is {'faster' if faster else 'not faster'} on this machine and "
          f"{'within' if within else 'outside'} the tolerance -> default should be "
          f"{'bf16' if faster and within else 'fp32'}")


if __name__ == "__main__":
    main()
