"""A fine-tuned backbone's adapters on disk: written by `fit_backbone`, exported into a bundle,
attached again by the bundle's Predictor, and used to fill the feature store.

A fine-tuning run directory holds adapter.safetensors (the peft adapter weights) and adapter.json
(AdapterConfig, the backbone spec it was trained on, pooling); `result.json`, written last by
`fit_backbone`, marks the run finished. A bundle carries either the same two files or, merged, the
adapters folded into backbone.safetensors with adapter.json saying `"merged": true`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .backbone import BackboneError, BackboneSpec, build_backbone, feature_dim
from .features import (
    FeatureConfig,
    FeatureSetInfo,
    feature_store_dir,
    fill_feature_store,
    preprocessing_spec,
    store_key,
)
from .fingerprint import fingerprint, sha256_file
from .peft import AdapterConfig, adapter_state_dict, apply_adapters, load_adapter_state_dict, merge_adapters
from .sources import Sample
from .storage import atomic_write_bytes, atomic_write_json

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
MERGED_BACKBONE = "backbone.safetensors"
RESULT = "result.json"  # a fine-tuning run's summary, written last: the run is finished


def write_adapters(out_dir: Path, peft_model: nn.Module, meta: dict[str, Any]) -> None:
    """adapter.safetensors (the adapter weights of `peft_model`) and adapter.json (`meta`: "adapter",
    "backbone", "backbone_fingerprint", "pooling", ...), each written atomically."""
    from safetensors.torch import save

    atomic_write_bytes(out_dir / ADAPTER_WEIGHTS, save(adapter_state_dict(peft_model)))
    atomic_write_json(out_dir / ADAPTER_META, {**meta, "merged": False})


def read_adapter_meta(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_META
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the adapter description ({exc})") from exc


def load_adapted_backbone(directory: str | Path, *, backbone: BackboneSpec | None = None
                          ) -> tuple[nn.Module, dict[str, Any]]:
    """The fine-tuned backbone of a run directory with its adapters folded in (a plain timm model, eval
    mode), and the run's adapter.json. The original weights are hashed and verified first, unless the
    caller passes `backbone`, the spec it resolved (hashed) itself, which must be the run's."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_adapter_meta(directory)
    spec = BackboneSpec.from_json(meta["backbone"])
    if backbone is not None and backbone.fingerprint != spec.fingerprint:
        raise BackboneError(f"{directory} was fine-tuned on backbone {spec.fingerprint[:12]}…, not on the given "
                            f"{backbone.name} ({backbone.fingerprint[:12]}…)")
    base = build_backbone(backbone, verify=False) if backbone is not None else build_backbone(spec, verify=True)
    peft_model = apply_adapters(base, AdapterConfig(**meta["adapter"]))
    load_adapter_state_dict(peft_model, load_file(str(directory / ADAPTER_WEIGHTS)))
    return merge_adapters(peft_model).eval(), meta


