"""Benchmark 10: perceptual-hash near-duplicate groups: radius, diameter, chaining, cost.

Two sets of unrelated images: the 1,200-image demo set (procedural street scenes, all sharing the
layout sky / buildings / road) and 3,000 Fashion-MNIST images (1,500 pullovers + 1,500 coats, the two
most alike classes, upscaled to 224 px RGB). For each:

- the time to hash it cold (decode + hash into an empty store) and warm (every hash from the store);
- the pHash distance distribution over all pairs of its (unrelated) images;
- the distance between an image and a jittered copy (`demo.near_duplicate`: shift/zoom up to 3%,
  brightness up to 12%, JPEG re-encode at quality 60-90) for 300 images: the recall of a radius;
- groups and the largest group at each radius, with single linkage (a group is every image reachable
  by links: look-alikes chain) and with the diameter bound (every two images of a group within the
  diameter), and the share of bursts (an image + 4 jittered copies, added to the set) kept whole.

    python bench/near_duplicates.py            # the figures in docs/splits.md
    python bench/near_duplicates.py --quick    # a smoke run
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import _common as c

RADII = (4, 6, 8, 10, 12, 14)
FASHION = Path("/usr/share/datasets/fashion-mnist")
BURST = 4  # jittered copies per burst


def pair_histogram(values):
    """Histogram over 0..64 of all n(n-1)/2 Hamming distances."""
    import numpy as np

    from stage1core.near_duplicates import popcount

    values = np.asarray(values, dtype=np.uint64)
    hist = np.zeros(65, dtype=np.int64)
    for i in range(len(values) - 1):
        hist += np.bincount(popcount(values[i] ^ values[i + 1:]), minlength=65)
    return hist


def group_labels(hashes: list[int], radius: int, diameter: int):
    """Group label per image, from group_near_duplicates' links."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from stage1core.near_duplicates import group_near_duplicates

    ids = [f"{i:064x}" for i in range(len(hashes))]
    links = group_near_duplicates(dict(zip(ids, hashes, strict=True)), radius=radius, diameter=diameter).links
    a = [int(x, 16) for x, _ in links]
    b = [int(y, 16) for _, y in links]
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(ids), len(ids)))
    return connected_components(graph, directed=False)[1]


def fashion_images(n_per_class: int) -> Path:
    """Pullovers (label 2) and coats (label 4) from the training file as 224 px RGB PNGs, in class folders
    (coats under roadwork/, only so that load_sources reads them)."""
    import numpy as np
    from PIL import Image

    out = c.DATA_ROOT / f"fashion-{n_per_class}"
    if (out / "done").exists():
        return out
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    for label, folder in ((2, "no_roadwork"), (4, "roadwork")):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(labels == label)[:n_per_class]):
            image = Image.fromarray(images[i]).resize((224, 224), Image.Resampling.BICUBIC).convert("RGB")
            image.save(out / folder / f"{label}_{k:05d}.png")
    (out / "done").write_text("ok")
    return out


