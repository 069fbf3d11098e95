"""Container entrypoint: make pip-installed CUDA libraries loadable, then hand over to the `vitserve` CLI.

Runs as PID 1 with exec-form ENTRYPOINT, so SIGTERM reaches the Python process (uvicorn's handler
starts the graceful drain) instead of a shell that would swallow it.
"""

from __future__ import annotations

import importlib.util
import sys


def preload_cuda_libraries() -> None:
    """dlopen CUDA 13 and cuDNN 9 from site-packages/nvidia before the first session is created.

    onnxruntime-gpu[cuda,cudnn] installs those libraries as pip packages, where the dynamic loader
    does not look; onnxruntime.preload_dlls() loads them into this process so the CUDA provider
    finds them. Images without them (the CPU image; a base that ships CUDA system-wide) skip this.
    """
    if importlib.util.find_spec("nvidia") is None:
        return
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        onnxruntime.preload_dlls()


def main() -> int:
    preload_cuda_libraries()
    from service.cli import main as vitserve

    return vitserve(sys.argv[1:] or ["serve"])


if __name__ == "__main__":
    sys.exit(main())
