"""Backbone fine-tuning: config, the real entry point in child processes (the task's launcher, a run
killed with SIGKILL and resumed, a 2-process DDP run), process-group timeouts, bundles with adapters.

Accelerate's state is a process-wide singleton, so every training run happens in a subprocess; the
tiny random-init Eva (tests.common.TINY_EVA) at 32 px keeps each run to seconds on CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stage1core.adapters import (
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    MERGED_BACKBONE,
    RESULT,
    attach_bundle_adapters,
    export_adapter_files,
)
from stage1core.backbone import BackboneConfig, resolve_backbone
from stage1core.checkpoints import CHECKPOINTS
from stage1core.finetune import PREPROCESSING, FinetuneConfig, write_launch_config
from stage1core.heads import HeadConfig
from stage1core.peft import AdapterConfig
from tests.common import HANG_TIMEOUT_S, TINY_EVA

REPO = Path(__file__).resolve().parent.parent
BACKBONE = BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling="cls+avg",
                          model_kwargs=dict(TINY_EVA), input_size=32, seed=0)
HEAD = HeadConfig(kind="mlp", hidden=16, dropout=0.2)
# dropout in adapters and head: the global RNG matters, so resume must restore it to be exact.
# ~80 train images / (8 x 2 accumulation) = 4-5 steps per epoch; 8 steps cross an epoch end (an
# evaluation); checkpoints at steps 3 and 6.
CONFIG = FinetuneConfig(
    adapter=AdapterConfig(method="dora", rank=4, alpha=8, dropout=0.1, last_n_blocks=1),
    optimizer="fsam", lr=5e-3, head_lr=5e-3, epochs=2, max_steps=8, batch_size=8, grad_accum=2,
    warmup_steps=2, ema_decay=0.9, patience=5, checkpoint_every=3, num_workers=0, seed=7,
)


# Every training child (the task's reference run, the killed run, its resumption, DDP ranks) runs with
# one intra-op thread. Bitwise resume is claimed for the same machine and thread count only: BLAS picks
# its kernel by thread count and shape (MKL's sgemm on an AMD EPYC rounds a 6-row batch differently with
# 1 and 2 threads: val has 14 images, so the last eval batch holds 6), so runs that differ in threads
# agree to float rounding, not bit for bit. The reference run used to inherit torch's default (one thread
# per core) while the others had one, which failed on AMD. A fixed count is the same on every machine.
CHILD_THREADS = "1"


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=CHILD_THREADS, CUDA_VISIBLE_DEVICES="")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def split(tiny_demo, tmp_path_factory):
    from stage1core.sources import SourceConfig, load_sources
    from stage1core.splits import SplitConfig, make_splits, read_split_manifest, write_split_manifest
    from tasks.pipeline import SplitRef

    scan = load_sources([SourceConfig(path=str(tiny_demo), kind="folder")])
    parts = make_splits(scan.samples, SplitConfig())
    path = tmp_path_factory.mktemp("split") / "split.json"
    fp = write_split_manifest(path, parts, SplitConfig(), data_fingerprint=scan.fingerprint())
    _, parts, manifest = read_split_manifest(path)
    ref = SplitRef(path=str(path), fingerprint=fp, data_fingerprint=scan.fingerprint(), counts=manifest["counts"],
                   n_samples=len(scan.samples), duplicates=scan.duplicates, quarantined=0)
    return {"ref": ref, "parts": parts, "path": path}


@pytest.fixture(scope="module")
def reference(split):
    """The uninterrupted run, launched by the Prefect task's function with CUDA forbidden in this process."""
    import logging

    from tasks import finetune as finetune_task

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("tasks.finetune")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("torch.cuda was touched in the launching (Prefect) process")

    started = time.perf_counter()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("_lazy_init", "is_available", "device_count", "init"):
                mp.setattr(torch.cuda, name, forbidden)
            # the task's child inherits this process's environment: the same thread count as child_env()
            mp.setenv("OMP_NUM_THREADS", CHILD_THREADS)
            ref = finetune_task.fit_backbone.fn(split["ref"], resolve_backbone(BACKBONE), HEAD, CONFIG,
                                                finetune_task.LaunchConfig(cpu=True, timeout_s=HANG_TIMEOUT_S))
    finally:
        logger.removeHandler(handler)
    return {"ref": ref, "lines": lines, "seconds": time.perf_counter() - started}


