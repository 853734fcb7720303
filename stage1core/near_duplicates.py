"""Near-duplicate images by perceptual hash: dash-cam frames of one scene must share a split.

A 64-bit DCT perceptual hash (pHash) is computed once per image and kept in a content-addressed store
(keyed by `sample_id`, the sha256 of the bytes), so a rerun hashes only new images. It depends on the
pixels alone, not on the backbone: changing the backbone never changes the groups or the splits.

Two images are linked when their hashes differ in at most `radius` of 64 bits. The search is exact and
sub-quadratic: multi-index hashing (Norouzi, Punjani and Fleet, "Fast search in Hamming space with
multi-index hashing", CVPR 2012) cuts the 64 bits into m blocks; two hashes within distance r agree to
within floor(r / m) bits on at least one block (pigeonhole), so each block is looked up in a table
of buckets with at most floor(r / m) of its bits flipped, and every candidate is verified on all 64
bits. Groups are then grown closest pair first, with a bound on their diameter (docs/splits.md).

Hand-written: the pHash is ten lines of scipy, and the exact radius search exists in faiss's binary
hash indexes, a heavy native dependency for one search that numpy does in seconds at 100k images.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import scipy.fft
from PIL import Image

from stage1core.fingerprint import fingerprint
from stage1core.images import ImageDecodeError, decode_image
from stage1core.sources import DataError, Sample, read_bytes
from stage1core.storage import atomic_write_bytes

log = logging.getLogger(__name__)

HASH_BITS = 64
# Bump when phash_image changes: stored hashes of another version are never mixed in.
HASH_VERSION = "dct64-v1"
DRAFT_SIZE = 64  # JPEGs are decoded by libjpeg at 1/2..1/8 scale, keeping both sides >= this
_DCT_INPUT = 32  # the image is reduced to 32x32 grey before the DCT
# An image whose low-frequency DCT coefficients span less than this (grey levels) has no structure
# (a black or blown-out frame): its hash would be arbitrary, so it links to nothing.
_FLAT_RANGE = 0.5
# sample_id as 32 raw bytes: an "S32" field would drop trailing zero bytes of the digest
_STORE_DTYPE = np.dtype([("sample_id", "u1", (32,)), ("phash", "<u8"), ("flat", "?")])
_COMPACT_SHARDS = 16  # merge the store's shards into one when a run finds more than this many
_PAIR_CHUNK = 1 << 22  # candidate pairs verified at a time (bounds memory on skewed data)
_TABLE_BITS = 22  # blocks up to this wide are looked up in a table of 2**width counts (32 MiB at most)


# ----------------------------------------------------------------------------------------------- hashing


def phash_image(image: Image.Image) -> int | None:
    """The 64-bit DCT perceptual hash of an image, or None for a flat image (no structure to hash).

    Grey, reduced to 32x32 by area averaging, 2-D DCT-II; the 8x8 lowest frequencies after the DC
    term (rows and columns 1..8, as in pHash) are thresholded at their median. Brightness changes move
    the DC term only and contrast changes scale all terms, so neither changes the hash; small shifts,
    noise and JPEG re-encoding flip a few bits.
    """
    grey = image.convert("L").resize((_DCT_INPUT, _DCT_INPUT), Image.Resampling.BOX)
    coeffs = scipy.fft.dctn(np.asarray(grey, dtype=np.float64), type=2, norm="ortho")[1:9, 1:9]
    if float(np.ptp(coeffs)) < _FLAT_RANGE:
        return None
    bits = (coeffs > np.median(coeffs)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def phash_bytes(data: bytes) -> int | None:
    """`phash_image` of encoded image bytes (EXIF-upright; large JPEGs decoded at reduced scale)."""
    return phash_image(decode_image(data, draft_size=DRAFT_SIZE))


@dataclass(frozen=True)
class HashResult:
    hashes: dict[str, int]  # sample_id -> pHash, for every image that decoded and is not flat
    n_computed: int  # images hashed in this call (the rest came from the store)
    n_cached: int  # images whose hash (or flatness) was already stored
    flat: list[str] = field(default_factory=list)  # sample_ids of flat images (never linked)
    failed: dict[str, str] = field(default_factory=dict)  # sample_id -> why it could not be hashed


class HashStore:
    """Content-addressed pHashes under `root/<HASH_VERSION>/`: append-only .npy shards of
    (sample_id, phash, flat) records, one shard per run that computed something. Undecodable images
    are not stored (a later decoder may read them); they are retried on the next run."""

    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root) / HASH_VERSION

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("shard-*.npy")) if self.dir.is_dir() else []

    def load(self) -> dict[str, tuple[int, bool]]:
        """sample_id -> (phash, flat) for every stored image."""
        out: dict[str, tuple[int, bool]] = {}
        for shard in self.shards():
            try:
                records = np.load(shard, allow_pickle=False)
            except FileNotFoundError:  # compacted away by a concurrent run; its records are in the merged shard
                continue
            except (OSError, ValueError) as exc:
                raise DataError(f"{shard}: unreadable pHash store shard ({exc}); delete it (its images are "
                                "hashed again on the next run)") from exc
            if records.dtype != _STORE_DTYPE:
                raise DataError(f"{shard}: not a pHash store shard (dtype {records.dtype}); delete it")
            for sid, value, flat in zip(records["sample_id"], records["phash"], records["flat"], strict=True):
                out[sid.tobytes().hex()] = (int(value), bool(flat))
        return out

    def add(self, entries: Mapping[str, tuple[int, bool]]) -> Path | None:
        """Write one new shard holding `entries`; returns its path (None when there is nothing to add)."""
        if not entries:
            return None
        return self._write(_records(entries))

    def compact(self) -> None:
        """Merge every shard into one, so a store that grew over many runs loads from few files."""
        shards = self.shards()
        if len(shards) <= 1:
            return
        kept = self._write(_records(self.load()))
        for shard in shards:
            if shard != kept:
                shard.unlink(missing_ok=True)

    def _write(self, records: np.ndarray) -> Path:
        buffer = io.BytesIO()
        np.save(buffer, records, allow_pickle=False)
        data = buffer.getvalue()
        name = f"shard-{fingerprint(data.hex())[:24]}.npy"
        return atomic_write_bytes(self.dir / name, data)


def _records(entries: Mapping[str, tuple[int, bool]]) -> np.ndarray:
    ids = sorted(entries)
    records = np.zeros(len(ids), dtype=_STORE_DTYPE)
    records["sample_id"] = np.frombuffer(b"".join(bytes.fromhex(sid) for sid in ids), dtype=np.uint8).reshape(-1, 32)
    records["phash"] = np.array([entries[sid][0] for sid in ids], dtype=np.uint64)
    records["flat"] = [entries[sid][1] for sid in ids]
    return records


def _hash_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def perceptual_hashes(
    samples: Sequence[Sample],
    *,
    cache_dir: str | Path,
    workers: int | None = None,
    log_fn: Callable[[str], None] | None = None,
) -> HashResult:
    """The pHash of every sample, computing (in threads) only those not yet in the store at `cache_dir`.

    Images that cannot be read or decoded are reported in `failed` and simply not linked; the feature
    stage quarantines them with file and row.
    """
    store = HashStore(cache_dir)
    stored = store.load()
    wanted = {s.sample_id: s for s in samples}
    missing = [wanted[sid] for sid in sorted(wanted) if sid not in stored]

    def one(sample: Sample) -> tuple[int | None, str | None]:
        try:
            return phash_bytes(read_bytes(sample.locator)), None
        except (ImageDecodeError, DataError) as exc:
            return None, str(exc)

    computed: dict[str, tuple[int, bool]] = {}
    failed: dict[str, str] = {}
    if missing:
        with ThreadPoolExecutor(max_workers=workers or _hash_workers()) as pool:
            for sample, (value, error) in zip(missing, pool.map(one, missing), strict=True):
                if error is not None:
                    failed[sample.sample_id] = error
                else:
                    computed[sample.sample_id] = (value or 0, value is None)
        store.add(computed)
        if len(store.shards()) > _COMPACT_SHARDS:
            store.compact()
    if log_fn:
        log_fn(f"pHash: {len(computed)} images hashed, {len(wanted) - len(missing)} from the store, "
               f"{len(failed)} undecodable")
    known = {**{sid: stored[sid] for sid in wanted if sid in stored}, **computed}
    return HashResult(
        hashes={sid: value for sid, (value, flat) in sorted(known.items()) if not flat},
        n_computed=len(computed),
        n_cached=len(wanted) - len(missing),
        flat=sorted(sid for sid, (_, flat) in known.items() if flat),
        failed=failed,
    )


# ----------------------------------------------------------------------------------------------- search


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    values = np.ascontiguousarray(values, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(values).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    return table[values.view(np.uint8).reshape(-1, 8)].sum(axis=1)


def _block_plan(n: int, radius: int) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of each block and the per-block search radius, chosen by a cost model.

    With m blocks a pair within `radius` agrees within s = radius // m bits on some block. Each block
    costs one lookup per flip pattern (sum of C(width, k) for k <= s) for each of the n hashes and, for
    uniform hashes, n / 2**width candidates per lookup; pick the m with the smallest total.
    """
    best: tuple[float, int] | None = None
    for m in range(1, min(radius + 1, HASH_BITS) + 1):
        s = radius // m
        widest, narrowest = math.ceil(HASH_BITS / m), HASH_BITS // m
        probes = sum(math.comb(widest, k) for k in range(s + 1))
        cost = m * probes * (1.0 + n / 2.0**narrowest)
        if best is None or cost < best[0]:
            best = (cost, m)
    assert best is not None
    m = best[1]
    widths = [HASH_BITS // m + (1 if k < HASH_BITS % m else 0) for k in range(m)]
    offsets = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(offsets, widths, strict=True)), radius // m


