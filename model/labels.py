"""Class names: the ImageNet-1k names shipped with the package, and the fallback for any other head.

The file ``model/data/imagenet1k_labels.txt`` was generated once from timm's bundled ImageNet
info (``timm.data.ImageNetInfo().index_to_description(i)``, the WordNet lemmas that Hugging Face's
``google/vit-*`` configs also carry), so the runtime never needs timm.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources

IMAGENET1K_NUM_CLASSES = 1000


@cache
def imagenet1k_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard (sorted synset) index order."""
    text = resources.files("model").joinpath("data/imagenet1k_labels.txt").read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != IMAGENET1K_NUM_CLASSES:
        raise RuntimeError(f"imagenet1k_labels.txt holds {len(names)} names, expected {IMAGENET1K_NUM_CLASSES}")
    return names


def default_labels(num_classes: int) -> tuple[str, ...]:
    """Names for a head that came without any: ImageNet-1k for 1000 classes, else ``class_0``, ``class_1``..."""
    if num_classes == IMAGENET1K_NUM_CLASSES:
        return imagenet1k_labels()
    return tuple(f"class_{i}" for i in range(num_classes))


def check_labels(labels: Sequence[str], num_classes: int) -> tuple[str, ...]:
    """Return ``labels`` as a tuple of str, or raise ValueError if there is not one name per class."""
    labels = tuple(str(label) for label in labels)
    if len(labels) != num_classes:
        raise ValueError(f"got {len(labels)} label names for a head with {num_classes} classes")
    return labels