def test_config_validates_and_round_trips():
    data = json.loads(json.dumps(CONFIG.to_json()))
    assert FinetuneConfig.from_json(data) == CONFIG
    for bad in [dict(optimizer="sgd"), dict(precision="fp16"), dict(lr=0), dict(grad_accum=0), dict(max_steps=-1),
                dict(ema_decay=1.0), dict(crop_scale_min=0.0), dict(batch_size=2.5)]:
        with pytest.raises(ValueError, match="FinetuneConfig"):
            FinetuneConfig(**bad)
    with pytest.raises(ValueError, match="unknown fields"):
        FinetuneConfig.from_json({"learning_rate": 1e-3})


@pytest.mark.slow
def test_task_trains_in_a_child_and_never_initialises_cuda(reference, split):
    from stage1core.train import load_head

    ref, lines = reference["ref"], reference["lines"]
    assert not torch.cuda.is_initialized()
    # the child's output streamed into the task's logger, line by line
    assert lines[0].startswith("launching: ") and "-m stage1core.finetune" in lines[0]
    assert any(line.startswith("stage1-metrics ") for line in lines)
    assert any("fine-tuning done" in line for line in lines)
    out = Path(ref.path)
    assert {p.name for p in out.iterdir()} >= {ADAPTER_WEIGHTS, ADAPTER_META, "head.safetensors", "head.json",
                                               PREPROCESSING, RESULT}
    assert not (out / CHECKPOINTS).exists()  # removed after success (keep_checkpoints=False)
    result = json.loads((out / RESULT).read_text())
    assert ref.steps == 8 and result["history"][-1]["step"] == 8 and len(result["history"]) == 2
    steps_per_epoch = len(split["parts"]["train"]) // (CONFIG.batch_size * CONFIG.grad_accum)
    assert 4 <= steps_per_epoch < 8  # the scenario below needs an epoch end inside the 8 steps
    assert [r["step"] for r in result["history"]] == [steps_per_epoch, 8]
    assert ref.best_step in (steps_per_epoch, 8)
    # the selection rule of fit_head: the lowest val Brier score among evaluations past the LR warmup
    eligible = [r for r in result["history"] if r["step"] >= CONFIG.warmup_steps or r["step"] == ref.steps]
    assert ref.best_step == min(eligible, key=lambda r: r["val_brier"])["step"]
    assert result["metrics"]["val_brier"] == min(r["val_brier"] for r in eligible)
    assert set(ref.metrics) >= {"val_loss", "val_accuracy", "val_mcc", "val_auroc"}
    assert len(result["val_predictions"]["p_roadwork"]) == len(split["parts"]["val"])
    head = load_head(out)  # the bundle code's reader
    assert head.in_dim == 64 and head.head == HEAD
    from safetensors.torch import load_file

    adapters = load_file(str(out / ADAPTER_WEIGHTS))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapters.items())  # the adapters learned
    assert any("lora_magnitude" in k for k in adapters)  # DoRA


