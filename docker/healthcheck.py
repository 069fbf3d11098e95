"""The images' HEALTHCHECK: exit 0 only when /readyz answers 200, i.e. the model is loaded and warmed up.

Python's standard library instead of curl, which slim images do not ship.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("VITSERVE_PORT", "8000")
    timeout_s = float(os.environ.get("VITSERVE_HEALTHCHECK_TIMEOUT_S", "3"))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=timeout_s) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:  # HTTPError (503 while warming up) is a URLError
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
