"""Prefect cache keys from content fingerprints, and a check that cached outputs still exist.

Key = fingerprint(task name, code fingerprint, the fingerprints of the task's inputs). The code
fingerprint hashes the source of stage1core and tasks, so changing the code that computes something
invalidates it (a superset of Prefect's TASK_SOURCE). Paths are never keys: inputs are reduced to
content fingerprints first. A cached result points at files under $STAGE1_HOME; if those were
deleted, the key function returns None and the task runs again.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from stage1core.fingerprint import fingerprint, sha256_bytes
from stage1core.home import home_path
from stage1core.storage import atomic_write_json


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the Python sources of stage1core and tasks (and the schemas)."""
    import stage1core
    import tasks

    digests = []
    for package in (stage1core, tasks):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                digests.append([str(path.relative_to(root.parent)), sha256_bytes(path.read_bytes())])
    return fingerprint("code", digests)


class OutputCache:
    """A Prefect `cache_key_fn` that also remembers which files a cached result needs."""

    def __init__(self, name: str, key_parts: Callable[[dict[str, Any]], Any]):
        self.name = name
        self.key_parts = key_parts

    def key(self, parameters: dict[str, Any]) -> str:
        return fingerprint("prefect-task", self.name, code_fingerprint(), self.key_parts(parameters))

    def _record(self, key: str) -> Path:
        return home_path("prefect", "outputs") / f"{key}.json"

    def __call__(self, context: Any, parameters: dict[str, Any]) -> str | None:
        key = self.key(parameters)
        record = self._record(key)
        if record.exists():
            try:
                paths = json.loads(record.read_text())["paths"]
            except (OSError, ValueError, KeyError):
                return None
            if not all(Path(p).exists() for p in paths):
                return None  # outputs were deleted: recompute instead of returning a dangling reference
        return key

    def remember(self, parameters: dict[str, Any], paths: Iterable[str | Path]) -> None:
        atomic_write_json(self._record(self.key(parameters)), {"task": self.name, "paths": [str(p) for p in paths]})