@pytest.mark.slow
def test_killed_run_resumes_to_bitwise_identical_weights(reference, split, tmp_path):
    launch = write_launch_config(tmp_path / "launch.json", backbone=BACKBONE, head=HEAD, config=CONFIG,
                                 split_manifest=split["path"])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "stage1core.finetune", "--config", str(launch), "--out", str(out)]
    killed = subprocess.run([*cmd, "--kill-at-step", "7"], env=child_env(), capture_output=True, text=True,
                            timeout=HANG_TIMEOUT_S)
    assert killed.returncode == -9, killed.stdout + killed.stderr  # SIGKILL: no cleanup ran
    assert not (out / RESULT).exists()
    assert [p.name for p in (out / CHECKPOINTS).glob("step-*")] == ["step-00000006"]
    checkpoint = json.loads((out / CHECKPOINTS / "step-00000006" / "trainer_state.json").read_text())
    assert checkpoint["intra_op_threads"] == int(CHILD_THREADS)  # what an exact resume must match
    resumed = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "step 6 of 8" in resumed.stdout
    assert "intra-op threads" not in resumed.stdout  # same thread count: no warning

    done = Path(reference["ref"].path)
    for name in (ADAPTER_WEIGHTS, "head.safetensors"):
        assert sha(out / name) == sha(done / name), name
    mine, theirs = (json.loads((d / RESULT).read_text()) for d in (out, done))
    assert mine["fingerprint"] == theirs["fingerprint"] and mine["resumed_from"] == 6
    assert mine["val_predictions"] == theirs["val_predictions"]  # bitwise: same thread count (see CHILD_THREADS)
    drop = ("train_loss",)  # identical too; listed to show the comparison is over everything else as well
    assert [{k: v for k, v in r.items() if k not in drop} for r in mine["history"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in theirs["history"]]
    assert [r["train_loss"] for r in mine["history"]] == [r["train_loss"] for r in theirs["history"]]

    # a finished directory is returned as is; another run's outputs are refused (both before any training)
    from stage1core.finetune import fit_backbone

    train, val = split["parts"]["train"], split["parts"]["val"]
    kwargs = dict(backbone=resolve_backbone(BACKBONE), head=HEAD, out_dir=out)
    assert fit_backbone(train, val, config=CONFIG, **kwargs).fingerprint == mine["fingerprint"]
    with pytest.raises(ValueError, match="choose an empty output directory"):
        fit_backbone(train, val, config=dataclasses.replace(CONFIG, seed=8), **kwargs)


def test_launch_commands():
    from tasks.finetune import LaunchConfig, child_environment, launch_command

    single = launch_command("c.json", "out", LaunchConfig())
    assert single == [sys.executable, "-m", "stage1core.finetune", "--config", "c.json", "--out", "out"]
    multi = launch_command("c.json", "out", LaunchConfig(num_processes=4, num_machines=2, machine_rank=1,
                                                         main_process_ip="10.0.0.1", main_process_port=29600))
    assert multi[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    joined = " ".join(multi)
    for part in ["--num_processes 8", "--multi_gpu", "--num_machines 2", "--machine_rank 1",
                 "--main_process_ip 10.0.0.1", "--main_process_port 29600",
                 "-m stage1core.finetune --config c.json --out out"]:
        assert part in joined
    with pytest.raises(ValueError, match="main_process_ip"):
        LaunchConfig(num_machines=2)
    # CPU ranks go through torchrun too (accelerate's `--cpu` would start one process), as gloo ranks
    cpu = launch_command("c.json", "out", LaunchConfig(num_processes=2, cpu=True))
    assert "--cpu" not in cpu and cpu[cpu.index("--num_processes") + 1] == "2" and "--multi_gpu" in cpu
    assert child_environment(LaunchConfig(num_processes=2, cpu=True))["ACCELERATE_USE_CPU"] == "true"


@pytest.mark.slow
def test_timeout_kills_the_whole_process_group(tmp_path):
    from tasks.finetune import run_child

    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, time\n"
        f"g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
        "print('started', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "time.sleep(600)\n"
    )
    seen: list[str] = []
    # 6 s: time for the child to start and print even on a loaded machine, before the timeout fires
    timeout_s, grace_s = 6, 1
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="process group was killed"):
        run_child([sys.executable, "-c", script], timeout_s=timeout_s, kill_grace_s=grace_s, on_line=seen.append)
    # the child would sleep 600 s: returning within a minute of the deadline shows the timeout ended it (the
    # code's own worst case is timeout + grace + 10 s; the rest is headroom for a loaded machine)
    assert time.monotonic() - started < timeout_s + grace_s + 60
    assert seen == ["started", "to stderr"]
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 60  # ends as soon as the grandchild is gone
    while time.monotonic() < deadline and _alive(grandchild):
        time.sleep(0.1)
    assert not _alive(grandchild)
    code, tail = run_child([sys.executable, "-c", "print('a'); print('b'); raise SystemExit(3)"],
                           timeout_s=HANG_TIMEOUT_S)
    assert (code, tail) == (3, ["a", "b"])


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead, only not yet reaped


