"""Benchmark 6: peak memory of feature extraction over 2,000 against 20,000 images.

Each size runs `extract_features` in its own subprocess (a tiny random-init DINOv3-architecture ViT at
32 px, small generated JPEGs, 2 decode workers), which reports its peak RSS from
`resource.getrusage(...).ru_maxrss`: the main process (RUSAGE_SELF) and the largest decode worker
(RUSAGE_CHILDREN). Streaming into memory-mapped shards keeps nothing proportional to N but the sample
index. Goal: peak RSS(20,000) / peak RSS(2,000) <= 1.2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as c

TINY_VIT = c.TINY_VIT


def make_images(folder: Path, n: int) -> None:
    """n distinct small JPEGs (two classes), written once per size."""
    import numpy as np
    from PIL import Image

    done = folder / "done.txt"
    if done.exists():
        return
    rng = np.random.default_rng(n)
    base = (np.linspace(0, 255, 64)[None, :, None] * np.ones((48, 1, 3))).astype(np.uint8)
    for label in ("no_roadwork", "roadwork"):
        (folder / label).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise = rng.integers(0, 40, size=base.shape, dtype=np.uint8)
        label = "roadwork" if i % 2 else "no_roadwork"
        Image.fromarray(base + noise).save(folder / label / f"img_{i:06d}.jpg", quality=85)
    done.write_text(str(n))


def child(folder: str, store: str) -> None:
    import resource

    from stage1core.backbone import RANDOM_WEIGHTS, BackboneConfig
    from stage1core.features import FeatureConfig, extract_features

    samples = c.load_samples(Path(folder))
    backbone = BackboneConfig(name="vit_small_patch16_dinov3", weights=RANDOM_WEIGHTS, pooling="cls+avg",
                              model_kwargs=dict(TINY_VIT), input_size=32)
    info = extract_features(samples, backbone, FeatureConfig(batch_size=128, num_workers=2, shard_size=1024),
                            store_root=store, progress=False)
    print(json.dumps({
        "n": info.n_computed, "seconds": info.seconds,
        "self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
        return
    args = c.parse_args(__doc__, repeats=1)
    c.header("6. memory: peak RSS of extraction, 2,000 vs 20,000 images", args)
    small, large = (100, 1000) if args.quick else (2000, 20000)
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    for n in (small, large):
        folder = c.DATA_ROOT / f"small-jpegs-{n}"
        make_images(folder, n)
        peaks = []
        for r in range(args.repeats):
            proc = subprocess.run([sys.executable, __file__, "--child", str(folder), str(tmp / f"{n}-{r}")],
                                  capture_output=True, text=True, check=True)
            peaks.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        best = min(peaks, key=lambda p: p["self_mib"])
        out[n] = best
        c.figure(f"{n} images", f"main {best['self_mib']:.0f} MiB, largest worker {best['workers_mib']:.0f} MiB, "
                 f"{best['n'] / best['seconds']:.0f} images/s")
    ratio = out[large]["self_mib"] / out[small]["self_mib"]
    c.ratio_line(f"peak RSS main process {large} / {small} images", ratio, goal="<= 1.2x", met=ratio <= 1.2)
    c.ratio_line(f"peak RSS largest worker {large} / {small} images",
                 out[large]["workers_mib"] / out[small]["workers_mib"])


if __name__ == "__main__":
    main()
