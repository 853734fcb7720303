"""`stage1`: the command line. Importing it (through `tasks`, see tasks/__init__) sets the environment to
$STAGE1_HOME before any command imports Prefect.

Here: the parser, running a command (home, server checks, the local Prefect server, errors for people) and
the console script. The commands, by subject: cli_runs (demo, demo-data, train, evaluate), cli_bundles
(predict, keygen, sign), cli_service (info, ui, serve, ingest), cli_registry (promote, rollback, history),
cli_settings (settings).
"""

from __future__ import annotations

import argparse
import atexit
import errno
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from deployments.cli_bundles import cmd_keygen, cmd_predict, cmd_sign
from deployments.cli_registry import cmd_history, cmd_promote, cmd_rollback
from deployments.cli_runs import (
    cmd_demo,
    cmd_demo_data,
    cmd_evaluate,
    cmd_train,
    demo_parameters,  # noqa: F401  (its import path: bench/cached_rerun.py)
)
from deployments.cli_service import cmd_info, cmd_ingest, cmd_serve, cmd_ui
from deployments.cli_settings import cmd_settings
from stage1core.home import (
    HomeError,
    home_path,
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


def _stop_signal(exc: BaseException | None) -> int | None:
    """The signal an exception stands for: ours (Stopped), Prefect's TerminationSignal, or Ctrl-C."""
    if isinstance(exc, Stopped):
        return exc.signum
    if type(exc).__name__ == "TerminationSignal" and isinstance(getattr(exc, "signal", None), int):
        return exc.signal
    if isinstance(exc, KeyboardInterrupt):
        return int(signal.SIGINT)
    return None


def _keep_stop_requests(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    """A `sys.unraisablehook` that does not let Python drop a stop request.

    A signal handler raises in whatever Python code the main thread runs when the signal arrives. When
    that is a garbage-collector or weakref callback or a `__del__` (SQLAlchemy's `_collection_gced`
    was seen), Python reports the exception as unraisable and goes on: the run would finish as if never
    asked to stop. This hook delivers the same signal again, so that its handler (ours or Prefect's
    SIGTERM bridge) raises in the code that runs next. Other unraisable errors go to `previous`."""

    def hook(unraisable: Any) -> object:
        try:
            signum = _stop_signal(unraisable.exc_value)
            if signum is None:
                return previous(unraisable)
            _deliver_again(signum)
        except BaseException as exc:  # a stop that lands in this hook: keep it too
            signum = _stop_signal(exc)
            if signum is None:
                raise
            _deliver_again(signum)
        return None

    return hook


def _deliver_again(signum: int) -> None:
    """Send `signum` to this process from another thread: raised here, in the main thread, the handler's
    exception would land in the unraisable hook again."""
    import threading
    import time

    def send() -> None:
        time.sleep(0.02)  # the main thread has left the hook by then
        os.kill(os.getpid(), signum)

    threading.Thread(target=send, name="stage1-stop-again", daemon=True).start()


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
    previous_unraisable = sys.unraisablehook
    clock = _Timings()
    try:
        sys.unraisablehook = _keep_stop_requests(previous_unraisable)
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
        sys.unraisablehook = previous_unraisable


# adds one subcommand: add(name, help, fn, description='') -> its parser (build_parser's `add`)
AddCommand = Callable[..., argparse.ArgumentParser]


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks; appends a flag's default to its help unless the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" not in text and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
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

    _run_commands(add)
    _setup_commands(add)
    _service_commands(add)
    _registry_commands(add)
    _signing_commands(add)
    return parser


def _run_commands(add: AddCommand) -> None:
    """The subcommands that run the pipeline or a bundle: demo, demo-data, train, predict."""
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


def _setup_commands(add: AddCommand) -> None:
    """Where state lives and which settings apply: info, settings show, settings init."""
    from stage1core.settings import TeamSettings

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


def _service_commands(add: AddCommand) -> None:
    """The running service: ui, serve, ingest."""
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


def _registry_commands(add: AddCommand) -> None:
    """Registered versions: promote, rollback, history, evaluate."""
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


def _signing_commands(add: AddCommand) -> None:
    """Signed bundles: keygen, sign."""
    p = add("keygen", "write an ed25519 key pair for signing bundles", cmd_keygen)
    p.add_argument("--out", required=True, help="folder for stage1-bundle.key (private, mode 0600) and .pub")

    p = add("sign", "sign a bundle's manifest with the team key (writes manifest.sig)", cmd_sign)
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--key", help="ed25519 private key file (default: $STAGE1_BUNDLE_SIGNING_KEY)")


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
