import shutil

import numpy as np
import pytest
from PIL import Image

from stage1core.backbone import resolve_backbone
from stage1core.bundle import BundleError, export_bundle, load_bundle, read_manifest
from stage1core.features import FeatureConfig, FeatureStore, extract_features
from stage1core.guarantees import GuaranteeConfig, fnr_threshold
from stage1core.sources import SourceConfig, load_sources
from stage1core.train import TrainConfig, fit_head, predict_positive, save_head
from tests.common import edited_json

CFG = FeatureConfig(batch_size=16, num_workers=0)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_demo):
    from stage1core.backbone import BackboneConfig
    from tests.common import TINY_EVA

    backbone = BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling="cls+avg",
                              model_kwargs=dict(TINY_EVA), input_size=32)
    root = tmp_path_factory.mktemp("bundle")
    samples = load_sources([SourceConfig(path=str(tiny_demo), kind="folder")]).samples
    info = extract_features(samples, backbone, CFG, store_root=root / "features", progress=False)
    store = FeatureStore(info.store_dir)
    ids = [s.sample_id for s in samples]
    x, y = store.load(ids), np.array([s.label for s in samples])
    trained = fit_head(x, y, x, y, config=TrainConfig(epochs=3))
    save_head(root / "head", trained)
    p = predict_positive(trained.model, x)
    thr = fnr_threshold(p[y == 1], GuaranteeConfig(alpha=0.2, delta=0.2))
    policy_files = {"thresholds.json": {"policy": "threshold", **thr.to_json()},
                    "policy.json": {"policy": "threshold", "gate_min_confidence": None}}
    spec = resolve_backbone(backbone)
    pre = {**store.meta["preprocessing"], "precision": store.meta["precision"]}
    bundle = export_bundle(
        root / "bundles", name="test", backbone=spec, preprocessing=pre, head_dir=root / "head",
        policy_files=policy_files, metrics={"mcc": 0.1}, model_card="# card\n",
        inputs={"data_fingerprint": "d" * 64}, json_files={"test_predictions.json": {"p": p.tolist()}},
    )
    return {"bundle": bundle, "samples": samples, "p": p, "threshold": thr.threshold, "root": root}


def test_round_trip_reproduces_cached_predictions_from_raw_images(built):
    predictor = load_bundle(built["bundle"].path, device="cpu")
    paths = [s.locator for s in built["samples"]]
    p = predictor.predict_proba(paths)
    np.testing.assert_allclose(p, built["p"], atol=1e-5)
    out = predictor.predict(paths[:3])
    assert [r["decision"] for r in out] == [int(v >= built["threshold"]) for v in p[:3]]
    # the miner interface: PIL image or bytes in, a float in [0, 1] out
    image = Image.open(paths[0])
    assert predictor(image) == pytest.approx(p[0], abs=1e-5)
    assert predictor(open(paths[0], "rb").read()) == pytest.approx(p[0], abs=1e-5)


def test_pyfunc_model_serves_base64_images_as_the_predictor_does(built):
    """tasks/pyfunc_model.py (the MLflow model registered with every bundle) without a registry: the
    flow tests load it through MLflow; this checks its load_context and base64 input on its own."""
    import base64
    from types import SimpleNamespace

    import pandas as pd

    from tasks.pyfunc_model import BundleModel

    model = BundleModel()
    model.load_context(SimpleNamespace(artifacts={"bundle": built["bundle"].path}, model_config={}))
    paths = [s.locator for s in built["samples"][:3]]
    frame = pd.DataFrame({"image": [base64.b64encode(open(p, "rb").read()).decode() for p in paths]})
    out = model.predict(None, frame)
    expected = load_bundle(built["bundle"].path, device="cpu").predict(paths)  # the same batch: equal outputs
    assert list(out["p_roadwork"]) == [r["p_roadwork"] for r in expected]
    assert list(out["decision"]) == [r["decision"] for r in expected]


def test_export_is_content_addressed_and_idempotent(built, tmp_path):
    manifest = read_manifest(built["bundle"].path)
    assert manifest["backbone_random_init"] is True
    assert set(manifest["files"]) >= {"head.safetensors", "backbone.json", "thresholds.json", "manifest.json"} - {
        "manifest.json"}
    assert built["bundle"].path.endswith(built["bundle"].fingerprint[:12])


def _copy(built, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(built["bundle"].path, dst)
    return dst


@pytest.mark.parametrize("name", ["head.safetensors", "thresholds.json", "backbone.json", "model_card.md"])
def test_tampered_file_is_refused(built, tmp_path, name):
    dst = _copy(built, tmp_path)
    path = dst / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(dst)


def test_schema_violation_with_matching_hash_is_refused(built, tmp_path):
    from stage1core.fingerprint import sha256_file

    dst = _copy(built, tmp_path)
    with edited_json(dst / "thresholds.json") as thr:
        thr["alpha"] = 3.0  # outside (0, 1)
    with edited_json(dst / "manifest.json") as manifest:
        manifest["files"]["thresholds.json"] = sha256_file(dst / "thresholds.json")
    with pytest.raises(BundleError, match="thresholds.*alpha"):
        load_bundle(dst)


def test_manifest_paths_cannot_escape(built, tmp_path):
    dst = _copy(built, tmp_path)
    with edited_json(dst / "manifest.json") as manifest:
        manifest["files"]["../outside.json"] = "0" * 64
    with pytest.raises(BundleError, match="schema"):
        load_bundle(dst)


def test_missing_manifest_or_file_is_refused(built, tmp_path):
    dst = _copy(built, tmp_path)
    (dst / "metrics.json").unlink()
    with pytest.raises(BundleError, match="metrics.json.*missing"):
        load_bundle(dst)
    (dst / "manifest.json").unlink()
    with pytest.raises(BundleError, match="not a bundle"):
        load_bundle(dst)


def test_unlisted_file_in_the_bundle_is_refused(built, tmp_path):
    dst = _copy(built, tmp_path)
    (dst / "extra.py").write_text("print('not verified')\n")
    with pytest.raises(BundleError, match="not in its manifest"):
        load_bundle(dst)
