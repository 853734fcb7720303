"""Bundles: self-describing, verifiable model directories, and the Predictor that serves them.

A bundle holds manifest.json (schema-validated, sha256 of every file), backbone.json (timm name and
weights sha256), preprocessing.json, head.safetensors + head.json, thresholds.json, metrics.json,
model_card.md, plots and the test predictions. No pickle anywhere: weights are safetensors, the rest
JSON. `load_bundle` checks the manifest schema, every file's hash, every JSON file's schema and the
backbone weights' hash before it builds a Predictor.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .backbone import (
    BackboneError,
    BackboneSpec,
    _hf_cached_weights,
    backbone_fingerprint,
    build_backbone,
    build_skeleton,
    demo_package_weights_file,
    embed,
    feature_dim,
)
from .features import FeatureConfig, StoreTarget, draft_size, eval_transform, resolve_device, store_target
from .fingerprint import fingerprint, sha256_bytes, sha256_file
from .images import ImageDecodeError, decode_image
from .policy import FittedPolicy
from .schemas import SchemaError, validate_json
from .signing import SIGNATURE, SignatureError, sign_manifest, verify_manifest
from .storage import atomic_dir
from .train import HEAD_META, HEAD_WEIGHTS, head_outputs, load_head

MANIFEST = "manifest.json"
FORMAT = "stage1-bundle"
FORMAT_VERSION = 1
# JSON files whose schema load_bundle checks, by file name
JSON_SCHEMAS = {
    "backbone.json": "backbone",
    "preprocessing.json": "preprocessing",
    "thresholds.json": "thresholds",
    "policy.json": "policy",
    "calibration.json": "calibration",
    "gateparams.json": "gateparams",
    "scrcparams.json": "scrcparams",
}
POLICY_FILES = ("thresholds.json", "policy.json", "calibration.json", "gateparams.json", "scrcparams.json")


class BundleError(ValueError):
    """A bundle that cannot be trusted or used; the message names the file and the problem."""


@dataclass(frozen=True)
class BundleInfo:
    path: str
    fingerprint: str
    name: str


def export_bundle(
    out_root: str | Path,
    *,
    name: str,
    backbone: BackboneSpec,
    preprocessing: dict[str, Any],
    head_dir: str | Path,
    policy_files: dict[str, dict[str, Any]],
    metrics: dict[str, Any],
    model_card: str,
    inputs: dict[str, str | None],
    files: dict[str, str | Path | bytes] | None = None,
    json_files: dict[str, Any] | None = None,
    signing_key: str | Path | None = None,
) -> BundleInfo:
    """Write a bundle under `out_root/<name>-<fingerprint[:12]>`, atomically.

    `policy_files` are the decision policy's JSON files (stage1core.policy.FittedPolicy.files(): at
    least thresholds.json and policy.json). `files` are copied (paths) or written (bytes) under their
    relative names; `json_files` are written as JSON. The bundle fingerprint covers every file's hash,
    so identical inputs give the same bundle and an existing complete bundle is reused, not rewritten.
    With `signing_key` (an ed25519 private key file), the manifest is signed (manifest.sig), also
    when an existing bundle is reused.
    """
    for rel in ("thresholds.json", "policy.json"):
        if rel not in policy_files:
            raise BundleError(f"policy_files must include {rel}")
    for rel, doc in policy_files.items():
        if rel not in POLICY_FILES:
            raise BundleError(f"unknown policy file {rel!r}; expected one of {POLICY_FILES}")
        validate_json(doc, JSON_SCHEMAS[rel], source=rel)
    validate_json(preprocessing, "preprocessing", source="preprocessing")
    policy = policy_files["policy.json"]["policy"]
    head_dir = Path(head_dir)
    contents: dict[str, bytes] = {
        "backbone.json": _json_bytes(backbone.to_json()),
        "preprocessing.json": _json_bytes(preprocessing),
        **{rel: _json_bytes(doc) for rel, doc in policy_files.items()},
        "metrics.json": _json_bytes(metrics),
        "model_card.md": model_card.encode(),
        HEAD_WEIGHTS: (head_dir / HEAD_WEIGHTS).read_bytes(),
        HEAD_META: (head_dir / HEAD_META).read_bytes(),
    }
    for rel, obj in (json_files or {}).items():
        contents[rel] = _json_bytes(obj)
    for rel, src in (files or {}).items():
        contents[rel] = src if isinstance(src, bytes) else Path(src).read_bytes()
    hashes = {rel: sha256_bytes(data) for rel, data in sorted(contents.items())}
    bundle_fp = fingerprint("bundle", FORMAT_VERSION, name, policy, backbone.fingerprint, hashes, inputs)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "fingerprint": bundle_fp,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "backbone_fingerprint": backbone.fingerprint, "backbone_random_init": backbone.weights_kind == "random",
        "policy": policy, "files": hashes, "inputs": dict(inputs), "code_version": __version__,
    }
    validate_json(manifest, "bundle", source=MANIFEST)
    final = Path(out_root) / f"{name}-{bundle_fp[:12]}"
    if final.exists():
        try:
            read_manifest(final)
            if signing_key is not None:
                sign_manifest(final, signing_key)
            return BundleInfo(path=str(final), fingerprint=bundle_fp, name=name)
        except BundleError:
            # an unusable directory under our name: move it aside (one rename), never delete in place
            final.rename(final.with_name(f".{final.name}.broken-{uuid.uuid4().hex[:8]}"))
    # replace=False: if a concurrent identical export finished first, its complete bundle is kept and
    # ours discarded, so the final name never disappears, not even for an instant
    with atomic_dir(final, replace=False) as tmp:
        for rel, data in contents.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        # the manifest is written last: a directory without it is never a bundle
        (tmp / MANIFEST).write_bytes(_json_bytes(manifest))
        if signing_key is not None:
            sign_manifest(tmp, signing_key)
    if signing_key is not None and not (final / SIGNATURE).exists():  # a concurrent export won the rename
        sign_manifest(final, signing_key)
    return BundleInfo(path=str(final), fingerprint=bundle_fp, name=name)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _safe_member(root: Path, rel: str) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BundleError(f"{root / MANIFEST}: file {rel!r} points outside the bundle directory")
    return path


# files every bundle holds: the Predictor reads them, so each must be listed (and hashed) in the manifest
REQUIRED_FILES = ("backbone.json", "preprocessing.json", "thresholds.json", "policy.json", "metrics.json",
                  "model_card.md", HEAD_WEIGHTS, HEAD_META)


def _manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """The bundle fingerprint as export_bundle computes it from the manifest's own fields."""
    return fingerprint("bundle", manifest["format_version"], manifest["name"], manifest["policy"],
                       manifest["backbone_fingerprint"], manifest["files"], manifest["inputs"])


