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
NO_TRANSPORT = "core, runtime, scoring and serving import no web or RPC framework"
LAYERS = "service's layers import only downwards"
CHECKPOINT_LAYERS = "model's checkpoint loader sits on the format converters"


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
        ("service/runtime/wrong.py", "import fastapi\n", NO_TRANSPORT),
        ("service/core/wrong.py", "import starlette.responses\n", NO_TRANSPORT),
        ("service/serving/wrong.py", "import uvicorn\n", NO_TRANSPORT),
        ("service/scoring/wrong.py", "import grpc\n", NO_TRANSPORT),
        ("service/scoring/wrong.py", "import torch\n", "service imports neither model/ nor the torch stack"),
        ("service/runtime/wrong.py", "import transformers\n", "service imports neither model/ nor the torch stack"),
        ("service/http/wrong.py", "import model.vit\n", "service imports neither model/ nor the torch stack"),
        ("service/core/wrong.py", "from service.http import app\n", LAYERS),
        ("service/core/wrong.py", "from service.runtime import batcher\n", LAYERS),
        ("service/runtime/wrong.py", "from service.scoring import offline\n", LAYERS),
        ("service/serving/wrong.py", "from service.http import app\n", LAYERS),
        ("service/http/wrong.py", "from service.cli import serve\n", LAYERS),
        # gRPC and HTTP are siblings: neither imports the other (service/grpc/ may not exist yet).
        ("service/grpc/__init__.py", "from service.http import app\n", LAYERS),
        ("service/wrong/__init__.py", "", LAYERS),  # a layer nobody placed
        ("model/wrong.py", "from service.runtime import batcher\n", "model imports from service only core"),
        ("model/wrong.py", "from service.serving import inference\n", "model imports from service only core"),
        ("model/convert/wrong.py", "from model import checkpoint\n", "format converters never import the checkpoint"),
        ("model/convert/timm.py", "from model.convert import hf\n", CHECKPOINT_LAYERS),
    ],
)
def test_a_wrong_import_fails_naming_its_contract(tmp_path, module, source, contract):
    root = copy_of_tree(tmp_path)
    (root / module).parent.mkdir(parents=True, exist_ok=True)
    (root / module).write_text((root / module).read_text() + source if (root / module).exists() else source)
    result = lint_imports(root)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    broken = output.split("Broken contracts", 1)[-1]
    assert contract in broken, output
    offender = ".".join(Path(module).with_suffix("").parts).removesuffix(".__init__")
    assert offender in broken, output  # the report names the offending module