def _flip_masks(width: int, s: int) -> Iterable[int]:
    for k in range(s + 1):
        for bits in combinations(range(width), k):
            yield sum(1 << b for b in bits)


def hamming_pairs(hashes: np.ndarray | Sequence[int], radius: int) -> np.ndarray:
    """Every index pair (i, j), i < j, with popcount(hashes[i] ^ hashes[j]) <= radius; shape (k, 2),
    sorted. Exact: the same pairs as comparing all n^2 pairs, from m * probes block lookups and the
    candidates they return (see `_block_plan`)."""
    if isinstance(radius, bool) or not isinstance(radius, int) or not 0 <= radius < HASH_BITS:
        raise ValueError(f"radius must be an integer in [0, {HASH_BITS - 1}], got {radius!r}")
    values = np.asarray(hashes, dtype=np.uint64).ravel()
    n = len(values)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    blocks, s = _block_plan(n, radius)
    found: list[np.ndarray] = []
    everyone = np.arange(n)
    for offset, width in blocks:
        keys = ((values >> np.uint64(offset)) & np.uint64((1 << width) - 1)).astype(np.int64)
        order = np.argsort(keys, kind="stable")  # item indices grouped by key, each bucket one run
        if width <= _TABLE_BITS:  # a table over every key: a lookup is two gathers
            table_counts = np.bincount(keys, minlength=1 << width)
            table_starts = np.cumsum(table_counts) - table_counts
        else:
            sorted_keys = keys[order]
        for mask in _flip_masks(width, s):
            if mask == 0:  # pairs inside a bucket
                queries, wanted = everyone, keys
            else:  # bucket k meets bucket k ^ mask once: from the side where mask's top bit is clear
                queries = np.flatnonzero(((keys >> (mask.bit_length() - 1)) & 1) == 0)
                wanted = keys[queries] ^ mask
            if width <= _TABLE_BITS:
                left, counts = table_starts[wanted], table_counts[wanted]
            else:
                left = np.searchsorted(sorted_keys, wanted, side="left")
                counts = np.searchsorted(sorted_keys, wanted, side="right") - left
            found.extend(_verified(values, order, queries, left, counts, radius))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // n, codes % n], axis=1)


