"""tests/gpu: GPU tests (marked ``gpu``) skip cleanly without CUDA; the CPU-testable logic of the
GPU engine options (test_gpu_options.py) runs everywhere."""

from __future__ import annotations

import pytest
from gpu_testlib import cuda_unavailable_reason


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if item.get_closest_marker("gpu") is None or not item.nodeid.startswith("tests/gpu/"):
            continue
        if reason is None:
            reason = cuda_unavailable_reason() or ""
        if reason:
            item.add_marker(pytest.mark.skip(reason=f"needs CUDA: {reason}"))
