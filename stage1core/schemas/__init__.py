"""JSON schemas of every JSON file a bundle holds, and one validator for all of them."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

SCHEMA_DIR = Path(__file__).parent


class SchemaError(ValueError):
    """A JSON document that does not match its schema; the message names the file and the field."""


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    path = SCHEMA_DIR / f"{name}.schema.json"
    if not path.is_file():
        known = sorted(p.name.removesuffix(".schema.json") for p in SCHEMA_DIR.glob("*.schema.json"))
        raise SchemaError(f"no schema named {name!r} in {SCHEMA_DIR}; known schemas: {known}")
    return json.loads(path.read_text())


def validate_json(obj: Any, name: str, *, source: str = "<memory>") -> None:
    """Raise SchemaError (naming `source` and the failing field) unless `obj` matches schema `name`."""
    import jsonschema

    schema = load_schema(name)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise SchemaError(f"{source}: does not match schema {name!r} at {where}: {first.message}")