def _read_json_member(root: Path, rel: str) -> Any:
    try:
        return json.loads((root / rel).read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleError(f"{root / rel}: not valid JSON ({type(exc).__name__}: {exc})") from exc


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest, after checking its format version, schema, required files, the sha256 of every
    file it lists, every JSON file's schema and its own fingerprint. Raises only BundleError."""
    root = Path(bundle_dir)
    mpath = root / MANIFEST
    if root.name.startswith(".") and root.name.endswith(".tmp"):
        raise BundleError(f"{root}: an unfinished export (atomic_dir's temporary name), not a bundle")
    if not mpath.is_file():
        raise BundleError(f"{root}: not a bundle (no {MANIFEST}; an interrupted export leaves none)")
    manifest = _read_json_member(root, MANIFEST)
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT and \
            manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{mpath}: bundle format version {manifest.get('format_version')!r}; this stage1 "
                          f"({__version__}) reads version {FORMAT_VERSION}: export the bundle again")
    try:
        validate_json(manifest, "bundle", source=str(mpath))
    except SchemaError as exc:
        raise BundleError(str(exc)) from exc
    missing = [rel for rel in REQUIRED_FILES if rel not in manifest["files"]]
    if missing:
        raise BundleError(f"{mpath}: the manifest does not list {missing}; every bundle needs {REQUIRED_FILES}")
    for rel, expected in manifest["files"].items():
        try:
            path = _safe_member(root, rel)
            if not path.is_file():
                raise BundleError(f"{root}: file {rel} listed in the manifest is missing")
            actual = sha256_file(path)
        except OSError as exc:  # a name too long, a loop of links, a permission problem
            raise BundleError(f"{root}: cannot read {rel!r} listed in the manifest ({exc})") from exc
        if actual != expected:
            raise BundleError(
                f"{path}: sha256 {actual[:12]}… does not match the manifest ({expected[:12]}…); "
                "the bundle was modified or corrupted"
            )
    # nothing unverified rides along: every file in the directory is listed (and so hash-checked)
    unlisted = sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if not p.is_dir() and str(p.relative_to(root)) not in manifest["files"]
        and str(p.relative_to(root)) not in (MANIFEST, SIGNATURE)
    )
    if unlisted:
        raise BundleError(f"{root}: {unlisted[:5]} are in the bundle directory but not in its manifest; "
                          "a bundle holds only files whose sha256 it records")
    for rel, schema in JSON_SCHEMAS.items():
        if rel in manifest["files"]:
            try:
                validate_json(_read_json_member(root, rel), schema, source=str(root / rel))
            except SchemaError as exc:
                raise BundleError(str(exc)) from exc
    if _manifest_fingerprint(manifest) != manifest["fingerprint"]:
        raise BundleError(f"{mpath}: the fingerprint does not match the manifest's contents (the manifest was "
                          "edited by hand or damaged); export the bundle again")
    return manifest


