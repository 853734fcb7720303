"""Scale-out: feature extraction chunked over a two-worker Dask cluster through prefect-dask, against the
one-process path; a worker killed in the middle of a chunk; an incremental run; train_pipeline with the
distributed runner (a temporary cluster) and with 2-process fine-tuning (accelerate launch, gloo).

One LocalCluster per module (2 worker processes x 1 thread), started and stopped here. Features are
compared bit for bit: the same tiny model, fp32, the same batches (chunks are multiples of the batch
size), one intra-op thread everywhere (conftest sets OMP_NUM_THREADS=1; the chunk task pins the workers'
torch threads to scale_out.threads_per_worker = 1), on one machine.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stage1core.backbone import BackboneConfig
from stage1core.features import FeatureConfig, FeatureStore, extract_features, feature_store_target
from tests.common import HANG_TIMEOUT_S, TINY_EVA

pytestmark = pytest.mark.slow

# fp32: `auto` would pick bf16 for the Eva on a CPU with bf16 kernels; bit-identity holds there too, but
# fp32 keeps the test's claim independent of the CPU
CFG = FeatureConfig(batch_size=16, num_workers=0, shard_size=16, precision="fp32")
BACKBONE = BackboneConfig(name="vit_small_patch16_dinov3", weights="random", pooling="cls+avg",
                          model_kwargs=dict(TINY_EVA), input_size=32, seed=11)


@pytest.fixture(scope="module")
def cluster(prefect_server):
    """The temporary cluster the product starts for engine "dask" (2 workers x 1 thread, STAGE1_HOME and the
    Prefect API in their environment), started once here and passed to the runs by address."""
    from distributed import LocalCluster

    from tasks.scale_out import ScaleOutConfig, local_cluster_options, worker_spawn_settings

    cluster_class, kwargs = local_cluster_options(ScaleOutConfig(engine="dask", workers=2, threads_per_worker=1))
    assert cluster_class == "distributed.LocalCluster" and kwargs["env"]["PREFECT_API_URL"].startswith("http")
    with worker_spawn_settings(), LocalCluster(**kwargs) as local:
        yield local


@pytest.mark.slow
def test_workers_keep_glibc_s_adaptive_malloc_and_one_thread(cluster):
    """Dask's MALLOC_TRIM_THRESHOLD_ pins glibc's mmap threshold (68 instead of 48 ms per image here);
    the cluster's workers start without it and with one OpenMP thread."""
    import os

    from distributed import Client

    with Client(cluster.scheduler_address) as client:
        seen = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")))
    assert len(seen) == 2 and set(seen.values()) == {(None, "1")}, seen


@pytest.fixture(scope="module")
def samples(tiny_demo):
    from stage1core.sources import SourceConfig, load_sources

    return load_sources([SourceConfig(path=str(tiny_demo), kind="folder")]).samples


@pytest.fixture(scope="module")
def one_process(samples, tmp_path_factory):
    """The features of every sample from the one-process path (what each parallel run must equal)."""
    info = extract_features(samples, BACKBONE, CFG, store_root=tmp_path_factory.mktemp("one"), progress=False)
    ids = sorted(s.sample_id for s in samples)
    return {"info": info, "ids": ids, "features": FeatureStore(info.store_dir).load(ids)}


def scale_out(cluster, **over):
    from tasks.scale_out import ScaleOutConfig

    return ScaleOutConfig(**{"engine": "dask", "address": cluster.scheduler_address, "chunk_size": 32,
                             "retries": 1, "retry_delay_s": 0.0, **over})


def ids_per_sidecar(store_dir: str) -> Counter:
    return Counter(sid for sidecar in Path(store_dir, "shards").glob("*.json")
                   for sid in json.loads(sidecar.read_text())["sample_ids"])


