"""Config dataclasses that describe themselves.

Every field of a config dataclass carries a comment (the house rule); `describe_fields` copies that
comment into the field's `metadata["description"]`, where forms read it: Prefect's parameter schema
is built by pydantic, which turns a stdlib dataclass field's metadata into the JSON-schema
`description` that the Prefect run form shows under the field. The comment stays the single place
where a field is explained. No pydantic import here: metadata is plain dataclass API.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from types import MappingProxyType
from typing import Any, TypeVar

T = TypeVar("T")


def field_comments(cls: type) -> dict[str, str]:
    """{field name: comment} from the class source: the comment lines right above a field (no blank
    line between) and/or a comment at the end of the field's line, joined. Empty when the source cannot
    be read (a frozen app without .py files): descriptions are for people, never needed to run."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
        comments: dict[int, str] = {}  # 1-based line -> comment text
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    classdef = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    if classdef is None:
        return {}
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in classdef.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        number = node.lineno
        above = []
        previous = number - 1
        while previous >= 1 and previous in comments and lines[previous - 1].lstrip().startswith("#"):
            above.insert(0, comments[previous])
            previous -= 1
        end = node.end_lineno or number
        inline = [comments[n] for n in range(number, end + 1) if n in comments]
        if above or inline:
            out[node.target.id] = " ".join(above + inline)
    return out


def describe_fields(cls: type[T]) -> type[T]:
    """Class decorator (put it above `@dataclass`): each field's comment becomes its description.

    The class docstring, if any, is the description of the whole group (pydantic uses it as is)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"describe_fields: {cls.__name__} is not a dataclass; put @describe_fields above @dataclass")
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        text = comments.get(f.name)
        if text and "description" not in f.metadata:
            f.metadata = MappingProxyType({**f.metadata, "description": text})
    return cls


def undescribed_fields(cls: type) -> list[str]:
    """Fields of a config dataclass without a description (tests hold every form field to one)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("description")]


def as_dict(obj: Any) -> Any:
    """dataclasses.asdict, also for tuples of dataclasses and plain values (settings, JSON)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj
