"""The feature cache: each image is decoded and embedded by the frozen backbone once.

The store for one (backbone fingerprint, preprocessing fingerprint, precision) lives in its own
directory; inside, features are fp16 shards (`<name>.npy`) with a JSON sidecar listing their
sample ids. The sidecar is written last, atomically, and marks the shard complete, so a crash loses at
most the shard in flight and a rerun computes only what is missing (resume and incremental runs are the
same code path). Shards are read by memory map.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch.utils.data import DataLoader

from .backbone import (
    BackboneConfig,
    BackboneSpec,
    build_backbone,
    build_skeleton,
    data_config,
    embed,
    feature_dim,
    resolve_backbone,
)
from .config import describe_fields
from .fingerprint import fingerprint, sha256_bytes, sha256_file
from .home import home_path
from .images import ImageDataset, collate_images, eval_transform
from .sources import Sample
from .storage import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
STORE_FORMAT = 1


@describe_fields
@dataclass(frozen=True)
class FeatureConfig:
    # images per forward pass
    batch_size: int = 64
    # DataLoader worker processes that decode images while the model computes (0: decode inline)
    num_workers: int = 2
    # fp32, bf16 autocast, or auto: bf16 for transformer backbones where the device has bf16 kernels
    # (ViT-S forward 2.2x faster on CPU, features within cosine 0.998, docs/benchmarks.md §3), fp32
    # otherwise (a light CNN is decode-bound, bf16 bought nothing end to end); the resolved precision
    # is part of the store key, since it changes the features
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # images per shard: the most a crash can lose
    shard_size: int = 1024
    # DCT-domain downscaling of large JPEGs before resizing (PIL draft); part of the store key
    jpeg_draft: bool = True
    # cpu | cuda | auto
    device: Literal["cpu", "cuda", "auto"] = "auto"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 1 or self.shard_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size and shard_size must be >= 1 and num_workers >= 0")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be cpu, cuda or auto, got {self.device!r}")


@dataclass(frozen=True)
class FeatureSetInfo:
    """What `extract_features` returns: a small reference to features in the store."""

    store_dir: str
    store_key: str
    dim: int
    fingerprint: str  # store key + the sample ids covered
    n_samples: int
    n_computed: int
    seconds: float
    images_per_second: float
    failed: list[dict[str, str]]  # images that could not be decoded: {sample_id, locator, reason}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preprocessing_spec(model: torch.nn.Module, spec: BackboneSpec, config: FeatureConfig) -> dict[str, Any]:
    """Everything about turning bytes into the model's input: timm's data config plus our decoder."""
    pre = data_config(model, spec.input_size)
    pre["jpeg_draft"] = config.jpeg_draft
    pre["decoder"] = "pil-exif-rgb-white-alpha"
    return pre


def draft_size(pre: dict[str, Any]) -> int | None:
    """Shorter side the eval transform resizes to; JPEGs may be DCT-downscaled to no less than this."""
    if not pre.get("jpeg_draft"):
        return None
    size = max(pre["input_size"][1:])
    return int(math.ceil(size / float(pre.get("crop_pct") or 1.0)))


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, model: torch.nn.Module, device: torch.device) -> str:
    """`auto` -> bf16 for a transformer backbone on a device with bf16 kernels, else fp32."""
    if precision != "auto":
        return precision
    transformer = getattr(model, "patch_embed", None) is not None
    return "bf16" if transformer and bf16_supported(device) else "fp32"


def feature_precision(backbone: BackboneConfig | BackboneSpec, config: FeatureConfig) -> str:
    """The precision `extract_features` will use for this backbone and config on this machine.

    Part of the feature cache key, so it runs on every run, cached or not: whether the architecture is a
    transformer is remembered on disk, because finding out builds the model, and importing timm for
    that was most of a fully cached run's pipeline time.
    """
    if config.precision != "auto":
        return config.precision
    spec = backbone if isinstance(backbone, BackboneSpec) else resolve_backbone(backbone)
    device = resolve_device(config.device)
    return "bf16" if _is_transformer(spec) and bf16_supported(device) else "fp32"


def _is_transformer(spec: BackboneSpec) -> bool:
    """resolve_precision's test (the model has a patch embedding), remembered per architecture."""
    import json

    memo = home_path("features") / "architectures.json"
    key = fingerprint("architecture", spec.name, spec.model_kwargs)
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or not isinstance(known.get(key), bool):
        known = known if isinstance(known, dict) else {}
        known[key] = getattr(build_skeleton(spec), "patch_embed", None) is not None
        atomic_write_json(memo, known)
    return known[key]


