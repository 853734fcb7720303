"""Serve every deployment of deployments/prefect.yaml from one process, without workers or work pools:
the small-team setup (one machine, one GPU or none). Also creates the work pools and the `gpu`
concurrency limit that the worker setup needs.

`stage1 serve` is `prefect.serve(...)` over the same deployments, schedules and triggers as
`prefect deploy --prefect-file deployments/prefect.yaml --all`, so switching between the two changes
where runs execute, not what they do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")
# the work pools prefect.yaml refers to, and their worker types
WORK_POOLS = {"cpu": "process", "gpu": "docker"}
# tasks tagged `gpu` run at most this many at a time (one GPU per worker host by default)
GPU_CONCURRENCY = 1


def load_project(path: str | Path = PREFECT_YAML) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def deployment_specs(path: str | Path = PREFECT_YAML) -> list[dict[str, Any]]:
    return load_project(path)["deployments"]


def _schedules(spec: dict[str, Any]) -> list:
    from prefect.schedules import Cron

    return [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
            for s in spec.get("schedules") or [] if "cron" in s]


def _triggers(spec: dict[str, Any]) -> list:
    from prefect.events import DeploymentEventTrigger

    return [DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"})
            for t in spec.get("triggers") or [] if t.get("type", "event") == "event"]


def build_deployments(names: list[str] | None = None, path: str | Path = PREFECT_YAML) -> list:
    """RunnerDeployments for `prefect.serve`, from prefect.yaml (work pools are not used when serving)."""
    from prefect.flows import load_flow_from_entrypoint

    out = []
    for spec in deployment_specs(path):
        if names and spec["name"] not in names:
            continue
        flow = load_flow_from_entrypoint(spec["entrypoint"])
        out.append(flow.to_deployment(
            name=spec["name"], description=spec.get("description"), tags=spec.get("tags"),
            parameters=spec.get("parameters") or {}, schedules=_schedules(spec), triggers=_triggers(spec),
            concurrency_limit=spec.get("concurrency_limit"),
        ))
    return out


def ensure_infrastructure() -> dict[str, str]:
    """Create the work pools and the `gpu` tag concurrency limit if missing (idempotent)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    done = {}
    with get_client(sync_client=True) as client:
        for name, kind in WORK_POOLS.items():
            try:
                client.read_work_pool(name)
                done[name] = "exists"
            except ObjectNotFound:
                try:
                    client.create_work_pool(WorkPoolCreate(name=name, type=kind))
                    done[name] = f"created ({kind})"
                except Exception as exc:  # a docker pool needs prefect-docker's job template
                    done[name] = f"not created: {exc}"
            except ObjectAlreadyExists:
                done[name] = "exists"
        client.create_concurrency_limit(tag="gpu", concurrency_limit=GPU_CONCURRENCY)
        done["gpu concurrency limit"] = str(GPU_CONCURRENCY)
    return done


def serve_all(names: list[str] | None = None, *, limit: int | None = None) -> None:
    """Serve the deployments (blocks until interrupted)."""
    from prefect import serve

    serve(*build_deployments(names), limit=limit)
