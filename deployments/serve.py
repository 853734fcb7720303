"""Serve every deployment of deployments/prefect.yaml from one process, without workers or work pools:
the small-team setup (one machine, one GPU or none). Also creates the work pools and the `gpu`
concurrency limit that the worker setup needs.

`stage1 serve` is `prefect.serve(...)` over the same deployments, schedules and triggers as
`prefect deploy --prefect-file deployments/prefect.yaml --all`, with the same build step filling in
the team values, so switching between the two changes where runs execute, not what they do.

Stopping `stage1 serve` (Ctrl-C, SIGTERM from systemd) leaves the deployments and their schedules
active: Prefect's default would pause them all, and the nightly retrain would silently stop. Runs
scheduled while serve is down wait in Scheduled (and are marked Late) until it is back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")
# the work pools prefect.yaml refers to, and the worker type `stage1 serve --setup-only` gives them on a
# plain host (the compose setup's docker worker creates `gpu` as a docker pool itself)
WORK_POOLS = {"cpu": "process", "gpu": "process"}
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


def build_values(project: dict[str, Any]) -> dict[str, Any]:
    """Run prefect.yaml's build step (deployments.steps.deployment_values) as `prefect deploy` would."""
    from deployments.steps import deployment_values

    values: dict[str, Any] = {}
    for step in project.get("build") or []:
        (fqn, inputs), = step.items()
        if fqn != "deployments.steps.deployment_values":
            raise ValueError(f"prefect.yaml: build step {fqn} is not one `stage1 serve` knows how to run")
        inputs = {k: v for k, v in inputs.items() if k not in ("id", "requires")}
        output = deployment_values(**inputs)
        values.update(output)
        if step[fqn].get("id"):
            values[step[fqn]["id"]] = output
    return values


def rendered_specs(path: str | Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The deployments of prefect.yaml with the build step's values filled in (triggers are left as they
    are: their templates are rendered by the server, from each event)."""
    from prefect.utilities.templating import apply_values

    project = load_project(path)
    values = build_values(project)
    out = []
    for spec in project["deployments"]:
        triggers = spec.get("triggers")
        filled = apply_values({k: v for k, v in spec.items() if k != "triggers"}, values)
        if triggers is not None:
            filled["triggers"] = triggers
        out.append(filled)
    return out


def build_deployments(names: list[str] | None = None, path: str | Path = PREFECT_YAML) -> list:
    """RunnerDeployments for `prefect.serve`, from prefect.yaml (work pools are not used when serving)."""
    from prefect.flows import load_flow_from_entrypoint

    out = []
    for spec in rendered_specs(path):
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
    """Create the process work pools `cpu` and `gpu` and the `gpu` tag concurrency limit if missing
    (idempotent). An existing pool is kept whatever its type (the compose setup's `gpu` is docker)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    done = {}
    with get_client(sync_client=True) as client:
        for name, kind in WORK_POOLS.items():
            try:
                done[name] = f"exists ({client.read_work_pool(name).type})"
            except ObjectNotFound:
                try:
                    client.create_work_pool(WorkPoolCreate(
                        name=name, type=kind, base_job_template=ProcessWorker.get_default_base_job_template()))
                    done[name] = f"created ({kind})"
                except ObjectAlreadyExists:  # a worker made it meanwhile
                    done[name] = f"exists ({client.read_work_pool(name).type})"
        client.create_concurrency_limit(tag="gpu", concurrency_limit=GPU_CONCURRENCY)
        done["gpu concurrency limit"] = str(GPU_CONCURRENCY)
    return done


def serve_all(names: list[str] | None = None, *, limit: int | None = None) -> None:
    """Serve the deployments (blocks until interrupted; the deployments stay active when it stops)."""
    from prefect import serve

    serve(*build_deployments(names), limit=limit, pause_on_shutdown=False)
