"""service/ must never pull torch in: the serving image has no torch at all."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_service_does_not_import_torch():
    code = (
        "import sys\n"
        "import service.http.app, service.runtime.engine, service.http.server, service.cli\n"
        "service.http.app.create_app()\n"
        "service.cli.build_parser()\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"service imports pulled in: {out.stdout.strip()}"
