"""Benchmark 13: scale-out. Feature extraction in one process vs chunked over two Dask workers.

Both sides embed the same demo images with EfficientNet-Lite0 (package weights; --quick: the tiny
random-init ViT), fp32, batch 32, no decode workers, into an empty store, each process pinned to one
torch thread: one process (the default path, `extract_features`, in this process) against the product's
chunked path (`tasks.scale_out`: chunks planned, the `extract-features-chunks` subflow mapping
`embed_chunk` over a fresh 2-worker LocalCluster through prefect-dask). Both sides are warmed alike before
their clock starts (imports and one extraction of 4 images, each process in itself). The goal is on the
started cluster (a team's long-lived cluster); starting a temporary one and warming its workers are
reported apart, and the speed-up with them included too. One backbone build per worker counts as chunk
work. Sides alternate.

Engine overhead per chunk = (workers x wall time of the subflow - time spent inside the chunk function) /
chunks: Prefect's task runs, Dask's scheduling, pickling, the workers' first imports and idle tails;
the chunk size that keeps it under 5% of a chunk's compute follows from the per-image time.

`--gpu`: the GPU variant, one worker per GPU (dask-cuda's LocalCUDACluster, `gpus_per_task=1`) against
one process on one GPU; needs CUDA and dask-cuda, otherwise it says so and measures nothing.
Goals: speed-up >= 1.6x with two workers (parallel efficiency >= 0.8); overhead per chunk <= 5%.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import _common as c


def configure(parser) -> None:
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--chunk", type=int, default=160, help="images per chunk (a multiple of the batch, 32)")
    parser.add_argument("--gpu", action="store_true", help="one worker per GPU vs one process on one GPU")


def _warm_worker(samples, spec, config, root: str) -> None:
    """A worker's start-up, as the one-process side gets it before its clock starts: the imports, and a
    first extraction of a few images (torch's kernels and allocator warm) into a throwaway store."""

    import prefect.task_engine  # noqa: F401
    import torch

    import tasks.scale_out  # noqa: F401
    from stage1core.features import extract_features

    torch.set_num_threads(1)
    extract_features(samples, spec, config, store_root=f"{root}/{os.getpid()}", progress=False)


def main() -> None:
    args = c.parse_args(__doc__, repeats=2, configure=configure)
    c.fresh_home()
    c.header("13. scale-out: one process vs chunks on two Dask workers", args)
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("no CUDA device: the GPU variant of benchmark 13 needs GPUs; nothing measured")
        return
    torch.set_num_threads(1)  # the one-process side: one thread, like each worker
    from stage1core.backbone import resolve_backbone
    from stage1core.features import FeatureConfig, FeatureStore, extract_features, feature_store_target

    n = 48 if args.quick else args.images
    chunk = 16 if args.quick else args.chunk
    batch = 16 if args.quick else 32
    samples = c.load_samples(c.bench_data(n, quick=args.quick))
    # --quick (the test suite): the tiny random-init ViT of the other quick runs, 32 px
    spec = resolve_backbone(c.vit_small_backbone(tiny=True) if args.quick else c.demo_backbone())
    device = "cuda" if args.gpu else "cpu"
    config = FeatureConfig(batch_size=batch, num_workers=0, precision="fp32", shard_size=chunk, device=device)
    workers = torch.cuda.device_count() if args.gpu else 2
    print(f"{len(samples)} demo images, {spec.name}, fp32, batch {batch}, chunks of {chunk}, {workers} workers x "
          f"1 thread{' (one per GPU)' if args.gpu else ''}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))

    from prefect import flow

    @flow(name="bench-start-server")
    def start_server() -> None:
        return None

    seconds, _ = c.timed(start_server)  # once per process, for the chunked side only: not timed below
    c.figure("ephemeral Prefect server start (excluded)", f"{seconds:.2f} s")
    extract_features(samples[:4], spec, config, store_root=tmp / "warm", progress=False)  # imports, not timed

    one, two, warm, starts, runs, stores = [], [], [], [], [], {}

    def one_process(r: int) -> None:
        start = time.perf_counter()
        info = extract_features(samples, spec, config, store_root=tmp / f"one{r}", progress=False)
        one.append(time.perf_counter() - start)
        stores["one"] = info.store_dir

    def chunked(r: int) -> None:
        from distributed import LocalCluster

        from stage1core.features import chunk_job, plan_chunks
        from tasks.scale_out import (
            ScaleOutConfig,
            dask_task_runner,
            embed_chunks,
            local_cluster_options,
            worker_spawn_settings,
            workers_report_here,
        )

        start = time.perf_counter()
        # the cluster the product starts (tasks.scale_out): its workers' environment names this process's
        # Prefect server and STAGE1_HOME (without it each worker starts an ephemeral Prefect server of its
        # own on its first task), and drops Dask's fixed malloc trim threshold
        cluster_class, kwargs = local_cluster_options(ScaleOutConfig(engine="dask", workers=workers,
                                                                     gpus_per_task=1 if args.gpu else 0))
        with worker_spawn_settings():
            if args.gpu:
                from dask_cuda import LocalCUDACluster

                cluster = LocalCUDACluster(**kwargs)
            else:
                cluster = LocalCluster(**kwargs)
        try:
            from distributed import Client

            with Client(cluster.scheduler_address) as client:  # start-up, not per chunk (see _warm_worker)
                client.run(_warm_worker, samples[:4], spec, config, str(tmp / "warm"))
            started = time.perf_counter()
            scale = ScaleOutConfig(engine="dask", address=cluster.scheduler_address, workers=workers,
                                   chunk_size=chunk, gpus_per_task=1 if args.gpu else 0)
            target = feature_store_target(spec, config, store_root=tmp / f"two{r}")
            job = chunk_job(target, torch_threads=1)
            plan = plan_chunks(target.root, samples, chunk_size=chunk, batch_size=batch)
            with workers_report_here():  # as tasks.scale_out.fill_store_in_chunks runs it
                results = embed_chunks.with_options(task_runner=dask_task_runner(scale))(
                    job, plan.chunks, retries=0, gpus_per_task=scale.gpus_per_task)
            done = time.perf_counter()
        finally:
            cluster.close()
        starts.append(started - start)
        two.append(done - start)
        warm.append(done - started)
        runs.append((done - started, results))
        stores["two"] = str(target.root)

    for r in range(args.repeats):
        for side in ((one_process, chunked) if r % 2 == 0 else (chunked, one_process)):
            side(r)

    ids = sorted(s.sample_id for s in samples)
    same = FeatureStore(stores["one"]).load(ids).tobytes() == FeatureStore(stores["two"]).load(ids).tobytes()
    c.figure("one process", f"{c.median(one):.2f} s (runs {[round(t, 2) for t in one]})")
    c.figure("two workers", f"{c.median(two):.2f} s (runs {[round(t, 2) for t in two]}), of which cluster start "
             f"and worker warm-up {c.median(starts):.2f} s")
    c.figure("two workers, started cluster", f"{c.median(warm):.2f} s (runs {[round(t, 2) for t in warm]})")
    c.figure("features bit-identical to one process", same)
    # the overhead of the engine, from the fastest chunked run
    wall, results = min(runs, key=lambda run: run[0])
    inside = sum(r.seconds for r in results)
    builds = [r.model_seconds for r in results if r.model_seconds]
    compute = sum(r.seconds - r.model_seconds for r in results)
    per_image = compute / len(samples)
    overhead = (workers * wall - inside) / len(results)
    per_chunk = per_image * chunk
    c.figure("chunks", f"{len(results)} of <= {chunk} images on {len({r.pid for r in results})} worker processes")
    c.figure("compute per chunk", f"{per_chunk:.3f} s ({per_image * 1000:.1f} ms/image)")
    c.figure("backbone builds", f"{len(builds)} ({sum(builds):.2f} s in all): one per worker process")
    c.figure("engine overhead per chunk", f"{overhead:.3f} s (worker time outside the chunk function; the "
             f"backbone builds above count as the chunks' work)")
    for size in (16, 32, 64, 128, 256, 512, 1024):
        print(f"  overhead at chunk {size}: {100 * overhead / (per_image * size):.1f}%")
    needed = overhead / (0.05 * per_image)
    c.figure("smallest chunk with overhead <= 5%", f"{needed:.0f} images")
    c.ratio_line("speed-up two workers / one process, cluster start included", c.median(one) / c.median(two))
    speedup = c.median(one) / c.median(warm)
    c.ratio_line("speed-up two workers / one process", speedup, goal=">= 1.6x", met=speedup >= 1.6)
    c.ratio_line("parallel efficiency", speedup / workers, goal=">= 0.8", met=speedup / workers >= 0.8, unit="")
    c.ratio_line("engine overhead per chunk / chunk compute", 100 * overhead / per_chunk, goal="<= 5%",
                 met=overhead / per_chunk <= 0.05, unit="%")


if __name__ == "__main__":
    main()