def store_key(spec: BackboneSpec, pre: dict[str, Any], precision: str) -> str:
    return fingerprint("feature-store", STORE_FORMAT, spec.fingerprint, pre, precision)


class FeatureStore:
    """One directory of fp16 shards for one store key."""

    def __init__(self, root: str | Path, *, scan: bool = True):
        """`scan=False` skips reading every sidecar into the index: a chunk writer (`fill_chunk`) only
        asks whether its own shards exist, and re-reading a large store per chunk would cost more than
        embedding the chunk."""
        self.root = Path(root)
        self.meta = _read_json(self.root / "store.json")
        self.dim = int(self.meta["dim"])
        self.index: dict[str, tuple[str, int]] = {}
        for sidecar in sorted(self.root.glob("shards/*.json")) if scan else ():
            info = _read_json(sidecar)
            for row, sid in enumerate(info["sample_ids"]):
                self.index.setdefault(sid, (sidecar.stem, row))
        self._maps: dict[str, np.ndarray] = {}

    @classmethod
    def create(cls, root: Path, meta: dict[str, Any]) -> FeatureStore:
        if not (root / "store.json").exists():
            atomic_write_json(root / "store.json", meta)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        return cls(root)

    def missing(self, sample_ids: Sequence[str]) -> list[str]:
        return [sid for sid in sample_ids if sid not in self.index]

    def has_shard(self, sample_ids: Sequence[str]) -> bool:
        """Whether the shard of exactly these ids (in this order) is complete: its sidecar exists."""
        return (self.root / "shards" / f"{shard_name(sample_ids)}.json").is_file()

    def write_shard(self, sample_ids: Sequence[str], feats: np.ndarray) -> str:
        feats = np.ascontiguousarray(feats, dtype=np.float16)
        if feats.shape != (len(sample_ids), self.dim):
            raise ValueError(f"shard shape {feats.shape} does not match {len(sample_ids)} ids x {self.dim}")
        if not np.isfinite(feats).all():
            raise ValueError("the backbone produced NaN/inf features; refusing to store them")
        name = shard_name(sample_ids)
        npy = self.root / "shards" / f"{name}.npy"
        buf = _npy_bytes(feats)
        atomic_write_bytes(npy, buf)
        atomic_write_json(
            self.root / "shards" / f"{name}.json",
            {"sample_ids": list(sample_ids), "dim": self.dim, "npy_sha256": sha256_bytes(buf)},
        )
        for row, sid in enumerate(sample_ids):
            self.index.setdefault(sid, (name, row))
        return name

    def load(self, sample_ids: Sequence[str]) -> np.ndarray:
        """Features as float32 (n, dim), in the order asked for."""
        missing = self.missing(sample_ids)
        if missing:
            raise KeyError(f"{len(missing)} samples are not in the feature store {self.root} (e.g. {missing[0]})")
        out = np.empty((len(sample_ids), self.dim), dtype=np.float32)
        for i, sid in enumerate(sample_ids):
            shard, row = self.index[sid]
            out[i] = self._map(shard)[row]
        if not np.isfinite(out).all():  # write_shard refuses them, so a shard was damaged or replaced
            bad = sorted({self.index[sample_ids[i]][0] for i in np.flatnonzero(~np.isfinite(out).all(axis=1))})
            raise ValueError(f"NaN/inf features in shard(s) {bad} of {self.root}; delete those shards "
                             "(.npy and .json) and extract again")
        return out

    def _map(self, shard: str) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.load(self.root / "shards" / f"{shard}.npy", mmap_mode="r", allow_pickle=False)
        return self._maps[shard]

    def verify(self) -> list[str]:
        """Names of shards whose bytes do not match their sidecar (corruption)."""
        bad = []
        for sidecar in sorted(self.root.glob("shards/*.json")):
            info = _read_json(sidecar)
            if sha256_file(sidecar.with_suffix(".npy")) != info["npy_sha256"]:
                bad.append(sidecar.stem)
        return bad