def _locate_weights(spec: BackboneSpec, weights_override: str | Path | None) -> BackboneSpec:
    """Find the backbone weights on this machine (paths differ between machines; hashes must not)."""
    if spec.weights_kind == "random":
        return spec
    if weights_override is not None:
        path = Path(weights_override)
    elif spec.weights_kind == "package":
        path = demo_package_weights_file()
    elif spec.weights_kind == "hf-cache":
        path = _hf_cached_weights(spec.name)
    else:
        path = Path(spec.weights_file or "")
    if not path.is_file():
        raise BundleError(f"backbone weights for {spec.name} not found at {path}; pass weights_override")
    data = spec.to_json()
    data["weights_file"] = str(path)
    return BackboneSpec.from_json(data)


def _backbone_fingerprint(spec: BackboneSpec) -> str:
    """Recomputed from the spec's fields: the stored `fingerprint` alone would let an edited
    backbone.json pass."""
    return backbone_fingerprint(name=spec.name, weights_kind=spec.weights_kind, weights_sha256=spec.weights_sha256,
                                pooling=spec.pooling, model_kwargs=spec.model_kwargs, seed=spec.seed,
                                input_size=spec.input_size)


ImageInput = str | Path | bytes | Any  # path, JPEG/PNG bytes, or a PIL image