def export_adapter_files(finetune_out_dir: str | Path, *, merge: bool, backbone: BackboneSpec | None = None
                         ) -> dict[str, bytes]:
    """Files to add to a bundle (`export_bundle(files=...)`) for a fine-tuned backbone.

    Unmerged: adapter.safetensors + adapter.json (AdapterConfig, backbone spec). Merged: the adapters
    folded into the backbone weights, backbone.safetensors (the full timm state dict) + adapter.json
    with "merged": true. The bundle's backbone.json still names the original weights, which the
    Predictor loads and verifies first. `backbone`: as for `load_adapted_backbone`.
    """
    from safetensors.torch import save

    directory = Path(finetune_out_dir)
    if not (directory / RESULT).is_file():
        raise ValueError(f"{directory}: not a finished fine-tuning run (no {RESULT})")
    if not merge:
        meta = read_adapter_meta(directory)
        return {ADAPTER_WEIGHTS: (directory / ADAPTER_WEIGHTS).read_bytes(), ADAPTER_META: _json_bytes(meta)}
    merged, meta = load_adapted_backbone(directory, backbone=backbone)
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    return {MERGED_BACKBONE: save(state), ADAPTER_META: _json_bytes({**meta, "merged": True})}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def attach_bundle_adapters(model: nn.Module, bundle_dir: str | Path, manifest: dict[str, Any], *,
                           merge: bool = False) -> nn.Module:
    """What the Predictor calls after building the backbone: apply a bundle's fine-tuning to `model`.

    A bundle without adapter.json is returned unchanged. With backbone.safetensors (merged export) the
    merged weights are loaded into `model`; with adapter.safetensors the adapters are applied and loaded
    (and folded in when `merge`, which is faster at inference and gives the same outputs). Returns the
    plain timm model (adapters live inside its modules), in eval mode, frozen, on `model`'s device.
    The files were hash-checked by `read_manifest`; the adapter's backbone must be the bundle's.
    """
    from safetensors.torch import load_file

    root = Path(bundle_dir)
    files = manifest["files"]
    if ADAPTER_META not in files:
        return model
    meta = read_adapter_meta(root)
    if meta["backbone_fingerprint"] != manifest["backbone_fingerprint"]:
        raise ValueError(f"{root / ADAPTER_META}: adapters were trained on backbone "
                         f"{meta['backbone_fingerprint'][:12]}, the bundle's is "
                         f"{manifest['backbone_fingerprint'][:12]}")
    device = next(model.parameters()).device
    if MERGED_BACKBONE in files:
        model.load_state_dict(load_file(str(root / MERGED_BACKBONE), device=str(device)), strict=True)
        out = model
    elif ADAPTER_WEIGHTS in files:
        peft_model = apply_adapters(model, AdapterConfig(**meta["adapter"]))
        load_adapter_state_dict(peft_model, load_file(str(root / ADAPTER_WEIGHTS), device=str(device)))
        out = merge_adapters(peft_model) if merge else peft_model.get_base_model()
    else:
        raise ValueError(f"{root}: {ADAPTER_META} but neither {ADAPTER_WEIGHTS} nor {MERGED_BACKBONE}")
    out.eval()
    for param in out.parameters():
        param.requires_grad_(False)
    return out


def extract_adapted_features(samples: Sequence[Sample], finetune_out_dir: str | Path,
                             config: FeatureConfig = FeatureConfig(), *, store_root: str | Path | None = None,
                             progress: bool = False, backbone: BackboneSpec | None = None) -> FeatureSetInfo:
    """Features of the fine-tuned backbone (adapters merged) in the feature store, so that the shared
    pipeline (calibrate_threshold, evaluate_test, export_bundle) runs on them with the head of
    `finetune_out_dir` unchanged. The store key adds the adapter weights' sha256 to the frozen key; the
    store's `backbone` stays the original spec (what a bundle's backbone.json names). Features pass
    through fp16 as in training, so head outputs equal the training-time ones. Use
    `FeatureConfig(precision=<the run's precision>)`. The store is filled like the frozen one
    (`features.fill_feature_store`: under its lock, only what is missing). `backbone`: as for
    `load_adapted_backbone`.
    """
    directory = Path(finetune_out_dir)
    model, meta = load_adapted_backbone(directory, backbone=backbone)
    spec = BackboneSpec.from_json(meta["backbone"])
    pre = preprocessing_spec(model, spec, config)
    adapter_sha = sha256_file(directory / ADAPTER_WEIGHTS)
    key = fingerprint("adapted-feature-store", store_key(spec, pre, config.precision), adapter_sha)
    store_meta = {
        "format": 1, "store_key": key, "backbone": spec.to_json(), "preprocessing": pre,
        "precision": config.precision, "dim": feature_dim(model, spec.pooling), "adapter_sha256": adapter_sha,
        "adapter": meta["adapter"],
    }
    return fill_feature_store(feature_store_dir(key, store_root), store_meta, samples, build_model=lambda: model,
                              pre=pre, pooling=spec.pooling, config=config, progress=progress)
