"""Bundle integrity and safety: flipped bytes, schema and manifest edits, paths escaping the bundle, a
killed export, no unpickling, fuzzed manifests, a half-done registration, `stage1 predict` over bad inputs,
forgeries and signatures. docs/reliability.md maps each fault to its test."""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stage1core.bundle import BundleError, export_bundle, load_bundle, read_manifest
from stage1core.features import FeatureStore
from stage1core.fingerprint import fingerprint, sha256_file
from stage1core.images import ImageDecodeError
from tests.common import HANG_TIMEOUT_S, edited_json
from tests.faults import (
    FORK,
    ROOT,
    cli_env,
    encode,
    json_values,
    png_claiming,
    run_stage1,
    text,
    write,
)


@pytest.fixture(scope="module")
def bundle_parts(reference, crash_samples, tiny_eva_module, tmp_path_factory):
    from stage1core.backbone import resolve_backbone
    from stage1core.guarantees import GuaranteeConfig, fnr_threshold
    from stage1core.train import TrainConfig, fit_head, predict_positive, save_head

    root = tmp_path_factory.mktemp("bundle")
    store = FeatureStore(reference["info"]["store_dir"])
    by_id = {s.sample_id: s for s in crash_samples}
    x = store.load(reference["ids"])
    y = np.array([by_id[i].label for i in reference["ids"]])
    trained = fit_head(x, y, x, y, config=TrainConfig(epochs=2))
    save_head(root / "head", trained)
    p = predict_positive(trained.model, x)
    thr = fnr_threshold(p[y == 1], GuaranteeConfig(alpha=0.3, delta=0.3))
    kwargs = dict(
        name="rel", backbone=resolve_backbone(tiny_eva_module),
        preprocessing={**store.meta["preprocessing"], "precision": store.meta["precision"]}, head_dir=root / "head",
        policy_files={"thresholds.json": {"policy": "threshold", **thr.to_json()},
                      "policy.json": {"policy": "threshold", "gate_min_confidence": None}},
        metrics={"mcc": 0.1}, model_card="# card\n", inputs={"data_fingerprint": "d" * 64},
        files={"plots/reliability.png": encode(Image.new("RGB", (4, 4)), "PNG")},
        json_files={"test_predictions.json": {"p": p.tolist()}},
    )
    bundle = export_bundle(root / "bundles", **kwargs)
    return {"bundle": Path(bundle.path), "kwargs": kwargs, "root": root, "image": crash_samples[0].locator}


