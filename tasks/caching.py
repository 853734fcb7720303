"""Prefect cache keys from content fingerprints and the code a task runs, and a record of the files a
cached result needs.

Key = fingerprint(task name, the task's code fingerprint, the fingerprints of the task's inputs). Paths
are never keys: inputs are reduced to content fingerprints first.

The code fingerprint covers the code the task can run, so editing code a task does not reach (the demo
generator, another task) keeps its cache, and editing code it does reach recomputes it:
- in the module that defines the task, the top-level definitions the task reaches by name (its body and
  decorators, the helpers, classes and constants they name, and theirs in turn), plus the module's
  top-level statements that bind no name (they run on import);
- every project module (stage1core.*, tasks.*) those import, transitively, whole: module-level,
  function-level and relative imports alike, with the package `__init__` files on the way;
- the JSON files a reached package ships beside its `__init__` (the bundle schemas of
  stage1core.schemas: they decide which bundles and policy files validate).
A definition of the task's own module that is used only through a string lookup is not seen; task
modules have none. Imported modules count whole for the same reason (registries, getattr).

`OutputCache` is both halves of a cache: the `cache_key_fn` that Prefect calls with the bound call
parameters, and, as `@CACHE.records_outputs` under `@task`, the wrapper that records the files the
task's result points at, under the key of the same parameters. When those files were deleted, the key
function returns None and the task runs again instead of returning a dangling reference.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from stage1core.fingerprint import fingerprint, sha256_bytes
from stage1core.home import home_path
from stage1core.storage import atomic_write_json

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# the packages whose code is part of a task's key; everything else is a versioned dependency
PROJECT_PACKAGES = ("stage1core", "tasks")


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the Python sources of stage1core and tasks (and the schemas): all the project's code,
    for what depends on every task at once (a retrain's inputs). A task's cache key uses
    `task_code_fingerprint`, the part of this that the task reaches."""
    import stage1core
    import tasks

    digests = []
    for package in (stage1core, tasks):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                digests.append([str(path.relative_to(root.parent)), sha256_bytes(path.read_bytes())])
    return fingerprint("code", digests)


# --------------------------------------------------------------------------------------- code a task runs


