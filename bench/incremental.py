"""Benchmark 5: incremental extraction. A store holding 90% of the images gets the other 10%.

Full: `extract_features` over all N images into an empty store. Incremental: the same call into a store
that already holds 90% of them (filled beforehand, not timed); only the new 10% are decoded and embedded.
Both timings include the fixed cost of every call (building the model, scanning the store index).
Goal: the incremental run's feature work is <= 12% of the full extraction's wall time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c


def main() -> None:
    args = c.parse_args(__doc__, repeats=2, configure=lambda p: p.add_argument("--images", type=int, default=600))
    c.header("5. incremental: +10% new images vs full extraction", args)
    from stage1core.features import FeatureConfig, extract_features

    n = 40 if args.quick else args.images
    samples = sorted(c.load_samples(c.bench_data(n, quick=args.quick)),
                     key=lambda s: s.sample_id)
    old = [s for i, s in enumerate(samples) if i % 10 != 0]  # every tenth image is "new"
    backbone = c.demo_backbone()
    config = FeatureConfig(batch_size=32, num_workers=2)
    tmp = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    print(f"{len(samples)} demo images, {len(samples) - len(old)} new ({(len(samples) - len(old)) / len(samples):.0%})")
    extract_features(samples[:8], backbone, config, store_root=tmp / "warmup", progress=False)

    full_t, inc_t, computed = [], [], []
    for r in range(args.repeats):
        inc_root = tmp / f"inc{r}"
        extract_features(old, backbone, config, store_root=inc_root, progress=False)  # the existing store

        def full(r=r):
            return extract_features(samples, backbone, config, store_root=tmp / f"full{r}", progress=False)

        def incremental(inc_root=inc_root):
            return extract_features(samples, backbone, config, store_root=inc_root, progress=False)

        order = [("full", full), ("inc", incremental)] if r % 2 == 0 else [("inc", incremental), ("full", full)]
        for name, fn in order:
            seconds, info = c.timed(fn)
            (full_t if name == "full" else inc_t).append(seconds)
            if name == "inc":
                computed.append(info.n_computed)
    c.figure("full extraction", f"{c.median(full_t):.2f} s (runs {[round(t, 2) for t in full_t]})")
    c.figure("incremental run", f"{c.median(inc_t):.2f} s (runs {[round(t, 2) for t in inc_t]}), "
             f"embedded {computed[0]} images")
    ratio = c.median(inc_t) / c.median(full_t)
    c.ratio_line("incremental / full wall time", ratio * 100, goal="<= 12%", met=ratio <= 0.12, unit="%")


if __name__ == "__main__":
    main()
