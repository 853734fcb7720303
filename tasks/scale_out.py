"""Feature extraction spread over the processes, GPUs and hosts of a Dask cluster, through Prefect's own
integration (prefect-dask's DaskTaskRunner): a subflow maps the `embed_chunk` task over the chunks that
stage1core.features plans, on a temporary local cluster or an existing one (`address`).

The default, `engine="local"`, is today's one-process path and needs no cluster. Who retries what:
a chunk whose task raises (a read error on the shared filesystem, CUDA out of memory) is retried by
Prefect (`retries`); a chunk whose worker process dies (killed, OOM-killed, a lost host) is rerun on
another worker by Dask's scheduler (`distributed.scheduler.allowed-failures`, 3 by default); either way
a retried chunk skips the shards its earlier attempt finished. docs/scale-out.md has the whole story.

The subflow lives here, not in flows/: it is the engine step of the extraction tasks, called from
inside them, so their cache keys and results stay those of the one-process path.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from stage1core.config import describe_fields
from stage1core.features import (
    ChunkResult,
    FeatureChunkJob,
    FeatureSetInfo,
    StoreTarget,
    chunk_job,
    chunked_feature_set_info,
    fill_chunk,
    plan_chunks,
)
from stage1core.sources import Sample
from tasks.logs import run_logger

ENGINES = ("local", "dask")


@describe_fields
@dataclass(frozen=True)
class ScaleOutConfig:
    """Where feature extraction runs: one process (the default), or chunks on a Dask cluster."""

    # local: one process, no cluster (the default); dask: chunks mapped over a Dask cluster's workers
    engine: Literal["local", "dask"] = "local"
    # an existing Dask scheduler (tcp://host:8786, a dask-kubernetes or dask-gateway cluster's address);
    # empty: a temporary cluster on this machine for the length of the extraction
    address: str | None = None
    # worker processes of the temporary cluster (with gpus_per_task: one per GPU, dask-cuda)
    workers: int = 2
    # torch threads in each worker process (one chunk runs at a time per worker)
    threads_per_worker: int = 1
    # GPUs each chunk needs: 0 on CPU; 1 with a temporary cluster starts dask-cuda's LocalCUDACluster,
    # one worker per GPU; on an existing cluster it asks the scheduler for the workers' `GPU` resource
    # (start them with `--resources GPU=1`)
    gpus_per_task: int = 0
    # images per chunk, a multiple of features.batch_size; the most a failed chunk recomputes, and the
    # unit of scheduling (the engine waits 0.15-0.25 s between chunks: docs/benchmarks.md section 13)
    chunk_size: int = 1024
    # Prefect retries of a chunk whose task raised (a dead worker process is rerun by Dask itself)
    retries: int = 2
    # seconds between those retries
    retry_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"scale_out.engine must be one of {ENGINES}, got {self.engine!r} (Ray is not "
                             "supported: docs/scale-out.md says why)")
        if self.workers < 1 or self.threads_per_worker < 1 or self.gpus_per_task < 0:
            raise ValueError("scale_out: workers and threads_per_worker must be >= 1 and gpus_per_task >= 0 "
                             f"(got {self.workers}, {self.threads_per_worker}, {self.gpus_per_task})")
        if self.chunk_size < 1 or self.retries < 0 or self.retry_delay_s < 0:
            raise ValueError("scale_out: chunk_size must be >= 1, retries and retry_delay_s >= 0")
        if self.address is not None and not self.address.strip():
            object.__setattr__(self, "address", None)

    @property
    def distributed(self) -> bool:
        return self.engine != "local"

    def check_batch_size(self, batch_size: int) -> None:
        """Chunks must not cut a batch: that is what makes the features equal to one process's."""
        if self.distributed and self.chunk_size % batch_size:
            raise ValueError(f"scale_out.chunk_size {self.chunk_size} must be a multiple of features.batch_size "
                             f"{batch_size}: each image must be embedded in the same batch as in one process")


def prefect_api_url() -> str:
    """The API the flow process talks to: $PREFECT_API_URL, or the ephemeral server Prefect started here
    (workers of a temporary cluster get it in their environment)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")


def local_cluster_options(config: ScaleOutConfig) -> tuple[str, dict[str, Any]]:
    """The class and keyword arguments of the temporary cluster for `config`: `workers` single-task
    processes, or dask-cuda's one worker per GPU when chunks need GPUs. The workers inherit this
    process's environment; STAGE1_HOME and the Prefect API are set explicitly, since Prefect may be on an
    ephemeral server that only this process knows."""
    from stage1core.home import stage1_home

    env = {"STAGE1_HOME": str(stage1_home()), "PREFECT_API_URL": prefect_api_url(),
           "OMP_NUM_THREADS": str(config.threads_per_worker)}
    kwargs: dict[str, Any] = {"threads_per_worker": 1, "processes": True, "dashboard_address": ":0", "env": env}
    if config.gpus_per_task:
        try:
            import dask_cuda  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("scale_out.gpus_per_task on a temporary cluster needs dask-cuda (one worker per "
                               "GPU): pip install dask-cuda, or point scale_out.address at a GPU cluster") from exc
        return "dask_cuda.LocalCUDACluster", {**kwargs, "resources": {"GPU": 1}}
    return "distributed.LocalCluster", {**kwargs, "n_workers": config.workers}


@contextmanager
def workers_report_here() -> Iterator[None]:
    """Task runs on the workers report to this process's Prefect API, also when that API is the ephemeral
    server Prefect started here (no PREFECT_API_URL): a task sent to a Dask worker carries this process's
    settings, and with no API URL in them each worker would start an ephemeral server of its own (6 s of
    CPU per worker on its first chunk, here) and record its task runs where no one looks. With an API URL
    set this changes nothing. Workers on other hosts need a server they can reach (docs/scale-out.md)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    with temporary_settings({PREFECT_API_URL: prefect_api_url()}):
        yield