def measure(name: str, samples, n_jitter: int, n_bursts: int, diameter: int) -> dict:
    import numpy as np

    from stage1core.demo import near_duplicate
    from stage1core.images import decode_image
    from stage1core.near_duplicates import perceptual_hashes, phash_bytes
    from stage1core.sources import read_bytes

    with tempfile.TemporaryDirectory() as tmp:
        cold, result = c.timed(lambda: perceptual_hashes(samples, cache_dir=tmp))
        warm, again = c.timed(lambda: perceptual_hashes(samples, cache_dir=tmp))
    assert again.n_computed == 0 and again.hashes == result.hashes
    c.figure(f"{name}: images / hashed / flat / undecodable",
             f"{len(samples)} / {len(result.hashes)} / {len(result.flat)} / {len(result.failed)}")
    c.figure(f"{name}: hash time cold", f"{cold:.2f} s ({cold / len(samples) * 1000:.2f} ms/image)")
    c.figure(f"{name}: hash time warm (store)", f"{warm:.3f} s")
    ids = [s.sample_id for s in samples if s.sample_id in result.hashes]
    hashes = [result.hashes[sid] for sid in ids]

    hist = pair_histogram(hashes)
    cum = np.cumsum(hist)
    quantiles = [int(np.searchsorted(cum, q * cum[-1])) for q in (1e-5, 1e-4, 1e-3, 1e-2, 0.5)]
    c.figure(f"{name}: unrelated pairs", int(cum[-1]))
    c.figure(f"{name}: unrelated distance min / quantiles 1e-5, 1e-4, 1e-3, 1e-2, 0.5",
             f"{int(np.flatnonzero(hist)[0])} / {quantiles}")
    c.figure(f"{name}: unrelated pairs within r", ", ".join(f"r{r}: {int(cum[r])}" for r in RADII))

    originals = [read_bytes(s.locator) for s in samples[:max(n_jitter, n_bursts)]]
    jitter = np.array([bin(phash_bytes(data) ^ phash_bytes(near_duplicate(decode_image(data), seed=k))).count("1")
                       for k, data in enumerate(originals[:n_jitter])])
    c.figure(f"{name}: jittered copy to original, distance median / 95% / max",
             f"{int(np.median(jitter))} / {int(np.quantile(jitter, 0.95))} / {int(jitter.max())}")
    c.figure(f"{name}: jittered copies within r", ", ".join(f"r{r}: {np.mean(jitter <= r):.1%}" for r in RADII))

    bursts = [phash_bytes(near_duplicate(decode_image(data), seed=1000 * j + k))
              for k, data in enumerate(originals[:n_bursts]) for j in range(BURST)]
    rows = {}
    for r in RADII:
        for label, d in (("single linkage", 64 - 1), ("diameter r", r), (f"diameter {diameter}", max(r, diameter))):
            plain = group_labels(hashes, r, d)
            sizes = np.bincount(plain)
            with_bursts = group_labels(hashes + bursts, r, d)
            n = len(hashes)
            whole = np.mean([len({with_bursts[k], *with_bursts[n + BURST * k: n + BURST * (k + 1)]}) == 1
                             for k in range(n_bursts)])
            rows[(r, label)] = (len(sizes), int(sizes.max()), float(whole))
            c.figure(f"{name}: r={r:2d} {label:14s}",
                     f"{len(sizes)} groups, largest {sizes.max()}, bursts kept whole {whole:.0%}")
    return {"rows": rows, "n": len(hashes)}


def main() -> None:
    args = c.parse_args(__doc__, repeats=1)
    c.header("10. near-duplicate groups by perceptual hash", args)
    from stage1core.demo import DEFAULT_N_IMAGES
    from stage1core.splits import SplitConfig

    config = SplitConfig()
    r, d = config.near_duplicate_radius, config.near_duplicate_diameter
    demo = c.load_samples(c.demo_data(40 if args.quick else DEFAULT_N_IMAGES))
    fashion = c.load_samples(fashion_images(30 if args.quick else 1500))
    n_jitter, n_bursts = (10, 5) if args.quick else (300, 100)
    results = {name: measure(name, samples, n_jitter, n_bursts, d)
               for name, samples in (("demo", demo), ("fashion", fashion))}
    c.figure("defaults", f"radius {r}, diameter {d}")
    key = (r, f"diameter {d}")
    if key in results["demo"]["rows"]:
        c.ratio_line("demo bursts kept whole at the defaults", results["demo"]["rows"][key][2] * 100, unit="%",
                     goal=">= 95%", met=results["demo"]["rows"][key][2] >= 0.95)
        largest = results["fashion"]["rows"][key][1] / results["fashion"]["n"]
        c.ratio_line("fashion largest group / images at the defaults", largest * 100, unit="%", goal="<= 5%",
                     met=largest <= 0.05)


if __name__ == "__main__":
    main()
