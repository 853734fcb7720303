import pytest
import torch

from stage1core.backbone import (
    DEMO_PACKAGE_WEIGHTS,
    BackboneConfig,
    BackboneError,
    build_backbone,
    data_config,
    embed,
    feature_dim,
    load_backbone,
    resolve_backbone,
)
from tests.common import TINY_EVA


def test_demo_package_weights_load_by_position_and_are_pretrained():
    model, spec = load_backbone(BackboneConfig(name="tf_efficientnet_lite0", weights=DEMO_PACKAGE_WEIGHTS,
                                               pooling="avg"))
    assert spec.weights_kind == "package" and len(spec.weights_sha256) == 64
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    # the stem's batch-norm statistics of a trained net are not the init values (0 mean, 1 var)
    assert not torch.allclose(model.bn1.running_var, torch.ones_like(model.bn1.running_var))
    cfg = data_config(model)
    assert cfg["input_size"] == [3, 224, 224] and cfg["mean"] == [0.5, 0.5, 0.5]
    out = embed(model, torch.randn(2, 3, 224, 224), "avg")
    assert out.shape == (2, feature_dim(model, "avg")) == (2, 1280)


def test_random_init_is_explicit_seeded_and_fingerprinted(tiny_eva_config):
    a, spec_a = load_backbone(tiny_eva_config)
    b, _ = load_backbone(tiny_eva_config)
    assert spec_a.weights_kind == "random" and spec_a.weights_sha256 is None
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    other = resolve_backbone(BackboneConfig(**{**tiny_eva_config.__dict__, "seed": 1}))
    assert other.fingerprint != spec_a.fingerprint


@pytest.mark.parametrize("pooling,mult", [("cls", 1), ("avg", 1), ("cls+avg", 2)])
def test_eva_pooling(pooling, mult):
    cfg = BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling=pooling,
                         model_kwargs=dict(TINY_EVA), input_size=32)
    model, spec = load_backbone(cfg)
    x = torch.randn(3, 3, 32, 32)
    out = embed(model, x, pooling)
    assert out.shape == (3, TINY_EVA["embed_dim"] * mult)
    tokens = model.forward_features(x)
    prefix = model.num_prefix_tokens
    assert prefix == 5  # CLS + 4 registers in DINOv3
    if pooling == "cls":
        torch.testing.assert_close(out, tokens[:, 0])
    elif pooling == "avg":  # patch tokens only: registers and CLS excluded
        torch.testing.assert_close(out, tokens[:, prefix:].mean(1))


def test_fingerprint_depends_on_pooling_and_weights(tmp_path, tiny_eva_config):
    a = resolve_backbone(tiny_eva_config)
    b = resolve_backbone(BackboneConfig(**{**tiny_eva_config.__dict__, "pooling": "cls"}))
    assert a.fingerprint != b.fingerprint


def test_cnn_refuses_cls_pooling():
    spec = resolve_backbone(BackboneConfig(name="tf_efficientnet_lite0", weights="random", pooling="cls"))
    with pytest.raises(BackboneError, match="no CLS token"):
        build_backbone(spec)


def test_missing_weights_file_and_offline_cache_errors(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        resolve_backbone(BackboneConfig(weights=str(tmp_path / "nope.safetensors")))
    with pytest.raises(BackboneError, match="offline Hugging Face cache"):
        resolve_backbone(BackboneConfig(name="vit_small_patch16_dinov3.lvd1689m", weights="pretrained"))


def test_weights_file_is_hash_checked(tmp_path):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, **TINY_EVA)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    cfg = BackboneConfig(name="vit_small_patch16_dinov3", weights=str(path), pooling="cls", model_kwargs=dict(TINY_EVA))
    loaded, spec = load_backbone(cfg)
    for (name, p), q in zip(loaded.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BackboneError, match="sha256"):
        build_backbone(spec, verify=True)


def test_offline_hugging_face_cache_is_found_and_hashed(tmp_path, monkeypatch):
    """The real loading path: timm pretrained weights resolved from a (fake, local) hub cache."""
    import timm
    from safetensors.torch import save_file

    donor = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, **TINY_EVA)
    repo = tmp_path / "hub" / "models--timm--vit_small_patch16_dinov3.lvd1689m"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = BackboneConfig(name="vit_small_patch16_dinov3.lvd1689m", weights="pretrained", pooling="cls",
                         model_kwargs=dict(TINY_EVA))
    model, spec = load_backbone(cfg)
    assert spec.weights_kind == "hf-cache" and spec.weights_file.endswith("model.safetensors")
    for (name, p), q in zip(model.state_dict().items(), donor.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
