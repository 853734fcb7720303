"""stage1core is the library: it must import with prefect and mlflow unavailable."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import stage1core
from tests.common import HANG_TIMEOUT_S

BLOCKER = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('prefect', 'mlflow'):
            raise ImportError(f'stage1core must not import {name}')
        return None
sys.meta_path.insert(0, Block())
import importlib
for mod in MODULES:
    importlib.import_module(mod)
assert not any(m.split('.')[0] in ('prefect', 'mlflow') for m in sys.modules), 'leaked import'
print('imported', len(MODULES))
"""


def test_stage1core_imports_without_prefect_or_mlflow():
    root = Path(stage1core.__file__).parent
    # every module, the demo package's included (walk_packages imports packages to list their modules)
    modules = ["stage1core"] + [m.name for m in pkgutil.walk_packages([str(root)], prefix="stage1core.")]
    assert {"stage1core.bundle", "stage1core.features", "stage1core.demo.canvas"} <= set(modules)
    code = f"MODULES = {modules!r}\n" + BLOCKER
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root.parent,
                         timeout=HANG_TIMEOUT_S)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported {len(modules)}" in out.stdout


def test_blocker_actually_blocks():
    code = "MODULES = ['mlflow']\n" + BLOCKER
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_TIMEOUT_S)
    assert out.returncode != 0 and "must not import mlflow" in out.stderr