class Predictor:
    """Applies a bundle to raw images: decode, transform, backbone, head, decision policy."""

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], *, device: str = "auto",
                 weights_override: str | Path | None = None):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        read = lambda rel: _read_json_member(bundle_dir, rel)
        self.spec = _locate_weights(BackboneSpec.from_json(read("backbone.json")), weights_override)
        actual = _backbone_fingerprint(self.spec)
        if actual != manifest["backbone_fingerprint"] or self.spec.fingerprint != actual:
            raise BundleError(f"{bundle_dir}/backbone.json: backbone fingerprint {actual[:12]}… (from its fields) "
                              f"does not match the manifest ({manifest['backbone_fingerprint'][:12]}…)")
        self.preprocessing = read("preprocessing.json")
        policy_files = {rel: read(rel) for rel in POLICY_FILES if rel in manifest["files"]}
        if policy_files["policy.json"].get("policy") != manifest["policy"]:
            raise BundleError(f"{bundle_dir}/policy.json: policy {policy_files['policy.json'].get('policy')!r} "
                              f"does not match the manifest ({manifest['policy']!r})")
        try:
            self.policy = FittedPolicy.from_files(policy_files)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{bundle_dir}: inconsistent policy files ({type(exc).__name__}: {exc})") from exc
        self.metrics = read("metrics.json")
        self.device = resolve_device(device)
        try:
            backbone = build_backbone(self.spec, verify=True).to(self.device)
        except BackboneError as exc:
            raise BundleError(f"{bundle_dir}: {exc}") from exc
        # a fine-tuned bundle carries DoRA/LoRA adapters (or merged weights); folded in for speed
        from .adapters import attach_bundle_adapters

        self.backbone = attach_bundle_adapters(backbone, bundle_dir, manifest, merge=True)
        try:
            self.head = load_head(bundle_dir).model
        except Exception as exc:  # safetensors/JSON/shape errors: the head files do not fit together
            raise BundleError(f"{bundle_dir}: cannot build the head from {HEAD_WEIGHTS} + {HEAD_META} "
                              f"({type(exc).__name__}: {exc})") from exc
        self.transform = eval_transform(self.preprocessing)
        self.draft = draft_size(self.preprocessing)
        self.threshold = float(self.policy.threshold.threshold)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def fine_tuned(self) -> bool:
        """Whether the backbone carries adapters (or merged weights): its features are not the frozen store's."""
        from .adapters import ADAPTER_META

        return ADAPTER_META in self.manifest["files"]

    def feature_target(self, config: FeatureConfig = FeatureConfig()) -> StoreTarget:
        """The feature store of this bundle's frozen backbone and preprocessing (the store its training
        read, when the preprocessing is the same), for filling it chunk by chunk on many workers; the
        precision and JPEG drafting are the bundle's, batch size and device `config`'s."""
        if self.fine_tuned:
            raise BundleError(f"{self.bundle_dir}: a fine-tuned backbone has no frozen feature store")
        pre = {k: v for k, v in self.preprocessing.items() if k != "precision"}
        precision = self.preprocessing["precision"]
        config = dataclasses.replace(config, precision=precision, jpeg_draft=bool(pre.get("jpeg_draft")))
        return store_target(self.spec, pre, config, dim=feature_dim(build_skeleton(self.spec), self.spec.pooling))

    def _tensor(self, image: ImageInput) -> torch.Tensor:
        name = str(image) if isinstance(image, (str, Path)) else None
        try:
            if name is not None:
                image = Path(image).read_bytes()
            return self.transform(decode_image(image, draft_size=self.draft))
        except OSError as exc:  # a directory, a missing or unreadable file
            raise ImageDecodeError(f"{name}: cannot read the file ({exc.strerror or exc})") from exc
        except ImageDecodeError as exc:
            if name is None:
                raise
            raise ImageDecodeError(f"{name}: {exc}") from exc

    def features(self, images: Sequence[ImageInput], *, batch_size: int = 32) -> np.ndarray:
        """Pooled backbone features, rounded through fp16 exactly like the feature store."""
        return self._features(images, batch_size=batch_size, failed=None)

    def _features(self, images: Sequence[ImageInput], *, batch_size: int,
                  failed: dict[int, str] | None) -> np.ndarray:
        """With `failed` (a dict), an image that cannot be read or decoded is recorded there by index with
        its reason and left out; without it, the first such image raises ImageDecodeError."""
        out = []
        bf16 = self.preprocessing["precision"] == "bf16"
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                tensors = []
                for i, im in enumerate(images[start:start + batch_size], start):
                    try:
                        tensors.append(self._tensor(im))
                    except ImageDecodeError as exc:
                        if failed is None:
                            raise
                        failed[i] = str(exc)
                if not tensors:
                    continue
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                    feats = embed(self.backbone, torch.stack(tensors).to(self.device), self.spec.pooling)
                out.append(feats.float().cpu().numpy().astype(np.float16).astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def apply_policy(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """The decision policy on (cached or fresh) features: p_raw, p, accepted, decision, set."""
        out = head_outputs(self.head, features)
        return self.policy.apply(out["logits"], out.get("gate_logit"))

    def predict_proba(self, images: Sequence[ImageInput], *, batch_size: int = 32) -> np.ndarray:
        """Calibrated p(roadwork) per image."""
        return self.apply_policy(self.features(images, batch_size=batch_size))["p"]

    def predict(self, images: Sequence[ImageInput], *, batch_size: int = 32,
                errors: str = "raise") -> list[dict[str, Any]]:
        """Per image: calibrated p(roadwork), the raw head probability, the decision (None when the policy
        abstains), and the prediction set ([] when abstaining).

        errors="raise": the first image that cannot be read or decoded raises ImageDecodeError (naming
        the file when given a path). errors="report": that image's result is {"error": reason} and the
        others are predicted as usual.
        """
        if errors not in ("raise", "report"):
            raise ValueError(f"errors must be 'raise' or 'report', got {errors!r}")
        failed: dict[int, str] | None = {} if errors == "report" else None
        feats = self._features(images, batch_size=batch_size, failed=failed)
        out = self.apply_policy(feats) if len(feats) else None
        sets = {-1: [], 0: [0], 1: [1], 2: [0, 1]}
        results: list[dict[str, Any]] = []
        row = 0
        for i in range(len(images)):
            if failed and i in failed:
                results.append({"error": failed[i]})
                continue
            decision = int(out["decision"][row])
            results.append({
                "p_roadwork": float(out["p"][row]), "p_roadwork_raw": float(out["p_raw"][row]),
                "decision": None if decision < 0 else decision, "abstain": bool(decision < 0),
                "prediction_set": sets[int(out["set"][row])],
                "label": "abstain" if decision < 0 else ("roadwork" if decision == 1 else "no_roadwork"),
                "policy": self.policy.policy,
            })
            row += 1
        return results

    def __call__(self, image: ImageInput) -> float:
        """The subnet miner's interface: one image (PIL or bytes) in, p(roadwork) out."""
        return float(self.predict_proba([image])[0])


def load_bundle(bundle_dir: str | Path, *, device: str = "auto", weights_override: str | Path | None = None,
                expected_fingerprint: str | None = None, public_key: str | Path | None = None) -> Predictor:
    """Verify a bundle (read_manifest) and build its Predictor.

    `expected_fingerprint`: the fingerprint recorded when the bundle was registered; a bundle whose
    files were edited and re-hashed has another fingerprint and is refused. `public_key` (default
    `$STAGE1_BUNDLE_PUBLIC_KEY`): when set, the manifest must carry a valid signature by that key.
    Raises only BundleError.
    """
    from .home import bundle_public_key

    root = Path(bundle_dir)
    manifest = read_manifest(root)
    if expected_fingerprint is not None and manifest["fingerprint"] != expected_fingerprint:
        raise BundleError(f"{root}: bundle fingerprint {manifest['fingerprint'][:12]}… is not the registered "
                          f"{expected_fingerprint[:12]}…; the bundle was changed after registration: use the "
                          "registered bundle (download it again from MLflow) or register this one")
    key = public_key if public_key is not None else bundle_public_key()
    if key is not None:
        try:
            verify_manifest(root, key)
        except SignatureError as exc:
            raise BundleError(str(exc)) from exc
    return Predictor(root, manifest, device=device, weights_override=weights_override)

