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

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.meta = _read_json(self.root / "store.json")
        self.dim = int(self.meta["dim"])
        self.index: dict[str, tuple[str, int]] = {}
        for sidecar in sorted(self.root.glob("shards/*.json")):
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

    def write_shard(self, sample_ids: Sequence[str], feats: np.ndarray) -> str:
        feats = np.ascontiguousarray(feats, dtype=np.float16)
        if feats.shape != (len(sample_ids), self.dim):
            raise ValueError(f"shard shape {feats.shape} does not match {len(sample_ids)} ids x {self.dim}")
        if not np.isfinite(feats).all():
            raise ValueError("the backbone produced NaN/inf features; refusing to store them")
        name = sha256_bytes("\n".join(sample_ids).encode())[:24]
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
    skeleton = build_skeleton(spec)
    config = dataclasses.replace(
        config, precision=resolve_precision(config.precision, skeleton, resolve_device(config.device)))
    pre = preprocessing_spec(skeleton, spec, config)
    key = store_key(spec, pre, config.precision)
    meta = {"format": STORE_FORMAT, "store_key": key, "backbone": spec.to_json(), "preprocessing": pre,
            "precision": config.precision, "dim": feature_dim(skeleton, spec.pooling)}
    return fill_feature_store(feature_store_dir(key, store_root), meta, samples,
                              build_model=lambda: build_backbone(spec, verify=False), pre=pre, pooling=spec.pooling,
                              config=config, progress=progress, say=log_fn or log.info)


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
    """The one way features enter a store: embed, under the store's lock, every sample the store at
    `root` lacks; return a reference to the features of all samples.

    `meta` describes the store (store.json, written on first use): its "store_key", "dim", "backbone"
    and whatever else identifies the features. `build_model()` is called only when something is
    missing. `extract_features` (frozen backbone) and `adapters.extract_adapted_features` (fine-tuned)
    differ only in the key, the description and the model.
    """
    key = meta["store_key"]
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
            failed = _embed_into(store, build_model(), todo, pre, pooling, config, progress=progress)
    finally:
        lock.release()
    seconds = time.perf_counter() - started
    rate = (len(todo) - len(failed)) / seconds if todo and seconds > 0 else 0.0
    if todo:
        say(f"embedded {len(todo) - len(failed)} images in {seconds:.1f}s ({rate:.1f} images/s), {len(failed)} failed")
    failed_ids = {f["sample_id"] for f in failed}
    covered = [sid for sid in ids if sid not in failed_ids]
    return FeatureSetInfo(
        store_dir=str(root), store_key=key, dim=store.dim, fingerprint=fingerprint(key, covered),
        n_samples=len(covered), n_computed=len(todo) - len(failed), seconds=seconds,
        images_per_second=rate, failed=failed,
    )


def _embed_into(store: FeatureStore, model, todo: list[Sample], pre, pooling: str, config: FeatureConfig,
                *, progress: bool) -> list[dict[str, str]]:
    from tqdm.auto import tqdm

    device = resolve_device(config.device)
    model.to(device)
    dataset = ImageDataset(todo, eval_transform(pre), draft_size(pre))
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

