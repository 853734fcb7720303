"""The `stage1` command line as a person meets it: help that says what the tool is and which
environment it reads, every flag with help and its default, `ui`/`info` with tracking servers, and
`settings init/show`. No flows run here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import pytest

from deployments import cli
from stage1core.comparison import MetricFloor


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "stage1"):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prefix} {name}")


def test_top_level_help_says_what_the_tool_is_and_names_the_environment(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "roadwork / no-roadwork image" in text and "Prefect flows" in text and "MLflow" in text
    for name in ("STAGE1_HOME", "STAGE1_SETTINGS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "STAGE1_USER"):
        assert name in text, name
    assert "Set the environment to" not in text  # not the module docstring


def test_every_flag_has_help_and_shows_its_default():
    parsers = dict(_subparsers(cli.build_parser()))
    assert {"stage1 settings init", "stage1 settings show", "stage1 ui", "stage1 promote", "stage1 predict",
            "stage1 demo-data"} <= set(parsers)
    problems = []
    for name, parser in parsers.items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            label = action.option_strings[0] if action.option_strings else action.dest
            if not action.help:
                problems.append(f"{name} {label}: no help")
            elif action.option_strings and action.default not in (None, False) and str(action.default) not in text:
                problems.append(f"{name} {label}: default {action.default!r} not shown")
            elif action.option_strings and action.default is None and action.nargs != 0 and not action.required \
                    and not re.search(r"\b(default|repeatable)\b", action.help):
                problems.append(f"{name} {label}: says nothing of what happens when it is left out")
    assert problems == []


def test_ui_mlflow_with_a_tracking_server_points_at_it_instead_of_crashing(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:15000")

    def no_exec(*args):
        raise AssertionError(f"must not start a local UI on a server URI: {args}")

    monkeypatch.setattr(cli.os, "execvpe", no_exec)
    assert cli.main(["ui", "mlflow"]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:15000" in out and "the server is the UI" in out
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):  # a running server answers HTTP
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
        assert cli.main(["ui", "prefect"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert f"open http://127.0.0.1:{port} in a browser" in capsys.readouterr().out
    started = []  # nothing listens there any more: start the server where the setting says it is
    monkeypatch.setattr(cli.os, "execvpe", lambda exe, cmd, env: started.append(cmd))
    assert cli.main(["ui", "prefect"]) == 0
    assert started[0][1:3] == ["server", "start"] and started[0][-1] == str(port)


def test_ui_mlflow_on_a_local_store_starts_the_local_ui(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    started = []
    monkeypatch.setattr(cli.os, "execvpe", lambda exe, cmd, env: started.append(cmd))
    assert cli.main(["ui", "mlflow", "--port", "5099"]) == 0
    (cmd,) = started
    assert cmd[1:3] == ["ui", "--backend-store-uri"] and "5099" in cmd and cmd[cmd.index("--default-artifact-root")
                                                                           + 1].startswith("file://")


def test_info_names_no_local_artifact_root_when_a_server_is_configured(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:15000")
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "file://" not in json.dumps(info)
    assert info["mlflow_artifacts"] == "(kept by the MLflow server at http://127.0.0.1:15000)"
    assert info["settings"] and info["settings_fingerprint"]


def test_settings_init_then_show(monkeypatch, tmp_path, capsys):
    from stage1core.sources import SourceConfig  # noqa: F401  (import check: the CLI builds these)

    target = tmp_path / "team" / "settings.toml"
    monkeypatch.setenv("STAGE1_SETTINGS", str(target))
    data = tmp_path / "natix"
    assert cli.main(["settings", "init", "--preset", "product", "--source", f"{data}:name=natix:kind=parquet",
                     "--source", f"{tmp_path / 'extra'}:role=train_only", "--model-name", "team-model"]) == 0
    out = capsys.readouterr().out
    assert f"written to {target}" in out and "warning" in out  # the paths do not exist: said at setup
    assert cli.main(["settings", "show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["origin"] == str(target) and shown["settings"]["model_name"] == "team-model"
    assert [(s["name"], s["role"], s["kind"]) for s in shown["settings"]["sources"]] == [
        ("natix", "all", "parquet"), ("extra", "train_only", "auto")]
    assert shown["settings"]["backbone"]["name"] == "vit_small_patch16_dinov3.lvd1689m"
    # the floor shown is stage1core.comparison's (nothing in the file overrides it); None fields are left out
    floor = {k: v for k, v in dataclasses.asdict(MetricFloor()).items() if v is not None}
    assert {k: v for k, v in shown["settings"]["promotion"]["floor"].items() if v is not None} == floor
    assert cli.main(["settings", "init"]) == 2  # exists: never overwritten without --force
    assert "pass --force" in capsys.readouterr().err
    assert cli.main(["settings", "init", "--source", "/x:colour=red", "--force"]) == 2
    assert "options are name=" in capsys.readouterr().err
    target.write_text("[guarantee]\nalfa = 0.1\n")
    assert cli.main(["settings", "show"]) == 2
    assert "unknown key(s) ['alfa']" in capsys.readouterr().err


def test_the_systemd_units_run_real_commands_with_the_team_environment():
    import configparser
    import shlex
    from pathlib import Path

    folder = Path(cli.__file__).with_name("systemd")
    env = dict(line.split("=", 1) for line in (folder / "stage1.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert {"STAGE1_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"} <= set(env)
    commands = {}
    for unit in folder.glob("*.service"):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.optionxform = str
        parser.read_string(unit.read_text())
        service = parser["Service"]
        commands[unit.name] = shlex.split(service["ExecStart"].replace("\\\n", " "))
        assert service.get("Restart") == "on-failure" and parser["Install"]["WantedBy"] == "multi-user.target"
    serve = commands["stage1-serve.service"]
    assert serve[0].endswith("/stage1") and serve[1:] == ["serve"]
    assert cli.build_parser().parse_args(serve[1:]).fn is cli.cmd_serve
    worker = commands["stage1-worker@.service"]
    assert worker[1:] == ["worker", "start", "--pool", "%i", "--type", "process", "--limit", "1"]
    assert commands["stage1-mlflow.service"][1] == "server" and commands["stage1-prefect-server.service"][1:3] == [
        "server", "start"]
