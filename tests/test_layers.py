"""The import-linter contracts in pyproject.toml hold on the tree and catch an import that breaks a layer.

Each broken case copies service/, model/ and pyproject.toml, adds one module with a wrong import, and
runs `lint-imports` on the copy: it must fail and name the contract that the import breaks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    # lint-imports puts its working directory first on sys.path, so it reads the tree it runs in;
    # PYTHONPATH (the test run's own tree) must not add a second copy of the packages.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def copy_of_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    skip = shutil.ignore_patterns("__pycache__", "static", "data")
    for package in ("service", "model"):
        shutil.copytree(REPO / package, root / package, ignore=skip)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold_on_the_tree():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        ("service/runtime/wrong.py", "import fastapi\n", "core, runtime and scoring import no web or RPC framework"),
        ("service/core/wrong.py", "import starlette.responses\n", "core, runtime and scoring import no web or RPC"),
        ("service/scoring/wrong.py", "import torch\n", "service imports neither model/ nor the torch stack"),
        ("service/http/wrong.py", "import model.vit\n", "service imports neither model/ nor the torch stack"),
        ("service/core/wrong.py", "from service.runtime import batcher\n", "service's layers import only downwards"),
        ("service/runtime/wrong.py", "from service.http import app\n", "service's layers import only downwards"),
        ("service/wrong/__init__.py", "", "service's layers import only downwards"),  # a layer nobody placed
        ("model/wrong.py", "from service.runtime import batcher\n", "model imports from service only core"),
    ],
)
def test_a_wrong_import_fails_naming_its_contract(tmp_path, module, source, contract):
    root = copy_of_tree(tmp_path)
    (root / module).parent.mkdir(parents=True, exist_ok=True)
    (root / module).write_text(source, encoding="utf-8")
    result = lint_imports(root)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    broken = output.split("Broken contracts", 1)[-1]
    assert contract in broken, output
    assert "wrong" in broken, output  # the report names the offending module
