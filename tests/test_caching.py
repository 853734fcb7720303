"""Task cache keys: the record of a task's outputs is written under the key Prefect computes for the same
call, and a task's code fingerprint covers the code it reaches and nothing else."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from prefect import flow, task

from tasks.caching import PROJECT_ROOT, OutputCache, code_of_task, task_code_fingerprint

TOY_CACHE = OutputCache("write_text", lambda p: (p["text"], p["suffix"]), paths=lambda path, p: [path])


@task(name="write_text", cache_key_fn=TOY_CACHE, persist_result=True)
@TOY_CACHE.records_outputs
def write_text(out_dir: str, text: str, suffix: str = ".txt") -> str:
    path = Path(out_dir) / f"{text}{suffix}"
    path.write_text(text)
    return str(path)


def test_the_record_is_written_under_the_key_of_prefects_call_parameters(tmp_path):
    from prefect.utilities.callables import get_call_parameters

    # what Prefect hands the cache_key_fn: the call bound to the task's signature, defaults applied
    parameters = get_call_parameters(write_text.fn, (str(tmp_path), "a"), {})
    assert parameters["suffix"] == ".txt"
    key = TOY_CACHE(None, parameters)
    record = TOY_CACHE._record(key)
    assert not record.exists()

    path = write_text.fn(str(tmp_path), "a")  # `suffix` left at its default
    assert record.exists() and TOY_CACHE(None, parameters) == key
    Path(path).unlink()
    assert TOY_CACHE(None, parameters) is None  # the output is gone: not served from the cache

    explicit = get_call_parameters(write_text.fn, (str(tmp_path), "a"), {"suffix": ".md"})
    assert TOY_CACHE.key(explicit) != key
    write_text.fn(str(tmp_path), text="a", suffix=".md")
    assert TOY_CACHE._record(TOY_CACHE.key(explicit)).exists()


@pytest.mark.slow
def test_prefect_serves_the_recorded_result_and_recomputes_deleted_outputs(prefect_server, tmp_path):
    @flow
    def twice(out_dir: str, delete_between: bool) -> list[str]:
        first = write_text(out_dir, "b", return_state=True)
        if delete_between:
            Path(first.result()).unlink()
        second = write_text(out_dir, "b", return_state=True)
        return [first.name, second.name]

    assert twice(str(tmp_path), False)[1] == "Cached"
    # the record is found under Prefect's key: deleting the output makes the next call run again
    assert twice(str(tmp_path), True) == ["Cached", "Completed"]
    assert (tmp_path / "b.txt").read_text() == "b"


def test_every_task_cache_is_attached_to_its_task():
    import tasks.finetune
    import tasks.pipeline

    caches = [v for m in (tasks.pipeline, tasks.finetune) for v in vars(m).values() if isinstance(v, OutputCache)]
    assert {cache.function.__name__ for cache in caches} == {
        "extract_features", "fit_head", "score_baselines", "calibrate", "evaluate_test", "export_bundle",
        "fit_backbone", "extract_adapted_features_task"}
    for cache in caches:
        assert len(cache.code_fingerprint()) == 64
    assert not hasattr(OutputCache, "remember")


def test_an_unattached_cache_says_how_to_attach_it():
    with pytest.raises(TypeError, match="records_outputs"):
        OutputCache("orphan", lambda p: ()).key({})


# ------------------------------------------------------------------------------- code fingerprints


def _package(root: Path) -> Path:
    """A synthetic project package: jobs.job reaches core (and deep through it), lazy (a function-level
    relative import) and the data package with its JSON file; jobs.other alone reaches demo."""
    files = {
        "pkg/__init__.py": "",
        "pkg/core.py": "from pkg.deep import DEPTH\n\ndef core():\n    return DEPTH\n",
        "pkg/deep.py": "DEPTH = 1\n",
        "pkg/demo.py": "def demo():\n    return 2\n",
        "pkg/lazy.py": "X = 1\n",
        "pkg/data/__init__.py": "def schema():\n    return 'schema.json'\n",
        "pkg/data/schema.json": "{}\n",
        "pkg/jobs.py": textwrap.dedent('''\
            """Jobs."""
            from pkg import demo as demo_module

            from .core import core
            from .data import schema

            SCALE = 3


            def helper():
                from . import lazy

                return lazy.X * SCALE


            def job():
                return core() + helper(), schema()


            def other():
                return demo_module.demo()
        '''),
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_task_covers_what_it_reaches_transitively(tmp_path):
    root = _package(tmp_path)
    covered = code_of_task("pkg.jobs", "job", root=root, packages=("pkg",))
    assert set(covered) == {"pkg.jobs:job", "pkg/__init__.py", "pkg/core.py", "pkg/deep.py", "pkg/lazy.py",
                            "pkg/data/__init__.py", "pkg/data/schema.json"}
    assert "pkg/demo.py" in code_of_task("pkg.jobs", "other", root=root, packages=("pkg",))


@pytest.mark.parametrize(("file", "old", "new", "changes"), [
    ("pkg/deep.py", "DEPTH = 1", "DEPTH = 2", True),  # imported by an imported module
    ("pkg/lazy.py", "X = 1", "X = 5", True),  # function-level relative import
    ("pkg/data/schema.json", "{}", '{"type": "object"}', True),  # a JSON file the reached package ships
    ("pkg/jobs.py", "SCALE = 3", "SCALE = 4", True),  # a constant of the task's module it uses
    ("pkg/jobs.py", "return core() + helper()", "return core() - helper()", True),
    ("pkg/demo.py", "return 2", "return 3", False),  # not reached by job
    ("pkg/jobs.py", "return demo_module.demo()", "return -demo_module.demo()", False),  # another task's body
    ("pkg/jobs.py", '"""Jobs."""', '"""Jobs.\n\nMore words."""\n# a comment', False),
])
def test_only_edits_to_reached_code_change_the_fingerprint(tmp_path, file, old, new, changes):
    root = _package(tmp_path)
    before = code_of_task("pkg.jobs", "job", root=root, packages=("pkg",))
    _edit(root / file, old, new)
    after = code_of_task("pkg.jobs", "job", root=root, packages=("pkg",))
    assert (after != before) == changes


def _copy_project(tmp_path: Path) -> Path:
    for package in ("stage1core", "tasks"):
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_editing_the_demo_generator_keeps_the_pipeline_task_keys(tmp_path):
    root = _copy_project(tmp_path)
    pipeline_tasks = ("extract_features", "fit_head", "calibrate", "evaluate_test", "score_baselines",
                      "export_bundle")
    before = {name: task_code_fingerprint.__wrapped__("tasks.pipeline", name, root) for name in pipeline_tasks}
    demo = task_code_fingerprint.__wrapped__("tasks.pipeline", "ensure_demo_data", root)
    _edit(root / "stage1core/demo/dataset.py", "def generate_demo_dataset(", "def _unused():\n    pass\n\n\n"
          "def generate_demo_dataset(")
    assert {name: task_code_fingerprint.__wrapped__("tasks.pipeline", name, root) for name in pipeline_tasks} == before
    assert task_code_fingerprint.__wrapped__("tasks.pipeline", "ensure_demo_data", root) != demo

    _edit(root / "stage1core/train.py", "from .storage import atomic_dir", "from .storage import atomic_dir  # edited\n"
          "EDITED = True")
    after = {name: task_code_fingerprint.__wrapped__("tasks.pipeline", name, root) for name in pipeline_tasks}
    assert after["fit_head"] != before["fit_head"]  # the head trainer changed: heads are trained again
    assert after["extract_features"] == before["extract_features"]  # feature extraction does not use it


def test_the_task_fingerprint_is_computed_once(tmp_path):
    root = _package(tmp_path)
    first = task_code_fingerprint("pkg.jobs", "job", root, ("pkg",))
    _edit(root / "pkg/deep.py", "DEPTH = 1", "DEPTH = 2")
    assert task_code_fingerprint("pkg.jobs", "job", root, ("pkg",)) == first  # cached: not read again
    assert task_code_fingerprint.__wrapped__("pkg.jobs", "job", root, ("pkg",)) != first