def module_file(root: Path, module: str) -> Path | None:
    """The source file of `module` under `root` (a package's `__init__.py`), or None."""
    base = root.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    file = base.with_suffix(".py")
    return file if file.is_file() else None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from ... import` statement in `module` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _import_targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> dict[str, set[str]]:
    """name bound by the statement -> the modules it may name. `from m import x` gives m and m.x, as x
    may be a submodule; names that are no module are dropped later."""
    if isinstance(node, ast.Import):
        return {(a.asname or a.name.split(".")[0]): {a.name} for a in node.names}
    base = _absolute(node, module, is_package)
    return {(a.asname or a.name): {base, f"{base}.{a.name}"} for a in node.names}


def _statements(tree: ast.AST) -> Iterator[ast.AST]:
    """`tree` and every statement nested in it. Expressions are not entered: an import is a statement,
    and skipping them makes this several times faster than ast.walk."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            value = getattr(node, field, None)
            if isinstance(value, list):
                todo += value


def _imports_in(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module named by an import statement anywhere in `tree` (function-level ones included)."""
    found: set[str] = set()
    for node in _statements(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for targets in _import_targets(node, module, is_package).values():
                found |= targets
    return found


def module_closure(modules: Iterable[str], *, root: Path, packages: tuple[str, ...] = PROJECT_PACKAGES
                   ) -> dict[str, Path]:
    """The project modules among `modules` and those they import, transitively, with their parent
    packages (importing a.b runs a/__init__.py): module name -> source file."""
    found: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in found or name.split(".")[0] not in packages:
            continue
        path = module_file(root, name)
        if path is None:
            continue  # a name imported from a module (function, class), not a module
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        stat = path.stat()
        todo += _file_imports(str(path), name, stat.st_mtime_ns, stat.st_size)
    return found


@functools.cache
def _file_imports(path: str, module: str, mtime_ns: int, size: int) -> frozenset[str]:
    """The modules a source file imports, per version of the file: the tasks' closures overlap, and
    parsing them again for each task took seconds."""
    tree = ast.parse(Path(path).read_bytes(), path)
    return frozenset(_imports_in(tree, module, Path(path).name == "__init__.py"))


@functools.lru_cache(maxsize=4)  # the task modules; syntax trees are too big to keep them all
def _parsed(path: str, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(Path(path).read_bytes(), path)


def _parse(path: Path) -> ast.Module:
    stat = path.stat()
    return _parsed(str(path), stat.st_mtime_ns, stat.st_size)


def _bindings(body: list[ast.stmt]) -> Iterator[tuple[ast.stmt, list[str]]]:
    """(statement, names it binds) for the top-level statements of a module. An `if`/`try` block counts
    whole, and the definitions inside it are walked into too (TYPE_CHECKING imports, fallbacks)."""
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield stmt, [stmt.name]
        elif isinstance(stmt, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            yield stmt, [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(stmt, ast.Import | ast.ImportFrom):
            yield stmt, [a.asname or a.name.split(".")[0] for a in stmt.names]
        elif isinstance(stmt, ast.If | ast.Try):
            yield stmt, []  # the condition and the handlers count, whichever branch is used
            for block in (stmt.body, stmt.orelse, *(h.body for h in getattr(stmt, "handlers", ())),
                          getattr(stmt, "finalbody", [])):
                yield from _bindings(block)
        elif not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            yield stmt, []  # runs on import and binds nothing we track: always part of the code


def reached_definitions(tree: ast.Module, function: str) -> list[ast.stmt]:
    """The top-level statements of a module that `function` reaches by name, in source order, plus those
    that bind no name."""
    statements = list(_bindings(tree.body))
    by_name: dict[str, list[int]] = {}
    for i, (_, names) in enumerate(statements):
        for name in names:
            by_name.setdefault(name, []).append(i)
    if function not in by_name:
        raise LookupError(f"no top-level definition of {function!r} in the module")
    reached: set[int] = set()
    todo = [i for i, (_, names) in enumerate(statements) if not names] + by_name[function]
    while todo:
        i = todo.pop()
        if i in reached:
            continue
        reached.add(i)
        for node in ast.walk(statements[i][0]):
            if isinstance(node, ast.Name):
                todo += by_name.get(node.id, [])
    return [statements[i][0] for i in sorted(reached)]


def code_of_task(module: str, function: str, *, root: Path, file: Path | None = None,
                 packages: tuple[str, ...] = PROJECT_PACKAGES) -> dict[str, str]:
    """What a task's code fingerprint covers: `module:function` -> a digest of the reached definitions
    of its own module (their syntax trees: comments and blank lines do not count), and the path of every
    module and JSON file it reaches, relative to `root` -> sha256 of its bytes."""
    file = file or module_file(root, module)
    if file is None:
        raise FileNotFoundError(f"no source file for module {module!r} under {root}")
    is_package = file.name == "__init__.py"
    own = reached_definitions(_parse(file), function)
    imported: set[str] = set()
    for stmt in own:
        imported |= _imports_in(stmt, module, is_package)
    parts = module.split(".")
    imported |= {".".join(parts[:i]) for i in range(1, len(parts))}
    imported.discard(module)  # the task's own module counts by what the task reaches, not whole
    covered = {f"{module}:{function}": sha256_bytes("\n".join(ast.dump(s) for s in own).encode())}
    # the own module comes back whole only through an import cycle, where it must count whole
    for path in sorted(module_closure(imported, root=root, packages=packages).values()):
        covered[path.relative_to(root).as_posix()] = sha256_bytes(path.read_bytes())
        if path.name == "__init__.py":
            for data in sorted(path.parent.glob("*.json")):
                covered[data.relative_to(root).as_posix()] = sha256_bytes(data.read_bytes())
    return covered


@functools.cache
def task_code_fingerprint(module: str, function: str, root: Path = PROJECT_ROOT,
                          packages: tuple[str, ...] = PROJECT_PACKAGES) -> str:
    """The code fingerprint of the task `function` defined in `module` (see the module docstring);
    computed once per process."""
    file = module_file(root, module)
    if file is None and module in sys.modules:  # a task defined outside the project's packages (tests)
        file = Path(sys.modules[module].__file__ or "")
    covered = code_of_task(module, function, root=root, file=file, packages=packages)
    return fingerprint("task-code", sorted(covered.items()))


# ------------------------------------------------------------------------------------------ the cache


class OutputCache:
    """A Prefect `cache_key_fn` that also records which files a cached result needs.

    `key_parts(parameters)` reduces the task's call parameters to content fingerprints; `paths(result,
    parameters)` names the files and directories the result points at (None: the result is all there
    is). Decorate the task function with `records_outputs` under `@task`.
    """

    def __init__(self, name: str, key_parts: Callable[[dict[str, Any]], Any],
                 paths: Callable[[Any, dict[str, Any]], Iterable[str | Path]] | None = None):
        self.name = name
        self.key_parts = key_parts
        self.paths = paths
        self.function: Callable[..., Any] | None = None

    def code_fingerprint(self) -> str:
        if self.function is None:
            raise TypeError(f"the cache of task {self.name!r} is attached to no function: decorate the task "
                            f"function with @<its OutputCache>.records_outputs under @task")
        return task_code_fingerprint(self.function.__module__, self.function.__name__)

    def key(self, parameters: dict[str, Any]) -> str:
        return fingerprint("prefect-task", self.name, self.code_fingerprint(), self.key_parts(parameters))

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

    def records_outputs(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Decorator (under `@task`): run the task, then record the files its result points at, keyed by
        the call's parameters bound as Prefect binds them (defaults applied), so the record is found by
        the key Prefect computes for the same call."""
        if self.function is not None:
            raise TypeError(f"the cache of task {self.name!r} already records {self.function.__qualname__}")
        self.function = fn
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            if self.paths is not None:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                parameters = dict(bound.arguments)
                atomic_write_json(self._record(self.key(parameters)),
                                  {"task": self.name, "paths": [str(p) for p in self.paths(result, parameters)]})
            return result

        # Prefect derives the task key from the code object; point it at the task's own code
        run.__prefect_task_source__ = fn  # type: ignore[attr-defined]
        return run