@contextmanager
def worker_spawn_settings() -> Iterator[None]:
    """Dask's settings for the worker processes a cluster started in this block spawns, less one.

    Dask puts MALLOC_TRIM_THRESHOLD_=65536 into every new worker's environment
    (`distributed.nanny.pre-spawn-environ`), to hand freed memory back to the OS sooner. Setting any trim
    threshold also pins glibc's mmap threshold at 128 KiB, so every activation tensor of every forward pass
    is mmap'ed and unmapped again: EfficientNet-Lite0 took 68 ms per image instead of 48 in a plain process
    with that variable set (2-core AMD EPYC, one thread). The other settings (one OpenMP/MKL/OpenBLAS
    thread) stay. The nannies read this when they are created, so restarted workers keep it. On an
    existing cluster the chunk task resets glibc's thresholds itself (`malloc_thresholds_for_torch`).
    """
    import dask
    import distributed  # noqa: F401  (loads distributed's defaults into dask.config)

    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        yield


@functools.cache  # once per worker process
def malloc_thresholds_for_torch() -> None:
    """Undo, in a worker process, what Dask's MALLOC_TRIM_THRESHOLD_ does to glibc (see
    `worker_spawn_settings`): on an existing cluster whose workers were started with it, set glibc's mmap
    threshold to its ceiling (32 MiB) and a trim threshold to match, so a forward pass's tensors come from
    the heap again (71 -> 56 ms per image in a process started with the variable, the same as without it).
    Nothing happens where the variable is unset or on a C library without mallopt."""
    import ctypes
    import os

    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def dask_task_runner(config: ScaleOutConfig):
    """prefect-dask's task runner for `config`: the existing scheduler at `address`, or a temporary
    cluster (`local_cluster_options`) that lives as long as the subflow."""
    from prefect_dask import DaskTaskRunner

    if config.address:
        return DaskTaskRunner(address=config.address)
    cluster_class, kwargs = local_cluster_options(config)
    return DaskTaskRunner(cluster_class=cluster_class, cluster_kwargs=kwargs)


# no tags: Prefect takes a tag-concurrency lease (a round trip through the API's lease service) around every
# run of a tagged task, and that cost 1-2 s per chunk here, on top of 7 s of compute
@task(name="embed_chunk", cache_policy=NO_CACHE, persist_result=False)
def embed_chunk(job: FeatureChunkJob, chunk: str) -> ChunkResult:
    """Embed one planned chunk into the shared feature store (no cache: the store is the cache, and a
    chunk already done costs one stat per shard)."""
    malloc_thresholds_for_torch()
    result = fill_chunk(job, chunk)
    run_logger(__name__).info("chunk %s: %d of %d images embedded in %.1fs on %s (pid %d)%s", chunk[:12],
                              result.n_computed, result.n_samples, result.seconds, result.host, result.pid,
                              f", backbone built in {result.model_seconds:.1f}s" if result.model_seconds else "")
    return result


@flow(name="extract-features-chunks")
def embed_chunks(job: FeatureChunkJob, chunks: list[str], retries: int = 2, retry_delay_s: float = 5.0,
                 gpus_per_task: int = 0) -> list[ChunkResult]:
    """Map `embed_chunk` over the chunks on this flow's task runner (a Dask cluster) and wait for all."""
    import dask

    chunk_task = embed_chunk.with_options(retries=retries, retry_delay_seconds=retry_delay_s)
    with dask.annotate(**({"resources": {"GPU": gpus_per_task}} if gpus_per_task else {})):
        futures = chunk_task.map(job, chunks)
    return [f.result() for f in futures]


def fill_store_in_chunks(target: StoreTarget, samples: Sequence[Sample], config: ScaleOutConfig, *,
                         log_fn: Callable[[str], None] | None = None) -> FeatureSetInfo:
    """Fill `target`'s store with every missing sample, chunk by chunk on the Dask cluster of `config`;
    the FeatureSetInfo is the one the one-process path returns for the same samples."""
    say = log_fn or (lambda message: None)
    config.check_batch_size(target.config.batch_size)
    started = time.perf_counter()
    job = chunk_job(target, torch_threads=config.threads_per_worker)
    plan = plan_chunks(target.root, samples, chunk_size=config.chunk_size, batch_size=target.config.batch_size)
    results: list[ChunkResult] = []
    if plan.chunks:
        where = config.address or (f"a temporary local cluster of {config.workers} workers x "
                                   f"{config.threads_per_worker} threads")
        say(f"embedding {plan.n_missing} new images ({len(plan.ids) - plan.n_missing} cached) in {len(plan.chunks)} "
            f"chunks of <= {config.chunk_size} on Dask ({where}) into {target.root}")
        with workers_report_here(), worker_spawn_settings():  # a temporary cluster starts in the subflow
            results = embed_chunks.with_options(task_runner=dask_task_runner(config))(
                job, plan.chunks, retries=config.retries, retry_delay_s=config.retry_delay_s,
                gpus_per_task=config.gpus_per_task)
    info = chunked_feature_set_info(target.root, plan.ids, results, seconds=time.perf_counter() - started)
    if plan.chunks:
        say(f"embedded {info.n_computed} images in {info.seconds:.1f}s ({info.images_per_second:.1f} images/s) "
            f"on {len({(r.host, r.pid) for r in results})} worker processes, {len(info.failed)} failed")
    return info