def test_chunks_on_two_workers_give_the_one_process_features(prefect_server, cluster, samples, one_process,
                                                             tmp_path):
    from stage1core.features import ChunkResult
    from tasks import scale_out as scale_module

    seen: list[ChunkResult] = []
    original = scale_module.chunked_feature_set_info

    def recording(root, ids, results, **kwargs):
        seen.extend(results)
        return original(root, ids, results, **kwargs)

    target = feature_store_target(BACKBONE, CFG, store_root=tmp_path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scale_module, "chunked_feature_set_info", recording)
        info = scale_module.fill_store_in_chunks(target, samples, scale_out(cluster))
    ref = one_process["info"]
    # the same reference as the one-process path's (the cache key and everything downstream see no difference)
    assert (info.store_key, info.fingerprint, info.n_samples, info.dim, info.failed) == (
        ref.store_key, ref.fingerprint, ref.n_samples, ref.dim, ref.failed)
    assert info.n_computed == len(samples)
    assert len(seen) == -(-len(samples) // 32) and sum(r.n_computed for r in seen) == len(samples)
    assert len({r.pid for r in seen}) == 2 and os.getpid() not in {r.pid for r in seen}  # both workers, not here
    # each worker process built the backbone once, for its first chunk
    assert sum(r.model_seconds > 0 for r in seen) == 2
    ids = one_process["ids"]
    assert FeatureStore(info.store_dir).load(ids).tobytes() == one_process["features"].tobytes()
    # chunks are multiples of the shard size here: the very same shard files as one process writes
    names = lambda d: sorted(p.name for p in Path(d, "shards").glob("*.npy"))  # noqa: E731
    assert names(info.store_dir) == names(ref.store_dir)
    assert set(ids_per_sidecar(info.store_dir).values()) == {1}


def test_two_writers_of_the_same_chunk_write_the_same_shards(samples, one_process, tmp_path):
    """No lock between chunk writers: two of them filling one chunk at once (a retry racing a straggler)
    write the same names with the same bytes, atomically; the store ends up whole, each feature once."""
    from stage1core.features import chunk_job, fill_chunk, plan_chunks

    target = feature_store_target(BACKBONE, CFG, store_root=tmp_path)
    job = chunk_job(target, torch_threads=1)
    plan = plan_chunks(target.root, samples[:48], chunk_size=32, batch_size=16)  # the first 48 in id order
    results, errors = [], []

    def write(chunk: str) -> None:
        try:
            results.append(fill_chunk(job, chunk))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(chunk,)) for chunk in plan.chunks for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert not errors and len(results) == 4
    store = FeatureStore(target.root)
    ids = plan.ids
    assert store.missing(ids) == [] and store.verify() == []
    assert set(ids_per_sidecar(str(target.root)).values()) == {1}
    expected = one_process["features"][[one_process["ids"].index(i) for i in ids]]
    assert store.load(ids).tobytes() == expected.tobytes()
    assert not list(target.root.glob("shards/.*.tmp"))  # no temporary file left behind
    again = fill_chunk(job, plan.chunks[0])
    assert again.n_computed == 0 and again.model_seconds == 0.0  # nothing missing: no model built


def kill_after_first_shard(marker: str) -> None:
    """Run on every worker: the first shard written anywhere after this is followed by SIGKILL of the
    process that wrote it (one kill in all, whoever creates `marker` first)."""
    from stage1core import features

    original = features.FeatureStore.write_shard

    def write_then_die(self, sample_ids, feats):
        name = original(self, sample_ids, feats)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return name
        os.write(fd, f"{os.getpid()} {name}".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)  # in the middle of the chunk: its second shard is not written
        return name

    features.FeatureStore.write_shard = write_then_die
    features._kill_patch_original = original


def remove_kill_patch() -> None:
    from stage1core import features

    if hasattr(features, "_kill_patch_original"):
        features.FeatureStore.write_shard = features._kill_patch_original


def test_a_worker_killed_in_the_middle_of_a_chunk_is_rerun_by_the_engine(prefect_server, cluster, samples,
                                                                         one_process, tmp_path):
    from distributed import Client

    from tasks.scale_out import fill_store_in_chunks

    marker = tmp_path / "killed"
    with Client(cluster.scheduler_address) as client:
        client.wait_for_workers(2)
        client.run(kill_after_first_shard, str(marker))
        try:
            info = fill_store_in_chunks(feature_store_target(BACKBONE, CFG, store_root=tmp_path), samples,
                                        scale_out(cluster))
        finally:
            client.run(remove_kill_patch)
        killed_pid, first_shard = marker.read_text().split()
        client.wait_for_workers(2)  # the nanny restarted the killed worker; later tests get two again
    assert int(killed_pid) != os.getpid()  # a worker died, not the flow's process
    # the rerun chunk skipped the shard its killed attempt had finished: 16 images were not embedded again
    assert info.n_computed == len(samples) - CFG.shard_size
    assert (tmp_path / info.store_key[:24] / "shards" / f"{first_shard}.json").is_file()
    assert set(ids_per_sidecar(info.store_dir).values()) == {1}  # every feature present once
    assert FeatureStore(info.store_dir).load(one_process["ids"]).tobytes() == one_process["features"].tobytes()
    assert info.fingerprint == one_process["info"].fingerprint