def _verified(values: np.ndarray, order: np.ndarray, queries: np.ndarray, left: np.ndarray, counts: np.ndarray,
              radius: int) -> list[np.ndarray]:
    """Expand each query's bucket (order[left:left + count]) into candidate pairs, keep those within
    `radius`; returns pair codes min * n + max, a chunk of queries at a time (bounded memory)."""
    n = len(values)
    out = []
    ends = np.cumsum(counts)
    start = 0
    while start < len(queries):
        base = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, base + _PAIR_CHUNK, side="right")))
        chunk_counts = counts[start:stop]
        total = int(chunk_counts.sum())
        if total:
            i = np.repeat(queries[start:stop], chunk_counts)
            within = np.arange(total) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)
            j = order[np.repeat(left[start:stop], chunk_counts) + within]
            keep = (i != j) & (popcount(values[i] ^ values[j]) <= radius)
            i, j = i[keep], j[keep]
            out.append(np.minimum(i, j) * n + np.maximum(i, j))
        start = stop
    return out


# ----------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True)
class NearDuplicates:
    links: list[tuple[str, str]]  # sample_id pairs that put images in one group (enough to connect each group)
    loose_pairs: list[tuple[str, str]]  # pairs within the radius that the diameter bound left in different groups
    n_pairs: int  # pairs of distinct hashes within the radius
    n_identical: int  # images whose hash equals another image's
    grouped_samples: int  # images grouped with at least one other
    largest_group: int  # images in the largest near-duplicate group
    summary: dict[str, int | str] = field(default_factory=dict)  # figures for the split manifest


