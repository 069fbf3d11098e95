"""service/ must never pull torch in: the serving image has no torch at all."""

from __future__ import annotations

import subprocess
import sys


def _printed(code: str) -> str:
    """What ``code`` prints, run in a fresh interpreter (so no earlier test's imports count)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_importing_the_service_does_not_import_torch():
    code = (
        "import sys\n"
        "import service.http.app, service.runtime.engine, service.http.server, service.cli\n"
        "service.http.app.create_app()\n"
        "service.cli.build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    heavy = _printed(code)
    assert heavy == "", f"service imports pulled in: {heavy}"


def test_the_model_description_is_pure_and_knows_no_command_line():
    # core/spec is read by model/, the engine and the CLI alike: no argparse, no ONNX libraries, no numpy.
    code = (
        "import sys, pkgutil, importlib, service.core.spec as spec\n"
        "for info in pkgutil.iter_modules(spec.__path__):\n"
        "    importlib.import_module(f'service.core.spec.{info.name}')\n"
        "found = sorted(m for m in ('argparse', 'onnxruntime', 'onnx', 'numpy', 'fastapi') if m in sys.modules)\n"
        "print(','.join(found))\n"
    )
    found = _printed(code)
    assert found == "", f"service.core.spec imports: {found}"
