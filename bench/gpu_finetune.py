"""GPU check of backbone fine-tuning: training images/s and peak memory, DoRA vs LoRA, fp32 vs bf16,
eager vs torch.compile, measured side by side in one run.

The model is the ViT-S/16 DINOv3 architecture (timm `vit_small_patch16_dinov3`, random init: the
speed does not depend on the weights) with adapters on the last 4 blocks and an MLP head; each step is
one F-SAM step (two forward/backward passes, as in training) on synthetic uint8 batches normalised on
the device, so decoding does not limit the figure.

    python bench/gpu_finetune.py                 # needs CUDA; prints a table and ratios
    python bench/gpu_finetune.py --dry-run       # tiny model on CPU, compile with the eager backend:
                                                 # checks the script, measures nothing meaningful
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stage1core.fsam import fsam_training_step, make_optimizer  # noqa: E402
from stage1core.heads import MLPHead  # noqa: E402
from stage1core.peft import AdapterConfig, apply_adapters  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build(method: str, *, tiny: bool, device: torch.device) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    kwargs = dict(depth=2, embed_dim=32, num_heads=2, img_size=32) if tiny else {}
    backbone = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, **kwargs)
    peft_model = apply_adapters(backbone, AdapterConfig(method=method, rank=8, alpha=16,
                                                        last_n_blocks=1 if tiny else 4))

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = peft_model
            self.head = MLPHead(backbone.num_features, hidden=768 if not tiny else 16)

        def forward(self, x):
            return self.head(self.backbone.get_base_model().forward_features(x)[:, 0])

    return Classifier().to(device)


def measure(method: str, precision: str, compiled: bool, *, args, device: torch.device) -> dict[str, float]:
    model = build(method, tiny=args.dry_run, device=device)
    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    forward = torch.compile(model, backend="eager" if args.dry_run else "inductor") if compiled else model
    mean, std = MEAN.to(device), STD.to(device)
    size = 32 if args.dry_run else args.size
    generator = torch.Generator(device="cpu").manual_seed(0)
    batches = [
        (torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, generator=generator).to(device),
         torch.randint(0, 2, (args.batch_size,), generator=generator).to(device))
        for _ in range(4)
    ]

    def loss_fn(_model, batch):
        images, labels = batch
        x = (images.float() / 255.0 - mean) / std
        return torch.nn.functional.cross_entropy(forward(x).float(), labels)

    dtype = torch.bfloat16 if precision == "bf16" else None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(args.warmup):
        fsam_training_step(model, loss_fn, optimizer, micro_batches=[batches[i % 4]], autocast_dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(args.steps):
        fsam_training_step(model, loss_fn, optimizer, micro_batches=[batches[i % 4]], autocast_dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, optimizer
    return {"images_per_s": args.steps * args.batch_size / seconds, "peak_gib": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU; checks the script only")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224, help="input size in pixels")
    parser.add_argument("--steps", type=int, default=20, help="timed F-SAM steps per configuration")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile happens here)")
    args = parser.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
        args.batch_size, args.steps, args.warmup = 4, 2, 1
        card = "CPU dry run (tiny model): figures are NOT GPU measurements"
    else:
        if not torch.cuda.is_available():
            print("bench/gpu_finetune.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
                  "False). Run it on a GPU worker, or pass --dry-run to check the script on CPU.", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        card = torch.cuda.get_device_name(device)
    print(f"device: {card}; torch {torch.__version__}; batch {args.batch_size}, "
          f"{'32' if args.dry_run else args.size} px, {args.steps} timed F-SAM steps (2 passes each)")
    rows = {}
    print(f"{'method':6} {'precision':9} {'compile':7} {'images/s':>10} {'peak GiB':>9}")
    for method in ("dora", "lora"):
        for precision in ("fp32", "bf16"):
            for compiled in (False, True):
                r = measure(method, precision, compiled, args=args, device=device)
                rows[(method, precision, compiled)] = r
                print(f"{method:6} {precision:9} {str(compiled):7} {r['images_per_s']:10.1f} {r['peak_gib']:9.2f}",
                      flush=True)
    print("ratios (images/s):")
    for method in ("dora", "lora"):
        base = rows[(method, "fp32", False)]["images_per_s"]
        print(f"  {method}: bf16/fp32 {rows[(method, 'bf16', False)]['images_per_s'] / base:.2f}, "
              f"compile/eager fp32 {rows[(method, 'fp32', True)]['images_per_s'] / base:.2f}, "
              f"bf16+compile/fp32 {rows[(method, 'bf16', True)]['images_per_s'] / base:.2f}")
    for precision in ("fp32", "bf16"):
        ratio = rows[("lora", precision, False)]["images_per_s"] / rows[("dora", precision, False)]["images_per_s"]
        print(f"  lora/dora {precision} eager: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