def shard_name(sample_ids: Sequence[str]) -> str:
    """A shard is named by its content (the sha256 of its sample ids, in order): writers that embed the
    same ids write the same name, so shards from many processes and hosts merge without coordination."""
    return sha256_bytes("\n".join(sample_ids).encode())[:24]


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read feature store file {path}: {exc}") from exc


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def feature_store_dir(key: str, root: str | Path | None = None) -> Path:
    base = Path(root) if root is not None else home_path("features")
    return base / key[:24]


@dataclass(frozen=True)
class StoreTarget:
    """The store one backbone's features go to, and how to fill it: its directory, its description
    (store.json), the preprocessing and the config with the precision resolved."""

    root: Path
    meta: dict[str, Any]
    pre: dict[str, Any]
    pooling: str
    config: FeatureConfig


def feature_store_target(backbone: BackboneConfig | BackboneSpec, config: FeatureConfig = FeatureConfig(), *,
                         store_root: str | Path | None = None) -> StoreTarget:
    """Where the features of `backbone` under `config` live (nothing is written, no weights are loaded)."""
    spec = backbone if isinstance(backbone, BackboneSpec) else resolve_backbone(backbone)
    skeleton = build_skeleton(spec)
    config = dataclasses.replace(
        config, precision=resolve_precision(config.precision, skeleton, resolve_device(config.device)))
    return store_target(spec, preprocessing_spec(skeleton, spec, config), config,
                        dim=feature_dim(skeleton, spec.pooling), store_root=store_root)


def store_target(spec: BackboneSpec, pre: dict[str, Any], config: FeatureConfig, *, dim: int,
                 store_root: str | Path | None = None) -> StoreTarget:
    """The store of `spec`'s features under the preprocessing `pre` at `config.precision` (resolved)."""
    key = store_key(spec, pre, config.precision)
    meta = {"format": STORE_FORMAT, "store_key": key, "backbone": spec.to_json(), "preprocessing": pre,
            "precision": config.precision, "dim": dim}
    return StoreTarget(root=feature_store_dir(key, store_root), meta=meta, pre=pre, pooling=spec.pooling,
                       config=config)


def extract_features(
    samples: Sequence[Sample],
    backbone: BackboneConfig | BackboneSpec,
    config: FeatureConfig = FeatureConfig(),
    *,
    store_root: str | Path | None = None,
    progress: bool = True,
    log_fn: Callable[[str], None] | None = None,
) -> FeatureSetInfo:
    """Embed every sample not yet in the store; return a reference to the features of all samples.

    Work is proportional to the number of new images: a rerun with nothing new loads no model.
    Images that fail to decode are reported in `failed` (with the reason) and not stored.
    """
    spec = backbone if isinstance(backbone, BackboneSpec) else resolve_backbone(backbone)
    target = feature_store_target(spec, config, store_root=store_root)
    return fill_feature_store(target.root, target.meta, samples,
                              build_model=lambda: build_backbone(spec, verify=False), pre=target.pre,
                              pooling=target.pooling, config=target.config, progress=progress,
                              say=log_fn or log.info)