def _copy_bundle(parts, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(parts["bundle"], dst)
    return dst


def _resign(dst: Path, **changes) -> None:
    """Rewrite the manifest after a change, with matching hashes and fingerprint: only deeper checks can tell."""
    with edited_json(dst / "manifest.json") as manifest:
        manifest.update(changes)
        manifest["files"] = {rel: sha256_file(dst / rel) for rel in manifest["files"]}
        manifest["fingerprint"] = fingerprint("bundle", manifest["format_version"], manifest["name"],
                                              manifest["policy"], manifest["backbone_fingerprint"], manifest["files"],
                                              manifest["inputs"])


def test_the_untouched_bundle_loads(bundle_parts):
    predictor = load_bundle(bundle_parts["bundle"], device="cpu")
    assert 0.0 <= predictor(bundle_parts["image"]) <= 1.0


BUNDLE_FILES = ["head.safetensors", "head.json", "backbone.json", "preprocessing.json", "thresholds.json",
                "policy.json", "metrics.json", "model_card.md", "test_predictions.json", "plots/reliability.png"]


@pytest.mark.parametrize("rel", BUNDLE_FILES)
def test_a_flipped_byte_in_any_bundle_file_is_refused(bundle_parts, tmp_path, rel):
    dst = _copy_bundle(bundle_parts, tmp_path)
    data = bytearray((dst / rel).read_bytes())
    data[len(data) // 2] ^= 0x01
    (dst / rel).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{rel.split('/')[-1]}: sha256 .* does not match the manifest"):
        load_bundle(dst, device="cpu")


@pytest.mark.parametrize(("rel", "edit", "match"), [
    ("thresholds.json", lambda d: {**d, "alpha": 3.0}, "thresholds.json"),
    ("preprocessing.json", lambda d: {k: v for k, v in d.items() if k != "input_size"}, "preprocessing.json"),
    ("backbone.json", lambda d: {**d, "pooling": 7}, "backbone.json"),
    ("policy.json", lambda d: {**d, "policy": "magic"}, "policy.json"),
    ("thresholds.json", lambda d: "not json {", "thresholds.json: not valid JSON"),
    ("head.json", lambda d: {**d, "in_dim": 3}, "cannot build the head"),
])
def test_schema_or_content_violations_with_matching_hashes_are_refused(bundle_parts, tmp_path, rel, edit, match):
    dst = _copy_bundle(bundle_parts, tmp_path)
    new = edit(json.loads((dst / rel).read_text()))
    (dst / rel).write_text(new if isinstance(new, str) else json.dumps(new))
    _resign(dst)
    with pytest.raises(BundleError, match=match):
        load_bundle(dst, device="cpu")


def test_other_format_version_is_refused_by_name(bundle_parts, tmp_path):
    dst = _copy_bundle(bundle_parts, tmp_path)
    _resign(dst, format_version=2)
    with pytest.raises(BundleError, match="bundle format version 2; .* reads version 1"):
        load_bundle(dst, device="cpu")


def test_backbone_fingerprint_mismatch_is_refused(bundle_parts, tmp_path):
    dst = _copy_bundle(bundle_parts, tmp_path)
    with edited_json(dst / "backbone.json") as backbone:
        backbone["pooling"] = "avg"  # schema-valid, a different backbone: different features
    _resign(dst)
    with pytest.raises(BundleError, match="backbone fingerprint .* does not match the manifest"):
        load_bundle(dst, device="cpu")


def test_edited_manifest_fields_are_refused(bundle_parts, tmp_path):
    dst = _copy_bundle(bundle_parts, tmp_path)
    with edited_json(dst / "manifest.json") as manifest:
        manifest["inputs"]["data_fingerprint"] = "e" * 64
    with pytest.raises(BundleError, match="fingerprint does not match the manifest's contents"):
        load_bundle(dst, device="cpu")
    _resign(dst, policy="gate")  # a consistent manifest that disagrees with policy.json
    with pytest.raises(BundleError, match="policy.json: policy 'threshold' does not match"):
        load_bundle(dst, device="cpu")


def test_a_manifest_that_omits_a_file_the_predictor_reads_is_refused(bundle_parts, tmp_path):
    dst = _copy_bundle(bundle_parts, tmp_path)
    with edited_json(dst / "manifest.json") as manifest:
        del manifest["files"]["metrics.json"]  # the file stays, unverified: it must not be read
    with pytest.raises(BundleError, match="does not list \\['metrics.json'\\]"):
        load_bundle(dst, device="cpu")


@pytest.mark.parametrize("escape", ["../outside.json", "/etc/passwd", "plots/../../x", "symlink"])
def test_manifest_paths_cannot_escape_the_bundle(bundle_parts, tmp_path, escape):
    dst = _copy_bundle(bundle_parts, tmp_path)
    outside = tmp_path / "outside.json"
    outside.write_text("{}")
    with edited_json(dst / "manifest.json") as manifest:
        if escape == "symlink":
            (dst / "link.json").symlink_to(outside)
            escape = "link.json"
        manifest["files"][escape] = sha256_file(outside)
    with pytest.raises(BundleError, match="schema|outside the bundle"):
        load_bundle(dst, device="cpu")


def _child_export(out_root: str, kwargs: dict) -> None:
    """Forked child: export a bundle with every file write slowed down, so a kill can land anywhere."""
    real = Path.write_bytes

    def slow(self, data):
        time.sleep(0.02)
        real(self, data[: len(data) // 2])  # a write that a kill can cut in half
        time.sleep(0.02)
        return real(self, data)

    Path.write_bytes = slow
    export_bundle(out_root, **kwargs)


def test_a_killed_export_never_leaves_a_directory_that_loads(bundle_parts, tmp_path):
    rng = random.Random(11)
    out = tmp_path / "bundles"
    killed = 0
    for attempt in range(5):
        kwargs = {**bundle_parts["kwargs"], "name": f"killed{attempt}"}
        proc = FORK.Process(target=_child_export, args=(str(out), kwargs))
        proc.start()
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(60)  # returns as soon as the killed child is reaped
        killed += proc.exitcode == -signal.SIGKILL
        for directory in [p for p in out.iterdir() if p.is_dir()] if out.exists() else []:
            try:
                manifest = read_manifest(directory)
            except BundleError:
                # a broken directory never sits under a final name; unfinished ones keep their temp name
                assert directory.name.startswith(".") and directory.name.endswith(".tmp"), directory.name
                continue
            # only a complete export verifies: every file is there with the bytes the manifest names
            assert not directory.name.startswith(".") and set(manifest["files"]) >= set(BUNDLE_FILES)
    assert killed >= 3
    info = export_bundle(out, **{**bundle_parts["kwargs"], "name": "killed0"})  # the rerun completes
    assert load_bundle(info.path, device="cpu").threshold >= 0


def test_nothing_on_the_load_path_unpickles():
    """Static: no pickle-family import, no torch.load without weights_only=True, no np.load(allow_pickle=True)."""
    offenders = []
    for path in sorted((ROOT / "stage1core").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib")
                       for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports pickle")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                kw = {k.arg: k.value for k in node.keywords}
                owner = ast.unparse(node.func.value)
                if node.func.attr == "load" and owner == "torch":
                    value = kw.get("weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        offenders.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
                if node.func.attr == "load" and owner in ("np", "numpy"):
                    value = kw.get("allow_pickle")
                    if isinstance(value, ast.Constant) and value.value is True:
                        offenders.append(f"{path.name}:{node.lineno} np.load(allow_pickle=True)")
    assert offenders == []


def test_a_bundle_loads_and_predicts_with_pickle_blocked(bundle_parts, monkeypatch):
    import _pickle
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling on the bundle load path")

    for module in (pickle, _pickle):
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    predictor = load_bundle(bundle_parts["bundle"], device="cpu")
    assert 0.0 <= predictor(Path(bundle_parts["image"]).read_bytes()) <= 1.0


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=json_values)
def test_random_manifests_only_ever_raise_bundle_error(doc, tmp_path):
    bundle = tmp_path / "fuzz"
    bundle.mkdir(exist_ok=True)
    (bundle / "a.json").write_text("{}")
    (bundle / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError):
        read_manifest(bundle)


MANIFEST_KEYS = ["format", "format_version", "name", "fingerprint", "files", "backbone_fingerprint", "policy",
                 "inputs", "code_version", "created_at", "backbone_random_init"]
file_names = st.sampled_from(BUNDLE_FILES + ["../x", "/abs", "a" * 300, ".", "plots", "nope.json", ""])
mutations = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(MANIFEST_KEYS), json_values),
    st.tuples(st.just("del"), st.sampled_from(MANIFEST_KEYS), st.none()),
    st.tuples(st.just("file"), file_names, st.sampled_from(["0" * 64, "f" * 64, 5, None])),
    st.tuples(st.just("drop"), file_names, st.none()),
), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=mutations, resign=st.booleans())
def test_mutated_manifests_only_ever_raise_bundle_error(bundle_parts, tmp_path, edits, resign):
    dst = tmp_path / "m"
    if not dst.exists():
        shutil.copytree(bundle_parts["bundle"], dst)
    original = (bundle_parts["bundle"] / "manifest.json").read_text()
    manifest = json.loads(original)
    for op, key, value in edits:
        if op == "set":
            manifest[key] = value
        elif op == "del":
            manifest.pop(key, None)
        elif op == "file" and isinstance(manifest.get("files"), dict):
            manifest["files"][key] = value
        elif op == "drop" and isinstance(manifest.get("files"), dict):
            manifest["files"].pop(key, None)
    if resign:
        try:  # a consistent fingerprint over whatever the fields now say, to reach the deeper checks
            manifest["fingerprint"] = fingerprint("bundle", manifest["format_version"], manifest["name"],
                                                  manifest["policy"], manifest["backbone_fingerprint"],
                                                  manifest["files"], manifest["inputs"])
        except (KeyError, TypeError, ValueError):
            pass
    (dst / "manifest.json").write_text(json.dumps(manifest))
    try:
        load_bundle(dst, device="cpu")
    except BundleError:
        return
    finally:
        (dst / "manifest.json").write_text(original)
    assert manifest["files"] == json.loads(original)["files"]  # loads only when nothing that matters changed


# ----------------------------------------------------------------------------------------------- registration


@pytest.fixture
def registry_home(tmp_path, monkeypatch, keep_mlflow_tracking_uri):
    from tasks import tracking

    monkeypatch.setenv("STAGE1_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'registry.db'}")
    monkeypatch.setattr(tracking, "_initialised", set())
    return tmp_path


@pytest.mark.parametrize("left", ["untagged_version", "version_without_alias"])
def test_a_half_registered_bundle_is_completed_not_registered_again(registry_home, bundle_parts, left):
    """What a kill between "Created version" and the tags or the alias leaves (an untagged version is what
    the old registration left; the current one creates a version with its tags in one call)."""
    from stage1core.bundle import BundleInfo
    from tasks.tracking import client, ensure_experiment, register_bundle

    manifest = read_manifest(bundle_parts["bundle"])
    bundle = BundleInfo(path=str(bundle_parts["bundle"]), fingerprint=manifest["fingerprint"], name="rel")
    mc = client()
    killed = mc.create_run(ensure_experiment("registry"), tags={"bundle_fingerprint": bundle.fingerprint})
    mc.create_registered_model("half")
    if left == "untagged_version":
        mc.create_model_version("half", source=str(bundle_parts["bundle"]), run_id=killed.info.run_id)
    else:
        mc.create_model_version("half", source=str(bundle_parts["bundle"]), run_id=killed.info.run_id,
                                tags={"bundle_fingerprint": bundle.fingerprint})
    rerun = mc.create_run(ensure_experiment("registry"))
    out = register_bundle.fn(rerun.info.run_id, bundle, model_name="half", alias="challenger",
                             tags={"data_fingerprint": "d" * 64}, description="the card")
    assert out["version"] == "1"
    versions = mc.search_model_versions("name = 'half'")
    assert [str(v.version) for v in versions] == ["1"]
    version = versions[0]
    assert version.tags["bundle_fingerprint"] == bundle.fingerprint and version.tags["data_fingerprint"] == "d" * 64
    assert version.description == "the card"
    assert str(mc.get_model_version_by_alias("half", "challenger").version) == "1"
    # a second registration of the same bundle is a no-op
    register_bundle.fn(rerun.info.run_id, bundle, model_name="half", alias="challenger", tags={}, description="x")
    assert len(mc.search_model_versions("name = 'half'")) == 1


# ----------------------------------------------------------------------------------------------- stage1 predict


@pytest.fixture(scope="module")
def predict_inputs(bundle_parts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    good = Path(bundle_parts["image"])
    folder = tmp / "folder"
    for i in range(3):
        write(folder / "sub" / f"img{i}.jpg", good.read_bytes())
    (tmp / "empty-folder").mkdir()
    return {"good": good, "empty": write(tmp / "empty.jpg", b""),
            "bomb": write(tmp / "bomb.png", png_claiming(20000, 20000)), "folder": folder,
            "empty_folder": tmp / "empty-folder", "tmp": tmp}


@pytest.mark.slow
def test_predict_reports_each_bad_input_and_predicts_the_others(bundle_parts, predict_inputs):
    i = predict_inputs
    args = ["predict", str(bundle_parts["bundle"]), str(i["good"]), str(i["empty"]), str(i["folder"]), str(i["bomb"]),
            str(i["empty_folder"]), str(i["good"])]
    proc = run_stage1(args, cli_env(i["tmp"] / "home"), i["tmp"], timeout=HANG_TIMEOUT_S)
    out, err = text(proc)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in out + err
    lines = [json.loads(x) for x in out.splitlines()]
    by_image = {}
    for line in lines:
        by_image.setdefault(line["image"], []).append(line)
    assert len(by_image[str(i["good"])]) == 2 and all("p_roadwork" in r for r in by_image[str(i["good"])])
    assert [r["image"] for r in lines if "p_roadwork" in r].count(str(i["good"])) == 2
    assert sorted(k for k in by_image if "folder/sub" in k) == [str(i["folder"] / "sub" / f"img{n}.jpg")
                                                                 for n in range(3)]
    assert "empty input (0 bytes)" in by_image[str(i["empty"])][0]["error"]
    assert "too large" in by_image[str(i["bomb"])][0]["error"]
    assert "no images" in by_image[str(i["empty_folder"])][0]["error"]
    for bad in ("empty", "bomb", "empty_folder"):
        assert f"stage1: {i[bad]}: " in err
    assert "stage1: 3 of 8 inputs could not be predicted" in err
    # one line per input, in the order given (a directory in place of its images)
    expected = [str(i["good"]), str(i["empty"])] + [str(i["folder"] / "sub" / f"img{n}.jpg") for n in range(3)] + [
        str(i["bomb"]), str(i["empty_folder"]), str(i["good"])]
    assert [r["image"] for r in lines] == expected


@pytest.mark.slow
def test_predict_reads_a_list_or_an_image_from_stdin(bundle_parts, predict_inputs):
    i = predict_inputs
    env = cli_env(i["tmp"] / "home")
    listed = run_stage1(["predict", str(bundle_parts["bundle"]), "-"], env, i["tmp"], timeout=HANG_TIMEOUT_S,
                        stdin=f"{i['good']}\n{i['empty']}\n".encode())
    out, err = text(listed)
    assert listed.returncode == 1 and "Traceback" not in out + err
    assert [json.loads(x)["image"] for x in out.splitlines()] == [str(i["good"]), str(i["empty"])]
    image = run_stage1(["predict", str(bundle_parts["bundle"]), "-"], env, i["tmp"], timeout=HANG_TIMEOUT_S,
                       stdin=i["good"].read_bytes())
    out, err = text(image)
    assert image.returncode == 0, err
    (result,) = [json.loads(x) for x in out.splitlines()]
    assert result["image"] == "-" and 0.0 <= result["p_roadwork"] <= 1.0


def test_predict_on_a_directory_does_not_raise_is_a_directory(bundle_parts):
    """The Predictor itself names the path and says why, for a directory as for a bad file."""
    predictor = load_bundle(bundle_parts["bundle"], device="cpu")
    with pytest.raises(ImageDecodeError, match=rf"^{bundle_parts['root']}: cannot read the file"):
        predictor.predict([bundle_parts["root"]])
    results = predictor.predict([bundle_parts["root"], bundle_parts["image"]], errors="report")
    assert "cannot read the file" in results[0]["error"] and "p_roadwork" in results[1]


# ----------------------------------------------------------------------------------------------- forgery, signing


def _forge_threshold(bundle: Path, threshold: float) -> None:
    """Edit the decision threshold and re-hash everything, fingerprint included: a consistent forgery."""
    with edited_json(bundle / "thresholds.json") as doc:
        doc["threshold"] = threshold
    _resign(bundle)


def test_a_rehashed_forgery_fails_against_the_registered_fingerprint(bundle_parts, tmp_path):
    registered = read_manifest(bundle_parts["bundle"])["fingerprint"]
    forged = _copy_bundle(bundle_parts, tmp_path)
    _forge_threshold(forged, 0.0)
    load_bundle(forged, device="cpu")  # integrity alone cannot tell: every hash matches
    with pytest.raises(BundleError, match="is not the registered .*changed after registration"):
        load_bundle(forged, device="cpu", expected_fingerprint=registered)
    load_bundle(bundle_parts["bundle"], device="cpu", expected_fingerprint=registered)


def test_a_signed_bundle_loads_and_a_forged_or_unsigned_one_does_not(bundle_parts, tmp_path, monkeypatch):
    from stage1core.signing import generate_keypair, sign_manifest

    key, pub = generate_keypair(tmp_path / "keys")
    other_key, _ = generate_keypair(tmp_path / "other", name="other")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    signed = _copy_bundle(bundle_parts, tmp_path)
    sign_manifest(signed, key)
    monkeypatch.setenv("STAGE1_BUNDLE_PUBLIC_KEY", str(pub))
    load_bundle(signed, device="cpu")  # the signature is not a listed file, and verifies
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(bundle_parts["bundle"], device="cpu")
    _forge_threshold(signed, 0.0)
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(signed, device="cpu")
    sign_manifest(signed, other_key)  # re-signed, but not with the team's key
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(signed, device="cpu")


def test_export_signs_with_the_team_key(bundle_parts, tmp_path, monkeypatch):
    from stage1core.signing import generate_keypair, verify_manifest

    key, pub = generate_keypair(tmp_path / "keys")
    info = export_bundle(tmp_path / "bundles", **bundle_parts["kwargs"], signing_key=key)
    verify_manifest(info.path, pub)
    assert read_manifest(info.path)["fingerprint"] == read_manifest(bundle_parts["bundle"])["fingerprint"]