@pytest.mark.slow
def test_bundle_with_adapters_unmerged_and_merged_give_the_same_outputs(reference, split, tmp_path):
    from stage1core.bundle import export_bundle, load_bundle
    from stage1core.guarantees import GuaranteeConfig, fnr_threshold

    out = Path(reference["ref"].path)
    result = json.loads((out / RESULT).read_text())
    preds = result["val_predictions"]
    p_train = np.array(preds["p_roadwork"])
    y = np.array(preds["labels"])
    thr = fnr_threshold(p_train[y == 1], GuaranteeConfig(alpha=0.5, delta=0.5))
    spec = resolve_backbone(BACKBONE)
    unmerged_files = export_adapter_files(out, merge=False)
    merged_files = export_adapter_files(out, merge=True)
    assert set(unmerged_files) == {ADAPTER_WEIGHTS, ADAPTER_META}
    assert set(merged_files) == {MERGED_BACKBONE, ADAPTER_META}

    predictors = {}
    for name, files in [("unmerged", unmerged_files), ("merged", merged_files)]:
        info = export_bundle(
            tmp_path / "bundles", name=name, backbone=spec, preprocessing=json.loads((out / PREPROCESSING).read_text()),
            head_dir=out, metrics=result["metrics"],
            policy_files={"thresholds.json": {"policy": "threshold", **thr.to_json()},
                          "policy.json": {"policy": "threshold", "gate_min_confidence": None}},
            model_card="# card\n", inputs={"finetune_fingerprint": result["fingerprint"]}, files=files,
        )
        predictors[name] = load_bundle(info.path, device="cpu")  # the Predictor attaches the adapters itself
    by_id = {s.sample_id: s for s in split["parts"]["val"]}
    paths = [by_id[sid].locator for sid in preds["sample_ids"]]
    p = {name: pr.predict_proba(paths) for name, pr in predictors.items()}
    np.testing.assert_allclose(p["merged"], p["unmerged"], atol=1e-5)
    # the Predictor reproduces the training-time evaluation
    np.testing.assert_allclose(p["unmerged"], p_train, atol=1e-5)
    # folding the adapters in at load time is the same function
    # the Predictor folds the adapters in at load time; keeping them as separate modules is the same function
    from stage1core.backbone import build_backbone

    kept = load_bundle(predictors["unmerged"].bundle_dir, device="cpu")
    kept.backbone = attach_bundle_adapters(build_backbone(kept.spec), kept.bundle_dir, kept.manifest, merge=False)
    np.testing.assert_allclose(kept.predict_proba(paths), p["unmerged"], atol=1e-5)
    # the shared pipeline's path: adapted features in the feature store + the fine-tuned head
    from stage1core.adapters import extract_adapted_features
    from stage1core.features import FeatureConfig, FeatureStore
    from stage1core.train import load_head, predict_positive

    info = extract_adapted_features([by_id[sid] for sid in preds["sample_ids"]], out,
                                    FeatureConfig(batch_size=8, num_workers=0), store_root=tmp_path / "features")
    assert (Path(info.store_dir) / "store.lock").exists()  # filled through the store's lock, as the frozen one
    x = FeatureStore(info.store_dir).load(preds["sample_ids"])
    np.testing.assert_allclose(predict_positive(load_head(out).model, x), p_train, atol=1e-5)
    # and the adapters matter: the plain backbone under the same head predicts otherwise
    plain = load_bundle(predictors["unmerged"].bundle_dir, device="cpu")
    plain.backbone = build_backbone(plain.spec)
    assert np.abs(plain.predict_proba(paths) - p["unmerged"]).max() > 1e-3


# non-default SelectiveNet settings, so the test sees that the head's own values reach the loss
SELECTIVE = HeadConfig(kind="selective", hidden=16, dropout=0.1, target_coverage=0.7, coverage_lambda=16.0,
                       selective_alpha=0.6)
SELECTIVE_CONFIG = dataclasses.replace(CONFIG, max_steps=6, checkpoint_every=0)  # evaluations at the epoch end and 6


@pytest.mark.slow
def test_selective_head_fine_tunes_gate_and_aux_with_the_selectivenet_loss(split, tmp_path):
    """A DoRA fine-tune with a selective head trains all three heads with the SelectiveNet loss (as
    fit_head does on cached features), and every evaluation reports the SelectiveNet val loss."""
    from safetensors.torch import load_file

    from stage1core.losses import class_weights_from_labels, selectivenet_loss
    from stage1core.train import load_head

    out, record = tmp_path / "out", tmp_path / "record"
    run = subprocess.run([sys.executable, __file__, "selective", str(split["path"]), str(out), str(record)],
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert run.returncode == 0 and "selective OK" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / RESULT).read_text())
    calls = json.loads((record / "calls.json").read_text())
    init = load_file(str(record / "init.safetensors"))
    trained = load_head(out)
    assert trained.head == SELECTIVE
    final = trained.model.state_dict()

    # the gate and the aux head moved away from their random init (plain CE on the class logits leaves
    # them bit-identical), and so did the classifier
    for name in ("gate.weight", "gate.bias", "aux.weight", "aux.bias", "cls.weight", "trunk.0.weight"):
        assert (final[name] - init[name]).abs().max() > 1e-4, name
    # every training forward went through the SelectiveNet loss with this head's settings, and its
    # gradient reached the gate logits: F-SAM runs both passes over each of the grad_accum micro-batches
    training = [c for c in calls if c["training"]]
    assert len(training) == 2 * SELECTIVE_CONFIG.grad_accum * result["steps"]
    assert all(c["gate_grad"] > 0 for c in training)
    assert {(c["coverage"], c["lam"], c["alpha"]) for c in calls} == {(0.7, 16.0, 0.6)}
    assert all(c["weighted"] for c in calls)  # class_weighting=True reaches the SelectiveNet loss
    # every evaluation computed the SelectiveNet val loss: one call per evaluation, logged as val_loss
    evaluations = [c for c in calls if not c["training"]]
    assert [c["loss"] for c in evaluations] == [r["val_loss"] for r in result["history"]]
    assert len(evaluations) == 2
    # and that val loss is the SelectiveNet loss of the selected head on the val images
    from stage1core.adapters import extract_adapted_features
    from stage1core.features import FeatureConfig, FeatureStore

    val = split["parts"]["val"]
    info = extract_adapted_features(val, out, FeatureConfig(batch_size=8, num_workers=0),
                                    store_root=tmp_path / "features")
    ids = sorted(s.sample_id for s in val)
    labels = torch.tensor([next(s.label for s in val if s.sample_id == i) for i in ids])
    with torch.no_grad():
        cls, gate, aux = trained.model(torch.as_tensor(FeatureStore(info.store_dir).load(ids)), return_all=True)
    loss, _ = selectivenet_loss(cls, gate, aux, labels, coverage=0.7, lam=16.0, alpha=0.6,
                                class_weights=class_weights_from_labels(labels))
    assert float(loss) == pytest.approx(result["metrics"]["val_loss"], abs=1e-4)


