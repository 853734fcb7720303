"""Benchmark 9 (GPU; prepared, needs CUDA): DINOv3 ViT-S/16 and ViT-B/16 feature extraction throughput.

From pre-decoded uint8 tensors already on the GPU (normalised there), batch 256: fp32, bf16 autocast,
and bf16 autocast + torch.compile. End to end from JPEGs: the product's `extract_features` (decode
workers, bf16) on demo images. Each model's FLOPs per image (torch's FlopCounterMode) times images/s,
against the card's dense bf16 peak, gives the fraction of peak. Random-init weights: same compute.
Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import _common as c

# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; override with --peak-tflops
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.0}


def peak_for(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def main() -> None:
    def options(p):
        p.add_argument("--batch", type=int, default=256)
        p.add_argument("--steps", type=int, default=20, help="timed batches per setting")
        p.add_argument("--peak-tflops", type=float, default=None)
        p.add_argument("--jpegs", type=int, default=1024, help="demo images for the end-to-end run")

    args = c.parse_args(__doc__, configure=options)
    c.header("9. GPU: DINOv3 feature extraction throughput", args)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: benchmark 9 needs a GPU; nothing measured (run it on a GPU machine: "
              "python bench/gpu.py)")
        return
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    from stage1core.backbone import pool_features
    from stage1core.features import FeatureConfig, extract_features

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_for(name)
    batch, steps = (8, 2) if args.quick else (args.batch, args.steps)
    print(f"device {name}, bf16 peak {peak} TFLOP/s, batch {batch}, {steps} timed batches per setting")
    for model_name in ("vit_small_patch16_dinov3", "vit_base_patch16_dinov3"):
        model = timm.create_model(model_name, pretrained=False, num_classes=0).eval().to(device)
        cfg = timm.data.resolve_model_data_config(model)
        size = cfg["input_size"][1:]
        mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1) * 255
        raw = torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, device=device)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model.forward_features((raw[:1].float() - mean) / std)
        gflops = counter.get_total_flops() / 1e9
        print(f"{model_name}: {gflops:.1f} GFLOP per image at {size[0]} px")
        compiled = None
        for setting in ("fp32", "bf16", "bf16+compile"):
            fn = model
            if setting == "bf16+compile":
                compiled = compiled or torch.compile(model)
                fn = compiled

            def step(fn=fn, bf16=setting != "fp32", model=model, raw=raw, mean=mean, std=std):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    x = (raw.float() - mean) / std
                    return pool_features(model, fn.forward_features(x), "cls")

            for _ in range(3):  # warm-up (and compilation)
                step()
            torch.cuda.synchronize()
            seconds, _ = c.timed(lambda step=step: ([step() for _ in range(steps)], torch.cuda.synchronize()))
            rate = batch * steps / seconds
            frac = rate * gflops * 1e9 / (peak * 1e12) if peak else float("nan")
            c.figure(f"{model_name} {setting}", f"{rate:.0f} images/s, {rate * gflops / 1e3:.1f} TFLOP/s, "
                     f"{frac:.1%} of the bf16 peak")
            c.ratio_line(f"fraction of bf16 peak, {model_name} {setting}", frac * 100, unit="%")
        del model, compiled
        torch.cuda.empty_cache()

    n = 32 if args.quick else args.jpegs
    samples = c.load_samples(c.demo_data(n))
    for model_name in ("vit_small_patch16_dinov3", "vit_base_patch16_dinov3"):
        from stage1core.backbone import RANDOM_WEIGHTS, BackboneConfig

        backbone = BackboneConfig(name=model_name, weights=RANDOM_WEIGHTS, pooling="cls")
        config = FeatureConfig(batch_size=batch, num_workers=min(16, os.cpu_count() or 2), precision="bf16",
                               device="cuda")
        info = extract_features(samples, backbone, config, store_root=Path(tempfile.mkdtemp()), progress=False)
        c.figure(f"{model_name} end to end from {n} demo JPEGs", f"{info.images_per_second:.0f} images/s "
                 f"({config.num_workers} decode workers, bf16)")


if __name__ == "__main__":
    main()
