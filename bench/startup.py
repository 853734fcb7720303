"""Benchmark 12: start-up cost. `stage1 demo` cold (empty home) against warm (everything cached), as
whole commands: interpreter, imports, Prefect server, MLflow set-up and the pipeline.

A fresh $STAGE1_HOME in a temporary directory; the command runs twice in subprocesses, exactly as
`make demo` runs it the first and the second time (the cold run includes generating the demo data).
The warm run's wall time is split into where it goes: the command's own timings (`STAGE1_TIMINGS=1`:
imports, waiting for the local Prefect server, the command) and the pipeline time it prints.
`--checkout DIR` runs the command from another checkout of the code (e.g. an export of `main`) with
this interpreter, to compare before and after on the same machine.
Goal: warm <= 10% of cold.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c

ROOT = Path(__file__).resolve().parents[1]
TINY_EVA = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32}


def quick_params(data: Path, path: Path) -> list[str]:
    """`stage1 train` on a tiny dataset with a tiny random-init backbone: a smoke run, not the demo."""
    params = {
        "sources": [{"path": str(data), "kind": "folder", "name": "tiny"}],
        "splits": {"train": 0.45, "val": 0.15, "calib": 0.25, "test": 0.15},
        "backbone": {"name": "vit_small_patch16_dinov3", "weights": "random", "pooling": "cls+avg",
                     "model_kwargs": TINY_EVA, "input_size": 32},
        "features": {"batch_size": 32, "num_workers": 0},
        "train": {"epochs": 2, "batch_size": 32},
        "guarantee": {"alpha": 0.5, "delta": 0.5},
        "registry": {"experiment": "bench-startup", "model_name": "bench-startup"},
    }
    path.write_text(json.dumps(params))
    return ["train", "--params", str(path)]


def run_cli(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deployments.cli", *command], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"stage1 {' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def timings(output: str) -> dict[str, float]:
    found = re.search(r"^stage1: timings: (\{.*\})$", output, re.M)
    return json.loads(found.group(1)) if found else {}


def main() -> None:
    args = c.parse_args(__doc__, configure=lambda p: p.add_argument(
        "--checkout", help="run the command from this checkout of the code (default: this one)"))
    c.header("12. start-up: `stage1 demo` cold vs warm, whole commands", args)
    checkout = Path(args.checkout).resolve() if args.checkout else ROOT
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "STAGE1_"))}
    # both sides get a start-up timeout a loaded machine can meet (Prefect's own default is 20 s)
    env.update({"STAGE1_HOME": str(work / "home"), "STAGE1_TIMINGS": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
                "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "")})
    if not env["OMP_NUM_THREADS"]:
        env.pop("OMP_NUM_THREADS")
    if args.quick:
        command = quick_params(c.demo_data(60, n_large=0), work / "params.json")
    else:
        command = ["demo"]
    print(f"command: stage1 {' '.join(command)} (code from {checkout}); STAGE1_HOME={work / 'home'}")
    cold, cold_out = run_cli(command, env, work)
    c.figure("cold run (empty home)", f"{cold:.2f} s; pipeline {_pipeline(cold_out)}")
    warm_runs = []
    # --quick (the test suite): one warm run; a measurement takes two and keeps the faster
    for label in ("warm run",) if args.quick else ("warm run", "warm run again"):
        seconds, out = run_cli(command, env, work)
        warm_runs.append(seconds)
        embedded = re.search(r"^features: (\d+) embedded now", out, re.M)
        c.figure(label, f"{seconds:.2f} s; pipeline {_pipeline(out)}; "
                        f"{embedded.group(1) if embedded else '?'} images embedded now")
        split = timings(out)
        if split:
            c.figure(f"{label}: where the time goes", ", ".join(f"{k} {v:.2f} s" for k, v in split.items()))
    interpreter, _ = c.timed(lambda: subprocess.run([sys.executable, "-c", "pass"], env=env, check=True))
    c.figure("bare interpreter start", f"{interpreter:.2f} s")
    warm = min(warm_runs)
    c.ratio_line("warm / cold wall time", warm / cold * 100, goal="<= 10%", met=warm / cold <= 0.10, unit="%")


def _pipeline(output: str) -> str:
    found = re.search(r"^pipeline time: ([\d.]+)s", output, re.M)
    return f"{found.group(1)} s" if found else "?"


if __name__ == "__main__":
    main()
