"""`stage1 info`, `ui`, `serve` and `ingest`: the commands on the running service (where state lives,
the UIs, serving the deployments, announcing landed data). deployments/cli.py builds the parser and
runs the commands."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from stage1core.home import home_path, mlflow_artifact_root, stage1_home
from tasks.servers import ServerUnreachable, check_server


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
