"""Benchmark 4: the whole `train_pipeline` flow cold (empty state) against warm (everything cached).

A fresh $STAGE1_HOME in a temporary directory (Prefect's ephemeral server, MLflow's SQLite store and the
feature store all start empty), the demo parameters (`stage1 demo`: EfficientNet-Lite0 with its package
weights), on a pre-generated demo dataset passed as the source: data generation is not part of either
run. The flow is called twice in one process; the second call finds every cached task's result (features,
head, calibration, evaluation, bundle) and only rescans the sources and logs a new MLflow run and model
version. Prefect's ephemeral server is started by a no-op flow first, outside both timings.
Goal: warm <= 5% of cold.
"""

from __future__ import annotations

import time

import _common as c


def main() -> None:
    args = c.parse_args(__doc__, configure=lambda p: p.add_argument("--images", type=int, default=600))
    home = c.fresh_home()
    c.header("4. cached rerun: train_pipeline cold vs warm", args)
    import dataclasses

    from deployments.cli import demo_parameters
    from flows.train_pipeline import train_pipeline
    from stage1core.guarantees import GuaranteeConfig
    from stage1core.sources import SourceConfig
    from stage1core.train import TrainConfig

    n = 60 if args.quick else args.images
    data = c.bench_data(n, quick=args.quick)
    params = demo_parameters()
    params["sources"] = [SourceConfig(path=str(data), kind="folder", name="demo")]
    # fewer images than the 1,200-image demo: fewer calib positives, so a looser FNR target
    params["guarantee"] = GuaranteeConfig(alpha=0.5 if args.quick else 0.1, delta=0.05 if not args.quick else 0.5)
    if args.quick:
        params["train"] = dataclasses.replace(TrainConfig(), epochs=2)
    print(f"{n} demo images (pre-generated in {data}); STAGE1_HOME={home}; "
          f"guarantee alpha={params['guarantee'].alpha}, delta={params['guarantee'].delta}")

    from prefect import flow

    @flow(name="bench-start-server")
    def start_server() -> None:
        return None

    seconds, _ = c.timed(start_server)  # the ephemeral server starts once per process: not timed below
    c.figure("ephemeral Prefect server start (excluded)", f"{seconds:.2f} s")
    runs = []
    for label in ("cold", "warm", "warm again"):
        start = time.perf_counter()
        result = train_pipeline(**params)
        seconds = time.perf_counter() - start
        runs.append(seconds)
        c.figure(f"{label} run", f"{seconds:.2f} s, {result['features']['n_computed']} images embedded, "
                 f"test MCC {result['metrics'].get('mcc', float('nan')):.3f}")
    warm = min(runs[1:])
    ratio = warm / runs[0]
    c.ratio_line("warm / cold wall time", ratio * 100, goal="<= 5%", met=ratio <= 0.05, unit="%")


if __name__ == "__main__":
    main()