def scenario_selective(split_path: str, out_dir: str, record_dir: str) -> None:
    """fit_backbone with SELECTIVE, recording the head's initial weights and every SelectiveNet loss call."""
    from safetensors.torch import save_file

    import stage1core.classifier as classifier
    import stage1core.finetune as finetune
    from stage1core.splits import read_split_manifest

    inits: list[dict[str, torch.Tensor]] = []
    calls: list[dict] = []
    from stage1core.losses import selectivenet_loss

    build_head = finetune.build_head

    def recording_build_head(config, in_dim):
        head = build_head(config, in_dim)
        inits.append({k: v.detach().clone().contiguous() for k, v in head.state_dict().items()})
        return head

    def recording_loss(cls, gate, aux, targets, **kwargs):
        loss, stats = selectivenet_loss(cls, gate, aux, targets, **kwargs)
        call = {"training": gate.requires_grad, "loss": float(loss), "coverage": kwargs["coverage"],
                "lam": kwargs["lam"], "alpha": kwargs["alpha"], "weighted": kwargs["class_weights"] is not None}
        if gate.requires_grad:
            call["gate_grad"] = 0.0
            gate.register_hook(lambda g: call.__setitem__("gate_grad", float(g.abs().sum())))
        calls.append(call)
        return loss, stats

    finetune.build_head, classifier.selectivenet_loss = recording_build_head, recording_loss
    _, parts, _ = read_split_manifest(split_path)
    finetune.fit_backbone(parts["train"], parts["val"], backbone=resolve_backbone(BACKBONE), head=SELECTIVE,
                          config=SELECTIVE_CONFIG, out_dir=out_dir)
    Path(record_dir).mkdir(parents=True)
    assert len(inits) == 1
    save_file(inits[0], str(Path(record_dir) / "init.safetensors"))
    (Path(record_dir) / "calls.json").write_text(json.dumps(calls))


@pytest.mark.slow
def test_ddp_two_processes_agree(split, tmp_path):
    """2-process CPU DDP through accelerate's debug_launcher: sharded data, one set of outputs."""
    result = subprocess.run([sys.executable, __file__, "ddp", str(split["path"]), str(tmp_path / "ddp")],
                            cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert result.returncode == 0 and "ddp OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def ddp_worker(split_path: str, out_dir: str) -> None:
    from accelerate import PartialState

    from stage1core.finetune import fit_backbone
    from stage1core.splits import read_split_manifest

    _, parts, _ = read_split_manifest(split_path)
    config = dataclasses.replace(CONFIG, batch_size=4, max_steps=4, checkpoint_every=2)
    result = fit_backbone(parts["train"], parts["val"], backbone=resolve_backbone(BACKBONE), head=HEAD,
                          config=config, out_dir=out_dir)
    state = PartialState()
    assert state.num_processes == 2 and result.num_processes == 2 and result.steps == 4
    # every rank returns the main process's result (the same file)
    assert result.fingerprint == json.loads((Path(out_dir) / RESULT).read_text())["fingerprint"]
    assert len(result.val_predictions["p_roadwork"]) == len(parts["val"])


def scenario_ddp(split_path: str, out_dir: str) -> None:
    from accelerate import debug_launcher

    debug_launcher(ddp_worker, args=(split_path, out_dir), num_processes=2)
    assert (Path(out_dir) / ADAPTER_WEIGHTS).is_file()


if __name__ == "__main__":
    scenario = sys.argv[1]
    {"ddp": scenario_ddp, "selective": scenario_selective}[scenario](*sys.argv[2:])
    print(f"{scenario} OK")