def test_an_incremental_run_embeds_only_the_new_images_across_workers(prefect_server, cluster, samples,
                                                                      one_process, tmp_path):
    from tasks.scale_out import fill_store_in_chunks

    old = [s for i, s in enumerate(samples) if i % 10]  # every tenth image is new
    target = feature_store_target(BACKBONE, CFG, store_root=tmp_path)
    first = fill_store_in_chunks(target, old, scale_out(cluster))
    assert first.n_computed == len(old)
    info = fill_store_in_chunks(target, samples, scale_out(cluster, chunk_size=16))
    assert info.n_computed == len(samples) - len(old) > 0
    assert info.fingerprint == one_process["info"].fingerprint
    # new images sit between old ones in sample-id order, so they land in other batches than in one process:
    # equal up to float rounding here (tests/test_features.py says why), not bit for bit
    np.testing.assert_allclose(FeatureStore(info.store_dir).load(one_process["ids"]), one_process["features"],
                               rtol=2**-8, atol=2e-3)
    again = fill_store_in_chunks(target, samples, scale_out(cluster))
    assert again.n_computed == 0 and again.fingerprint == info.fingerprint


def test_train_pipeline_and_evaluate_bundle_extract_on_the_cluster(prefect_server, cluster, tiny_demo, one_process,
                                                                   tmp_path):
    """The flow with the distributed runner: the features are the one-process features, and a second run is
    served from Prefect's cache (scale_out is not part of the key). Then evaluate-bundle on the cluster
    recomputes the deleted store and scores the bundle's test split exactly as training did."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from flows.train_pipeline import RegistryConfig, train_pipeline
    from tests.test_flow import params, task_states

    run = params(tiny_demo, backbone=BACKBONE, features=CFG,
                 scale_out=scale_out(cluster),
                 registry=RegistryConfig(experiment="flow-test", model_name="stage1-flow-test", register=False,
                                         bundle_name="scale-out"))
    result = train_pipeline(**run)
    assert result["features"]["n_computed"] == len(one_process["ids"])
    store = FeatureStore(result["features"]["store_dir"])
    assert store.load(one_process["ids"]).tobytes() == one_process["features"].tobytes()
    assert task_states(result["flow_run_id"], expected=("extract_features",))["extract_features"] == "Completed"
    with get_client(sync_client=True) as client:
        chunk_runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["extract-features-chunks"])))
    assert chunk_runs and all(r.state.is_completed() for r in chunk_runs)
    chunk_states = task_states(str(chunk_runs[0].id), expected=("embed_chunk",))
    assert set(chunk_states.values()) == {"Completed"}

    again = train_pipeline(**run)
    assert again["features"]["n_computed"] == 0 and again["bundle_fingerprint"] == result["bundle_fingerprint"]
    assert task_states(again["flow_run_id"], expected=("extract_features",))["extract_features"] == "Cached"

    import shutil

    from flows.evaluate_bundle import evaluate_bundle
    from tests.common import settings_file

    shutil.rmtree(Path(store.root) / "shards")  # evaluate-bundle must embed every image again, in chunks
    # the team settings' [scale_out] table and feature batch size (training's: the same batches)
    team = settings_file(tmp_path / "settings.toml", tiny_demo, features=CFG,
                         scale_out={"engine": "dask", "address": cluster.scheduler_address, "chunk_size": 32})
    evaluated = evaluate_bundle(model=result["bundle_path"], sources=run["sources"], split="test",
                                splits=run["splits"], model_name="stage1-flow-test", experiment="flow-test-eval",
                                settings_file=team)
    assert evaluated["metrics"]["n"] == result["split_counts"]["test"]["total"]
    # bit-identical features: the very metrics training computed on its stored features
    for key in ("auroc", "mcc", "fnr", "brier"):
        assert evaluated["metrics"][key] == pytest.approx(result["metrics"][key], abs=1e-12), key


def test_train_pipeline_fine_tunes_in_two_processes_with_the_one_process_bundle_contract(prefect_server,
                                                                                          tiny_demo):
    """launch.num_processes=2 on CPU: `accelerate launch` with two gloo ranks, from the flow, end to end."""
    from flows.train_pipeline import RegistryConfig, train_pipeline
    from stage1core.bundle import load_bundle, read_manifest
    from stage1core.finetune import FinetuneConfig
    from stage1core.heads import HeadConfig
    from stage1core.peft import AdapterConfig
    from stage1core.splits import read_split_manifest
    from tasks.finetune import LaunchConfig
    from tests.test_flow import params, task_states

    finetune = FinetuneConfig(
        adapter=AdapterConfig(method="dora", rank=4, alpha=8, last_n_blocks=1), optimizer="adamw", lr=5e-3,
        head_lr=5e-3, epochs=1, max_steps=4, batch_size=8, warmup_steps=1, checkpoint_every=100, num_workers=0,
    )
    run = params(tiny_demo, head=HeadConfig(kind="mlp", hidden=16), backbone_mode="dora", finetune=finetune,
                 launch=LaunchConfig(num_processes=2, cpu=True, main_process_port=29517),
                 registry=RegistryConfig(experiment="flow-test", model_name="stage1-flow-test", register=False,
                                         bundle_name="dora-two-processes"))
    del run["train"]
    result = train_pipeline(**run)
    states = task_states(result["flow_run_id"], expected=("fit_backbone", "export_bundle"))
    assert states["fit_backbone"] == "Completed"
    bundle = Path(result["bundle_path"])
    manifest = read_manifest(bundle)  # schema and every file's sha256
    assert {"adapter.safetensors", "adapter.json", "head.safetensors", "head.json", "backbone.json",
            "thresholds.json", "metrics.json", "model_card.md"} <= set(manifest["files"])
    # the fine-tuning run behind the bundle's adapters ran as two ranks
    from stage1core.fingerprint import sha256_file
    from stage1core.home import home_path

    adapter_sha = sha256_file(bundle / "adapter.safetensors")
    runs = [json.loads((d / "result.json").read_text()) for d in home_path("finetune").iterdir()
            if (d / "result.json").is_file() and sha256_file(d / "adapter.safetensors") == adapter_sha]
    assert [r["num_processes"] for r in runs] == [2]
    preds = json.loads((bundle / "test_predictions.json").read_text())
    _, splits, _ = read_split_manifest(result["split_manifest"])
    locator = {s.sample_id: s.locator for s in splits["test"]}
    p = load_bundle(bundle, device="cpu").predict_proba([locator[s] for s in preds["sample_ids"]])
    np.testing.assert_allclose(p, preds["p_roadwork"], atol=1e-5)


def test_workers_report_to_this_process_s_api_also_without_an_api_url(monkeypatch):
    """A task sent to a worker carries this process's Prefect settings: with no API URL in them (Prefect's
    ephemeral server) each worker would start a server of its own, so the block puts this process's URL in;
    a URL already set is left alone."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks import scale_out

    monkeypatch.setattr(scale_out, "prefect_api_url", lambda: "http://127.0.0.1:4321/api")
    with temporary_settings({PREFECT_API_URL: None}):
        with scale_out.workers_report_here():
            assert PREFECT_API_URL.value() == "http://127.0.0.1:4321/api"
        assert not PREFECT_API_URL.value()
    with temporary_settings({PREFECT_API_URL: "http://server:4200/api"}), scale_out.workers_report_here():
        assert PREFECT_API_URL.value() == "http://server:4200/api"


MALLOC_PROBE = """
import ctypes
import numpy as np
from tasks.scale_out import malloc_thresholds_for_torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_for_2mib():  # blocks glibc mmaps to hold a 2 MiB array, beyond those held already
    base = libc.mallinfo2().hblks
    a = np.ones(1 << 18)
    extra = libc.mallinfo2().hblks - base
    del a
    return extra

before = mmapped_for_2mib()
malloc_thresholds_for_torch()
print(before, mmapped_for_2mib())
"""


def test_a_worker_started_with_dask_s_malloc_trim_threshold_gets_heap_allocations_back(tmp_path):
    """On an existing cluster the workers carry MALLOC_TRIM_THRESHOLD_=65536 (Dask's default), which pins
    glibc's mmap threshold at 128 KiB: every tensor above it is mmap'ed and unmapped again. The chunk task's
    `malloc_thresholds_for_torch` raises the threshold, so a 2 MiB array comes from the heap again."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536", "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", MALLOC_PROBE], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=HANG_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = map(int, proc.stdout.split()[-2:])
    assert before >= 1 and after == 0, proc.stdout
