import numpy as np
import pytest

from stage1core.features import FeatureConfig, FeatureStore, extract_features
from stage1core.sources import SourceConfig, load_sources

CFG = FeatureConfig(batch_size=16, num_workers=0, shard_size=32)


@pytest.fixture
def samples(tiny_demo):
    return load_sources([SourceConfig(path=str(tiny_demo), kind="folder")]).samples


def test_extract_store_and_rerun_computes_nothing(tmp_path, samples, tiny_eva_config):
    info = extract_features(samples, tiny_eva_config, CFG, store_root=tmp_path, progress=False)
    assert info.n_samples == len(samples) == info.n_computed and not info.failed
    store = FeatureStore(info.store_dir)
    ids = [s.sample_id for s in samples]
    feats = store.load(ids)
    assert feats.shape == (len(samples), 64) and np.isfinite(feats).all()
    shards = sorted(p.name for p in (tmp_path / info.store_key[:24] / "shards").glob("*.npy"))
    assert len(shards) == int(np.ceil(len(samples) / CFG.shard_size))
    assert np.load(next((tmp_path / info.store_key[:24] / "shards").glob("*.npy"))).dtype == np.float16
    assert store.verify() == []
    again = extract_features(samples, tiny_eva_config, CFG, store_root=tmp_path, progress=False)
    assert again.n_computed == 0 and again.fingerprint == info.fingerprint


def test_incremental_run_embeds_only_new_images_and_matches_full_run(tmp_path, samples, tiny_eva_config):
    old, new = samples[:100], samples[100:]
    extract_features(old, tiny_eva_config, CFG, store_root=tmp_path / "inc", progress=False)
    info = extract_features(samples, tiny_eva_config, CFG, store_root=tmp_path / "inc", progress=False)
    assert info.n_computed == len(new)
    full = extract_features(samples, tiny_eva_config, CFG, store_root=tmp_path / "full", progress=False)
    ids = [s.sample_id for s in samples]
    # equal up to rounding, not bit for bit: the incremental run embeds the new images in other batches
    # than the full run, and BLAS/oneDNN choose kernels (and summation order) by batch shape on some CPUs
    # (EfficientNet-Lite0 in fp32 on this project's AMD EPYC: 1 feature in 200 ends one fp16 step apart).
    # A wrong row, model or preprocessing moves features by their own scale, far beyond this tolerance.
    inc, ref = FeatureStore(info.store_dir).load(ids), FeatureStore(full.store_dir).load(ids)
    np.testing.assert_allclose(inc, ref, rtol=2**-8, atol=2e-3)
    assert np.abs(ref).max() > 0.5  # the tolerance is small against the features' scale


def test_interrupted_shard_is_recomputed(tmp_path, samples, tiny_eva_config):
    info = extract_features(samples, tiny_eva_config, CFG, store_root=tmp_path, progress=False)
    shard_dir = tmp_path / info.store_key[:24] / "shards"
    sidecar = sorted(shard_dir.glob("*.json"))[0]
    n_lost = len(__import__("json").loads(sidecar.read_text())["sample_ids"])
    sidecar.unlink()  # a crash between the .npy and its sidecar: the shard does not count
    again = extract_features(samples, tiny_eva_config, CFG, store_root=tmp_path, progress=False)
    assert again.n_computed == n_lost


def test_precision_and_draft_are_part_of_the_store_key(tmp_path, samples, tiny_eva_config):
    a = extract_features(samples[:8], tiny_eva_config, FeatureConfig(batch_size=16, num_workers=0, precision="fp32"),
                         store_root=tmp_path, progress=False)
    b = extract_features(samples[:8], tiny_eva_config, FeatureConfig(batch_size=16, num_workers=0, precision="bf16"),
                         store_root=tmp_path, progress=False)
    c = extract_features(samples[:8], tiny_eva_config, FeatureConfig(batch_size=16, num_workers=0, jpeg_draft=False),
                         store_root=tmp_path, progress=False)
    assert len({a.store_key, b.store_key, c.store_key}) == 3
    ids = sorted(s.sample_id for s in samples[:8])
    fa, fb = FeatureStore(a.store_dir).load(ids), FeatureStore(b.store_dir).load(ids)
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    assert cos.min() > 0.98  # bf16 is close to fp32, not identical