def group_near_duplicates(hashes: Mapping[str, int], *, radius: int, diameter: int) -> NearDuplicates:
    """Group images whose pHashes are within `radius` bits, keeping every group within `diameter`.

    Candidate pairs (distance <= radius) are taken closest first (ties by sample_id); a pair joins its
    two groups only if every image of one is within `diameter` bits of every image of the other. The
    bound is the confirmation step: single linkage alone chains look-alike but unrelated images
    (3,000 Fashion-MNIST coats and pullovers at radius 10: one group of 1,673), while real bursts of
    one scene stay together because diameter > radius (docs/splits.md). Pairs it leaves apart are
    returned as `loose_pairs`, so the split manifest can count those that straddle splits.
    Images with identical hashes always share a group; the search runs over distinct hash values, so
    a burst of identical frames costs linear, not quadratic, work.
    """
    if not 0 <= radius <= diameter < HASH_BITS:
        raise ValueError(f"need 0 <= radius <= diameter < {HASH_BITS}, got radius={radius}, diameter={diameter}")
    ids = sorted(hashes)
    if len(ids) < 2:
        return NearDuplicates([], [], 0, 0, 0, len(ids))
    values = np.array([hashes[sid] for sid in ids], dtype=np.uint64)
    unique, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    multiplicity = np.bincount(inverse)
    pairs = hamming_pairs(unique, radius)
    distance = popcount(unique[pairs[:, 0]] ^ unique[pairs[:, 1]]) if len(pairs) else np.zeros(0, np.int64)

    parent = list(range(len(unique)))
    members: dict[int, list[int]] = {}

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    accepted, loose = [], []
    for e in np.lexsort((pairs[:, 1], pairs[:, 0], distance)) if len(pairs) else []:
        a, b = int(pairs[e, 0]), int(pairs[e, 1])
        ra, rb = root(a), root(b)
        if ra == rb:
            continue
        group_a, group_b = members.get(ra, [ra]), members.get(rb, [rb])
        if len(group_a) * len(group_b) > 1 and int(
            popcount((unique[group_a][:, None] ^ unique[group_b][None, :]).ravel()).max()
        ) > diameter:
            loose.append((a, b))
            continue
        if len(group_a) < len(group_b):
            ra, rb, group_a, group_b = rb, ra, group_b, group_a
        parent[rb] = ra
        members[ra] = group_a + group_b
        members.pop(rb, None)
        accepted.append((a, b))

    links: list[tuple[str, str]] = []
    order = np.argsort(inverse, kind="stable")
    same = inverse[order[1:]] == inverse[order[:-1]]
    for a, b in zip(order[:-1][same], order[1:][same], strict=True):
        links.append((ids[a], ids[b]))
    links += [(ids[first[a]], ids[first[b]]) for a, b in accepted]
    sizes = [int(multiplicity[group].sum()) for group in members.values()]
    sizes += [int(m) for u, m in enumerate(multiplicity) if m > 1 and root(u) == u and u not in members]
    grouped = sum(sizes)
    return NearDuplicates(
        links=links,
        loose_pairs=[(ids[first[a]], ids[first[b]]) for a, b in loose],
        n_pairs=len(pairs),
        n_identical=int(multiplicity[multiplicity > 1].sum()),
        grouped_samples=grouped,
        largest_group=max(sizes, default=1),
    )


def find_near_duplicates(
    samples: Sequence[Sample],
    *,
    radius: int,
    diameter: int,
    cache_dir: str | Path,
    log_fn: Callable[[str], None] | None = None,
) -> NearDuplicates:
    """Near-duplicate groups of `samples` (see `group_near_duplicates`), with a `summary` for the split
    manifest. Hashes come from the store at `cache_dir`: only images not seen before are decoded (the
    count is logged through `log_fn`)."""
    hashed = perceptual_hashes(samples, cache_dir=cache_dir, log_fn=log_fn)
    found = group_near_duplicates(hashed.hashes, radius=radius, diameter=diameter)
    # a function of the images alone (no run-to-run counts): a rerun must write the same split manifest
    summary: dict[str, int | str] = {
        "hash": HASH_VERSION, "radius": radius, "diameter": diameter, "hashed": len(hashed.hashes),
        "flat": len(hashed.flat), "unhashable": len(hashed.failed), "pairs": found.n_pairs,
        "identical": found.n_identical, "grouped_samples": found.grouped_samples,
        "largest_group": found.largest_group, "loose_pairs": len(found.loose_pairs),
    }
    return dataclasses.replace(found, summary=summary)
