"""The ImageNet-1k names shipped as package data, and the fallback names."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model.labels import check_labels, default_labels, imagenet1k_labels


def test_shipped_names_are_timms_imagenet_info():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    assert imagenet1k_labels() == tuple(info.index_to_description(i) for i in range(1000))
    assert imagenet1k_labels()[281] == "tabby, tabby cat"


def test_defaults():
    assert default_labels(1000) is imagenet1k_labels()
    assert default_labels(3) == ("class_0", "class_1", "class_2")
    assert default_labels(0) == ()
    with pytest.raises(ValueError, match="2 label names for a head with 3 classes"):
        check_labels(["a", "b"], 3)


@pytest.mark.slow  # a fresh interpreter importing torch
def test_runtime_needs_neither_timm_nor_transformers():
    code = (
        "import sys; from model.checkpoint import import_checkpoint; "
        "ckpt = import_checkpoint('random:Ti/16', model_args={'depth': 1}); "
        "assert ckpt.labels[0] == 'tench, Tinca tinca'; "
        "bad = [m for m in ('timm', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
