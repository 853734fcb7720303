"""Fail fast when a configured server is down. No prefect or mlflow import: the CLI checks its
settings before it imports either."""

from __future__ import annotations

from urllib.parse import urlparse


class ServerUnreachable(RuntimeError):
    """A tracking or orchestration server named by a setting does not answer; the message names the setting."""


def check_server(url: str, *, setting: str, timeout_s: float = 3.0) -> None:
    """Fail fast, before any expensive work, when the http(s) server behind `setting` does not accept a
    connection within `timeout_s` (clients would otherwise retry with backoff for minutes).
    Local stores (sqlite, file paths) are not checked."""
    import socket

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ServerUnreachable(
            f"{setting}={url} is unreachable ({type(exc).__name__}: {exc}); start the server or point "
            f"{setting} at a running one (unset it for the embedded default). Nothing was computed."
        ) from exc