def test_undecodable_images_are_reported_not_stored(tmp_path, samples, tiny_eva_config):
    from dataclasses import replace

    bad_file = tmp_path / "broken.jpg"
    bad_file.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad = replace(samples[0], sample_id="f" * 64, locator=str(bad_file))
    info = extract_features([bad, *samples[:5]], tiny_eva_config, CFG, store_root=tmp_path, progress=False)
    assert [f["sample_id"] for f in info.failed] == ["f" * 64] and "broken.jpg" in info.failed[0]["locator"]
    assert info.n_samples == 5
    assert FeatureStore(info.store_dir).missing(["f" * 64]) == ["f" * 64]


def test_workers_give_the_same_features(tmp_path, samples, tiny_eva_config):
    a = extract_features(samples[:20], tiny_eva_config, CFG, store_root=tmp_path / "a", progress=False)
    b = extract_features(samples[:20], tiny_eva_config, FeatureConfig(batch_size=7, num_workers=2),
                         store_root=tmp_path / "b", progress=False)
    ids = sorted(s.sample_id for s in samples[:20])
    np.testing.assert_allclose(FeatureStore(a.store_dir).load(ids), FeatureStore(b.store_dir).load(ids), atol=2e-3)


def test_auto_precision_is_bf16_for_transformers_with_bf16_kernels_only(monkeypatch, tmp_path, samples,
                                                                         tiny_eva_config):
    import torch

    from stage1core import features
    from stage1core.backbone import BackboneConfig, build_skeleton, resolve_backbone

    cpu = torch.device("cpu")
    vit = build_skeleton(resolve_backbone(tiny_eva_config))
    cnn = build_skeleton(resolve_backbone(BackboneConfig(name="tf_efficientnet_lite0", weights="random",
                                                         pooling="avg")))
    for supported in (True, False):
        monkeypatch.setattr(features, "bf16_supported", lambda device, s=supported: s)
        assert features.resolve_precision("auto", vit, cpu) == ("bf16" if supported else "fp32")
        assert features.resolve_precision("auto", cnn, cpu) == "fp32"
        assert features.resolve_precision("fp32", vit, cpu) == "fp32"
    # the resolved precision, not "auto", keys the store and is recorded for the bundle
    monkeypatch.setattr(features, "bf16_supported", lambda device: True)
    auto = extract_features(samples[:8], tiny_eva_config, FeatureConfig(batch_size=16, num_workers=0),
                            store_root=tmp_path, progress=False)
    bf16 = extract_features(samples[:8], tiny_eva_config, FeatureConfig(batch_size=16, num_workers=0,
                                                                        precision="bf16"),
                            store_root=tmp_path, progress=False)
    assert auto.store_key == bf16.store_key and bf16.n_computed == 0
    assert FeatureStore(auto.store_dir).meta["precision"] == "bf16"


def test_a_second_writer_waits_for_the_store_lock_then_embeds_only_what_is_missing(tmp_path, samples,
                                                                                    tiny_eva_config):
    """The store lock of `fill_feature_store`, the one path into a store (frozen and adapted features)."""
    import threading
    import time
    from pathlib import Path

    from filelock import FileLock

    first = extract_features(samples[:4], tiny_eva_config, CFG, store_root=tmp_path, progress=False)
    holder = FileLock(str(Path(first.store_dir) / "store.lock"))  # another process writing this store
    holder.acquire()
    messages, results = [], []
    waiter = threading.Thread(target=lambda: results.append(extract_features(
        samples[:6], tiny_eva_config, CFG, store_root=tmp_path, progress=False, log_fn=messages.append)))
    waiter.start()
    deadline = time.monotonic() + 60
    while not messages and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert messages and "waiting for it" in messages[0]
        time.sleep(0.3)
        assert waiter.is_alive() and not results  # still blocked: nothing embedded behind the holder's back
    finally:
        holder.release()
    waiter.join(120)
    assert results[0].n_computed == 2 and results[0].n_samples == 6
