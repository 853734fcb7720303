"""Fail fast when a configured server is down or hung. No prefect or mlflow import: the CLI checks
its settings before it imports either."""

from __future__ import annotations

from urllib.parse import urlparse

SERVER_NAMES = {"MLFLOW_TRACKING_URI": "MLflow server", "PREFECT_API_URL": "Prefect server"}


class ServerUnreachable(RuntimeError):
    """A tracking or orchestration server named by a setting does not answer; the message names the setting."""


def check_server(url: str, *, setting: str, timeout_s: float = 3.0, answer_timeout_s: float = 10.0) -> None:
    """Fail fast, before any expensive work, when the http(s) server behind `setting` does not accept a
    connection within `timeout_s`, or accepts and does not answer an HTTP request within
    `answer_timeout_s` (clients would otherwise wait and retry with backoff for minutes). Any HTTP
    answer counts, whatever its status. Local stores (sqlite, file paths) are not checked."""
    import http.client
    import socket
    import ssl

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        return
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    what = SERVER_NAMES.get(setting, "server")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ServerUnreachable(
            f"{setting}={url} is unreachable ({type(exc).__name__}: {exc}); start the server or point "
            f"{setting} at a running one (unset it for the embedded default). Nothing was computed."
        ) from exc
    path = parsed.path.rstrip("/") + "/health"
    conn_cls = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(host, port, timeout=answer_timeout_s)
    try:
        conn.request("GET", path, headers={"User-Agent": "stage1-check"})
        conn.getresponse().read(1024)
    except TimeoutError as exc:
        raise ServerUnreachable(
            f"{what} at {url} does not answer (waited {answer_timeout_s:.0f} s; it accepts connections but sends "
            f"nothing back): restart it or point {setting} at a server that answers (unset it for the embedded "
            "default). Nothing was computed."
        ) from exc
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        raise ServerUnreachable(
            f"{what} at {url} does not answer HTTP ({type(exc).__name__}: {exc}): check that {setting} names the "
            "server's address, or unset it for the embedded default. Nothing was computed."
        ) from exc
    finally:
        conn.close()
