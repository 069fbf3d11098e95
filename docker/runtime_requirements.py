"""Print the service's runtime requirements from pyproject.toml, with the ONNX Runtime flavour an image wants.

pyproject.toml pins ``onnxruntime-gpu`` (it runs on CUDA and falls back to the CPU provider); a
CPU-only image installs ``onnxruntime`` of the same version instead (24 MB wheel instead of 256 MB),
and the CUDA image can ask for the ``[cuda,cudnn]`` extras that bring CUDA 13 and cuDNN 9 as pip
packages. pyproject.toml stays the single place where versions are pinned.

Usage: python3 runtime_requirements.py PYPROJECT --onnxruntime {gpu,cpu} [--extras cuda,cudnn]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

GPU_PACKAGE = "onnxruntime-gpu"
CPU_PACKAGE = "onnxruntime"
# name, optional [extras], rest (version specifiers, markers) — enough of PEP 508 for a pin list
REQUIREMENT = re.compile(r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<extras>\[[^\]]*\])?(?P<rest>.*)$")


def runtime_requirements(pyproject: dict, onnxruntime: str, extras: str = "") -> list[str]:
    requirements = []
    for line in pyproject["project"]["dependencies"]:
        match = REQUIREMENT.match(line)
        if match is None:
            raise ValueError(f"cannot parse dependency {line!r}")
        if match["name"].lower() != GPU_PACKAGE:
            requirements.append(line)
            continue
        name = GPU_PACKAGE if onnxruntime == "gpu" else CPU_PACKAGE
        wanted = f"[{extras}]" if extras and onnxruntime == "gpu" else ""
        requirements.append(f"{name}{wanted}{match['rest']}")
    if not any(REQUIREMENT.match(r)["name"].lower() in (GPU_PACKAGE, CPU_PACKAGE) for r in requirements):
        raise ValueError(f"pyproject.toml lists no {GPU_PACKAGE} dependency")
    return requirements


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--onnxruntime", choices=("gpu", "cpu"), required=True)
    parser.add_argument("--extras", default="", help="extras of onnxruntime-gpu, e.g. cuda,cudnn (gpu only)")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        pyproject = tomllib.load(f)
    print("\n".join(runtime_requirements(pyproject, args.onnxruntime, args.extras)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