def fill_feature_store(
    root: Path,
    meta: dict[str, Any],
    samples: Sequence[Sample],
    *,
    build_model: Callable[[], torch.nn.Module],
    pre: dict[str, Any],
    pooling: str,
    config: FeatureConfig,
    progress: bool = True,
    say: Callable[[str], None] = log.info,
) -> FeatureSetInfo:
    """The one-process way features enter a store: embed, under the store's lock, every sample the store
    at `root` lacks; return a reference to the features of all samples.

    `meta` describes the store (store.json, written on first use): its "store_key", "dim", "backbone"
    and whatever else identifies the features. `build_model()` is called only when something is
    missing. `extract_features` (frozen backbone) and `adapters.extract_adapted_features` (fine-tuned)
    differ only in the key, the description and the model. The chunked way (`plan_chunks`,
    `fill_chunk`, many processes or hosts) writes the same shards through the same `embed_into_store`.
    """
    FeatureStore.create(root, meta)
    by_id = {s.sample_id: s for s in samples}
    ids = sorted(by_id)
    started = time.perf_counter()
    failed: list[dict[str, str]] = []
    # One writer per store at a time: a second run (another flow run on the same home) waits, then
    # re-reads the index and embeds only what the first did not. The OS drops the lock if its holder dies.
    lock = FileLock(str(root / "store.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        say(f"another process is writing the feature store {root}; waiting for it")
        lock.acquire()
    try:
        store = FeatureStore(root)
        todo = [by_id[sid] for sid in store.missing(ids)]
        if todo:
            say(f"embedding {len(todo)} new images ({len(ids) - len(todo)} cached) with {meta['backbone']['name']} "
                f"into {root}")
            failed = embed_into_store(store, build_model(), todo, pre=pre, pooling=pooling, config=config,
                                      progress=progress)
    finally:
        lock.release()
    info = feature_set_info(store, ids, failed=failed, n_computed=len(todo) - len(failed),
                            seconds=time.perf_counter() - started)
    if todo:
        say(f"embedded {info.n_computed} images in {info.seconds:.1f}s ({info.images_per_second:.1f} images/s), "
            f"{len(failed)} failed")
    return info


def feature_set_info(store: FeatureStore, ids: Sequence[str], *, failed: list[dict[str, str]], n_computed: int,
                     seconds: float) -> FeatureSetInfo:
    """The reference both ways of filling a store return: the same fields for the same samples, so
    everything downstream (cache keys included) cannot tell which way filled it."""
    key = store.meta["store_key"]
    failed = sorted(failed, key=lambda f: f["sample_id"])
    failed_ids = {f["sample_id"] for f in failed}
    covered = [sid for sid in sorted(ids) if sid not in failed_ids]
    rate = n_computed / seconds if n_computed and seconds > 0 else 0.0
    return FeatureSetInfo(
        store_dir=str(store.root), store_key=key, dim=store.dim, fingerprint=fingerprint(key, covered),
        n_samples=len(covered), n_computed=n_computed, seconds=seconds, images_per_second=rate, failed=failed,
    )


def embed_into_store(store: FeatureStore, model: torch.nn.Module, todo: Sequence[Sample], *, pre: dict[str, Any],
                     pooling: str, config: FeatureConfig, progress: bool = False) -> list[dict[str, str]]:
    """Decode and embed `todo` in order, in batches of `config.batch_size`, and write a shard every
    `config.shard_size` images; returns the images that could not be decoded. Both ways of filling a
    store (`fill_feature_store`, `fill_chunk`) embed through here, so the same images in the same
    batches give the same bytes whichever process computes them."""
    from tqdm.auto import tqdm

    device = resolve_device(config.device)
    model.to(device)
    dataset = ImageDataset(list(todo), eval_transform(pre), draft_size(pre))
    loader = DataLoader(
        dataset, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers,
        collate_fn=collate_images, pin_memory=device.type == "cuda",
        prefetch_factor=4 if config.num_workers else None, persistent_workers=False,
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    pending_ids: list[str] = []
    pending: list[np.ndarray] = []
    failed: list[dict[str, str]] = []
    bar = tqdm(total=len(todo), unit="img", desc="features", disable=not progress, dynamic_ncols=True)

    def flush(limit: int) -> None:
        while len(pending_ids) >= limit and pending_ids:
            n = min(config.shard_size, len(pending_ids))
            feats = np.concatenate(pending, axis=0)
            store.write_shard(pending_ids[:n], feats[:n])
            del pending_ids[:n]
            pending[:] = [feats[n:]] if len(pending_ids) else []

    with torch.inference_mode():
        for index, batch, _labels, bad in loader:
            for i, reason in bad:
                failed.append({"sample_id": todo[i].sample_id, "locator": todo[i].locator, "reason": reason})
            if batch is not None:
                with autocast:
                    out = embed(model, batch.to(device, non_blocking=True), pooling)
                pending.append(out.float().cpu().numpy().astype(np.float16))
                pending_ids.extend(todo[i].sample_id for i in index)
                flush(config.shard_size)
            bar.update(len(index) + len(bad))
    flush(1)
    bar.close()
    return failed


# ------------------------------------------------------------------------------ chunked, many writers
#
# The chunked way fills the same store from many processes or hosts, with no lock: the planner splits
# the samples the store lacks, sorted by sample id, into fixed chunks and writes each chunk's sample
# list under chunks/<name>.json (named by content, like shards); each worker fills one chunk
# (`fill_chunk`), writing its shards atomically; the index is rebuilt from the sidecars, so the shards
# of all writers merge. Chunks are disjoint, and two writers of the same chunk (a retry racing a
# straggler, two runs planning the same work) write the same names with the same bytes: the last
# rename wins and nothing is lost or duplicated. Chunks start at multiples of the batch size in the
# same order as the one-process run, so every image is embedded in the same batch as there: the
# features are the same bytes (same machine type, precision and batch size; see docs/scale-out.md).


@dataclass(frozen=True)
class FeatureChunkJob:
    """What a worker needs to fill chunks of one store: small and picklable (no model, no samples)."""

    # the store directory, relative to $STAGE1_HOME when it lies under it (each host resolves it under
    # its own mount of the shared home), else absolute
    store_dir: str
    store_key: str
    backbone: BackboneSpec
    preprocessing: dict[str, Any]
    config: FeatureConfig  # precision resolved
    # torch intra-op threads in the worker (None: leave the process's setting)
    torch_threads: int | None = None

    def resolve_root(self) -> Path:
        path = Path(self.store_dir)
        return path if path.is_absolute() else home_path(self.store_dir)


@dataclass(frozen=True)
class ChunkResult:
    """What filling one chunk did (small: it travels back to the flow)."""

    chunk: str
    n_samples: int
    n_computed: int  # images embedded now (shards already complete were skipped)
    failed: list[dict[str, str]]
    seconds: float  # inside fill_chunk: reading the chunk, model (first chunk of a process), embedding
    model_seconds: float  # building the backbone; 0 when this process had it already
    host: str
    pid: int


def chunk_job(target: StoreTarget, *, torch_threads: int | None = None) -> FeatureChunkJob:
    """The job for `target`'s store; the store is created (store.json) so workers only add shards."""
    FeatureStore.create(target.root, target.meta)
    try:
        rel = str(target.root.resolve().relative_to(home_path()))
    except ValueError:
        rel = str(target.root.resolve())
    return FeatureChunkJob(store_dir=rel, store_key=target.meta["store_key"],
                           backbone=BackboneSpec.from_json(target.meta["backbone"]), preprocessing=target.pre,
                           config=target.config, torch_threads=torch_threads)


@dataclass(frozen=True)
class ChunkPlan:
    ids: list[str]  # every sample id asked for, sorted
    chunks: list[str]  # names of the chunks to fill (chunks/<name>.json), in sample-id order
    n_missing: int  # samples the store lacked when planned


def plan_chunks(root: Path, samples: Sequence[Sample], *, chunk_size: int, batch_size: int) -> ChunkPlan:
    """Split the samples the store at `root` lacks, sorted by sample id, into chunks of `chunk_size`
    (the last one shorter) and write each chunk's sample list. `chunk_size` must be a multiple of
    `batch_size`, so that chunks cut the one-process run's batches nowhere."""
    if chunk_size < 1 or chunk_size % batch_size:
        raise ValueError(f"chunk_size {chunk_size} must be a positive multiple of the feature batch size "
                         f"{batch_size}, so that each image is embedded in the same batch as in one process")
    by_id = {s.sample_id: s for s in samples}
    ids = sorted(by_id)
    todo = FeatureStore(root).missing(ids)
    names = []
    for start in range(0, len(todo), chunk_size):
        part = [by_id[sid] for sid in todo[start:start + chunk_size]]
        name = shard_name([s.sample_id for s in part])
        path = root / "chunks" / f"{name}.json"
        if not path.is_file():  # content-addressed: an existing file holds the same list
            atomic_write_json(path, {"samples": [dataclasses.asdict(s) for s in part]})
        names.append(name)
    return ChunkPlan(ids=ids, chunks=names, n_missing=len(todo))


def read_chunk(root: Path, name: str) -> list[Sample]:
    data = _read_json(root / "chunks" / f"{name}.json")
    return [Sample(**row) for row in data["samples"]]


# one backbone per worker process, built by its first chunk and reused by the next ones; the lock makes
# chunks that start together in one process (threads) build it once (random init draws from the global RNG)
_BACKBONES: dict[tuple[str, str], torch.nn.Module] = {}
_BACKBONES_LOCK = threading.Lock()


def cached_backbone(spec: BackboneSpec, device: torch.device) -> tuple[torch.nn.Module, float]:
    """The backbone of `spec` on `device`, built once per process (keyed by the spec's fingerprint); the
    seconds it took to build now (0.0 when cached). Holds one model: a new spec replaces it."""
    key = (spec.fingerprint, str(device))
    with _BACKBONES_LOCK:
        if key in _BACKBONES:
            return _BACKBONES[key], 0.0
        started = time.perf_counter()
        _BACKBONES.clear()
        model = build_backbone(spec, verify=False).to(device)
        _BACKBONES[key] = model
        return model, time.perf_counter() - started


def fill_chunk(job: FeatureChunkJob, chunk: str) -> ChunkResult:
    """Embed one planned chunk into the store, without the store lock (chunks are disjoint; see above).

    A shard of the chunk that is already complete (its sidecar exists: an earlier attempt wrote it before
    it was killed) is skipped, so a retried chunk computes only the rest. Decode workers are used only
    where this process may have children (a daemonic worker process, e.g. Dask's default, may not).
    """
    import multiprocessing
    import socket

    started = time.perf_counter()
    root = job.resolve_root()
    if not (root / "store.json").is_file():
        raise FileNotFoundError(
            f"feature store {root} not found on this host ({socket.gethostname()}): every worker must see the "
            f"shared STAGE1_HOME at the path its own STAGE1_HOME names (now {home_path()})")
    store = FeatureStore(root, scan=False)
    if store.meta["store_key"] != job.store_key:
        raise ValueError(f"{root}/store.json describes store {store.meta['store_key'][:12]}, not {job.store_key[:12]}")
    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    config = job.config
    if config.num_workers and multiprocessing.current_process().daemon:
        config = dataclasses.replace(config, num_workers=0)
    samples = read_chunk(root, chunk)
    todo: list[Sample] = []
    for start in range(0, len(samples), config.shard_size):
        shard = samples[start:start + config.shard_size]
        if not store.has_shard([s.sample_id for s in shard]):
            todo.extend(shard)
    failed: list[dict[str, str]] = []
    model_seconds = 0.0
    if todo:
        model, model_seconds = cached_backbone(job.backbone, resolve_device(config.device))
        failed = embed_into_store(store, model, todo, pre=job.preprocessing, pooling=job.backbone.pooling,
                                  config=config)
    return ChunkResult(chunk=chunk, n_samples=len(samples), n_computed=len(todo) - len(failed), failed=failed,
                       seconds=time.perf_counter() - started, model_seconds=model_seconds,
                       host=socket.gethostname(), pid=os.getpid())


def chunked_feature_set_info(root: Path, ids: Sequence[str], results: Sequence[ChunkResult], *,
                             seconds: float) -> FeatureSetInfo:
    """The FeatureSetInfo of a chunked fill (the same as the one-process run's for the same samples)."""
    store = FeatureStore(root)
    failed = [f for r in results for f in r.failed]
    failed_ids = {f["sample_id"] for f in failed}
    lost = store.missing([sid for sid in ids if sid not in failed_ids])
    if lost:
        raise RuntimeError(f"{len(lost)} samples are still missing from {root} after every chunk finished "
                           f"(e.g. {lost[0]}); rerun to compute them")
    return feature_set_info(store, ids, failed=failed, n_computed=sum(r.n_computed for r in results),
                            seconds=seconds)
