"""docker/ checked without a Docker engine: the compose file parses and is wired consistently with
deployments/prefect.yaml, every file it and the Dockerfile reference exists, every command they run
exists, and the image installs the same package set as the Makefile's venv."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def gpu_job_variables() -> dict:
    specs = yaml.safe_load((DOCKER / "prefect.yaml").read_text())["deployments"]
    return next(s for s in specs if s["name"] == "train-pipeline")["work_pool"]["job_variables"]


def test_the_compose_deployments_are_the_plain_host_deployments_on_docker_pools():
    def load(path):
        return yaml.safe_load(path.read_text())

    docker, plain = load(DOCKER / "prefect.yaml"), load(ROOT / "deployments" / "prefect.yaml")
    assert docker["build"] == plain["build"] and docker["pull"] == plain["pull"] == []
    for ours, theirs in zip(docker["deployments"], plain["deployments"], strict=True):
        assert {k: v for k, v in ours.items() if k != "work_pool"} == {
            k: v for k, v in theirs.items() if k != "work_pool"}, ours["name"]
        assert ours["work_pool"]["name"] == theirs["work_pool"]["name"]
        if ours["work_pool"]["name"] == "gpu":
            assert ours["work_pool"]["job_variables"]["container_create_kwargs"]["device_requests"][0][
                "capabilities"] == [["gpu"]]
            assert theirs["work_pool"]["job_variables"] == {"env": "{{ stage1.process_env }}"}


def test_compose_has_the_team_services_wired_together(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "prefect-server", "mlflow", "worker-gpu", "worker-cpu", "dask-scheduler",
                             "dask-worker"}
    # the Dask cluster (scale-out) starts only with its profile, from the stage1 image, on the shared home
    for name in ("dask-scheduler", "dask-worker"):
        assert services[name]["profiles"] == ["scale-out"] and services[name]["image"] == "stage1:latest"
    worker = services["dask-worker"]
    assert worker["command"][:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert worker["environment"]["STAGE1_HOME"] == services["worker-cpu"]["environment"]["STAGE1_HOME"]
    assert "stage1-home:/data/stage1" in worker["volumes"]
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                if source.startswith("."):
                    assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], (name, source)
        assert svc.get("networks") == ["stage1"]
    prefect_db = services["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("@postgres:5432/prefect")
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in mlflow_cmd and "@postgres:5432/mlflow" in mlflow_cmd
    assert "--artifacts-destination /mlflow-artifacts" in mlflow_cmd
    assert any(v.endswith(":/mlflow-artifacts") for v in services["mlflow"]["volumes"])
    assert "CREATE DATABASE mlflow" in (DOCKER / "postgres-init.sql").read_text()
    build = services["worker-cpu"]["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"


def test_compose_matches_the_gpu_pool_job_variables(compose):
    jobs = gpu_job_variables()
    assert jobs["image"] == compose["services"]["worker-cpu"]["image"]
    assert jobs["networks"] == [compose["networks"]["stage1"]["name"]]
    home_volume = jobs["volumes"][0].split(":")[0]
    assert compose["volumes"][home_volume]["name"] == home_volume
    assert jobs["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and "mlflow" in compose["services"]
    worker = compose["services"]["worker-gpu"]["command"]
    assert worker[:3] == ["prefect", "worker", "start"] and worker[worker.index("--pool") + 1] == "gpu"
    assert worker[worker.index("--type") + 1] == "docker"
    assert "prefect-docker" in compose["services"]["worker-gpu"]["environment"]["EXTRA_PIP_PACKAGES"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in compose["services"]["worker-gpu"]["volumes"]


def test_commands_in_compose_exist(compose):
    import sys

    from deployments.cli import main

    bin_dir = Path(sys.executable).parent
    services = compose["services"]
    for name in ("prefect-server", "worker-gpu", "worker-cpu"):
        cmd = services[name]["command"]
        assert cmd[0] == "prefect" and (bin_dir / "prefect").exists()
    assert services["worker-cpu"]["command"][:3] == ["prefect", "worker", "start"]
    assert services["dask-scheduler"]["command"][:2] == ["dask", "scheduler"] and (bin_dir / "dask").exists()
    mlflow_cmd = shlex.split(services["mlflow"]["command"][-1].replace("${POSTGRES_PASSWORD:-stage1}", "pw"))
    assert "mlflow" in mlflow_cmd and (bin_dir / "mlflow").exists()
    assert mlflow_cmd[mlflow_cmd.index("mlflow") + 1] == "server"
    with pytest.raises(SystemExit) as done:  # the image's CMD: `stage1 info` is a real subcommand
        main(["info", "--help"])
    assert done.value.code == 0


def test_dockerfile_is_a_cuda_runtime_image_run_as_a_user(dockerfile):
    froms = [args for word, args in dockerfile if word == "FROM"]
    assert len(froms) == 1 and froms[0].startswith("nvidia/cuda:") and "runtime" in froms[0]
    users = [args for word, args in dockerfile if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    words = [w for w, _ in dockerfile]
    assert words.index("USER") < words.index("CMD")
    for word, args in dockerfile:
        if word == "COPY" and not args.startswith("--from"):
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    cmd = next(args for word, args in dockerfile if word == "CMD")
    assert cmd.startswith('["stage1"')
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "stage1" in pyproject["project"]["scripts"]


def test_image_installs_the_same_package_set_as_the_venv(dockerfile):
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH\s*:=\s*(.+)$", makefile, re.M).group(1).strip()
    arg = next(args for word, args in dockerfile if word == "ARG" and args.startswith("TORCH="))
    assert arg.split("=", 1)[1].strip('"') == torch_pin
    runs = " ".join(args for word, args in dockerfile if word == "RUN")
    install = re.search(r"uv pip install (.+?)(&&|$)", runs).group(1).split()
    packages = [a for a in install if not a.startswith("--")]
    assert packages == ["$TORCH", '".[demo]"'], packages  # nothing beside pyproject's set
    assert "--python 3.11" in runs
    # every package directory pyproject installs is copied into the image
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {args.split()[-1].strip("./") for word, args in dockerfile if word == "COPY"}
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, pattern
    assert "demo" in pyproject["project"]["optional-dependencies"]
