"""Labelled image datasets for fine-tuning: an image folder or a CSV of path,label.

A dataset is first *scanned* (file names and labels only, cheap, with errors that name the
problem: empty class folders, a single class, malformed CSV rows) and then *decoded* with the
service's own preprocessing (``service.runtime.preprocess.load_pixels``), so a model trains on exactly
the pixels it will be served. Images that cannot be decoded are skipped, counted and listed,
never dropped silently.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from service.core.image_files import IMAGE_SUFFIXES
from service.core.metadata import Preprocessing

# The extensions torchvision's ImageFolder accepts; other files in a class folder are ignored.
# The service's list (finetune, `vitserve score` and scoring jobs take the same files).
IMAGE_EXTENSIONS = tuple(sorted(IMAGE_SUFFIXES))
# Far above any photo a user fine-tunes on, but bounds a decompression bomb.
MAX_PIXELS = 178_956_970
# Decode everything into one tensor when it fits in this many bytes; stream from disk beyond.
PRELOAD_BUDGET_BYTES = 2 * 1024**3


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names the folder, file or line."""


@dataclass(frozen=True)
class LabeledFiles:
    """A scanned dataset: image paths, their class indices and the class names, in index order.

    Args:
        paths: one file per sample.
        targets: the class index of each sample.
        classes: class names; ``classes[t]`` names target ``t``.
    """

    paths: tuple[Path, ...]
    targets: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> LabeledFiles:
        return LabeledFiles(
            tuple(self.paths[i] for i in indices), tuple(self.targets[i] for i in indices), self.classes
        )


def _class_order(names: set[str]) -> list[str]:
    """Sorted as ImageFolder sorts, except that all-integer names sort numerically ("2" before "10")."""
    if names and all(n.lstrip("-").isascii() and n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _check_classes(classes: Sequence[str], where: str) -> None:
    if not classes:
        raise DatasetError(f"{where}: no classes found")
    if len(classes) == 1:
        raise DatasetError(f"{where}: only one class ({classes[0]!r}); a classifier needs at least two")


def scan_image_folder(root: str | Path) -> LabeledFiles:
    """One sub-folder per class, images inside (torchvision's ImageFolder layout, searched recursively)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    class_dirs = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    classes = _class_order(set(class_dirs))
    if not classes:
        raise DatasetError(f"{root}: no class folders; expected one sub-folder of images per class")
    paths: list[Path] = []
    targets: list[int] = []
    empty: list[str] = []
    for index, name in enumerate(classes):
        files = sorted(
            p
            for p in class_dirs[name].rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not files:
            empty.append(name)
        paths += files
        targets += [index] * len(files)
    if empty:
        raise DatasetError(
            f"{root}: {len(empty)} empty class folder(s) with no images "
            f"({', '.join(IMAGE_EXTENSIONS)}): {', '.join(empty)}"
        )
    _check_classes(classes, str(root))
    return LabeledFiles(tuple(paths), tuple(targets), tuple(classes))


def read_csv_dataset(csv_path: str | Path) -> LabeledFiles:
    """Rows of ``path,label``; an optional ``path,label`` header; relative paths are relative to the CSV."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: no such file")
    rows: list[tuple[Path, str]] = []
    with csv_path.open(newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or all(not cell.strip() for cell in row):
                continue
            if line_no == 1 and [c.strip().lower() for c in row] == ["path", "label"]:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DatasetError(f"{csv_path}:{line_no}: expected 'path,label', got {row!r}")
            path = Path(row[0].strip())
            rows.append((path if path.is_absolute() else csv_path.parent / path, row[1].strip()))
    if not rows:
        raise DatasetError(f"{csv_path}: no rows; expected lines of 'path,label'")
    classes = _class_order({label for _, label in rows})
    _check_classes(classes, str(csv_path))
    index = {name: i for i, name in enumerate(classes)}
    return LabeledFiles(tuple(p for p, _ in rows), tuple(index[label] for _, label in rows), tuple(classes))


def scan_dataset(source: str | Path) -> LabeledFiles:
    """An image folder (a directory) or a CSV of path,label (a file)."""
    source = Path(source)
    if source.is_dir():
        return scan_image_folder(source)
    if source.is_file():
        return read_csv_dataset(source)
    raise DatasetError(f"{source}: no such dataset; give an image folder or a CSV of path,label")


def decode_image(path: Path, preprocessing: Preprocessing) -> np.ndarray:
    """One file -> normalised (3, H, W) float32, with the service's own preprocessing."""
    from service.runtime.preprocess import load_pixels

    return load_pixels(path.read_bytes(), preprocessing, max_pixels=MAX_PIXELS)


@dataclass
class DecodeReport:
    """Images that could not be read: skipped, and reported by the caller."""

    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def describe(self, limit: int = 20) -> str:
        lines = [f"skipped {len(self.skipped)} unreadable image(s):"]
        lines += [f"  {path}: {reason}" for path, reason in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


class ImageFilesDataset(torch.utils.data.Dataset):
    """Decodes one image per item (for datasets too large to hold in memory).

    Args:
        files: the scanned dataset; only its readable images should be given.
        preprocessing: how a file becomes the model's input.
    """

    def __init__(self, files: LabeledFiles, preprocessing: Preprocessing) -> None:
        self.files = files
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        pixels = decode_image(self.files.paths[index], self.preprocessing)
        return torch.from_numpy(pixels), self.files.targets[index]


def load_images(
    files: LabeledFiles,
    preprocessing: Preprocessing,
    *,
    preload_budget_bytes: int = PRELOAD_BUDGET_BYTES,
    progress: Callable[[Sequence], Sequence] = lambda xs: xs,
) -> tuple[torch.utils.data.Dataset, LabeledFiles, DecodeReport]:
    """Decode every image once, skipping unreadable ones; returns (dataset, the files kept, the report).

    The decoded pixels of a small dataset are kept (one TensorDataset, fast epochs); a larger one
    is decoded again per item, and this pass only proves that every kept file decodes, so an
    epoch never dies half-way on a corrupt file.
    """
    from service.core.errors import InvalidImage

    report = DecodeReport()
    p = preprocessing
    preload = len(files) * 3 * p.image_size * p.image_size * 4 <= preload_budget_bytes
    arrays: list[np.ndarray] = []
    kept: list[int] = []
    for i in progress(range(len(files))):
        try:
            pixels = decode_image(files.paths[i], p)
        except (OSError, InvalidImage) as exc:  # a file we cannot read; bytes the service would refuse
            report.skipped.append((files.paths[i], f"{type(exc).__name__}: {exc}"))
            continue
        kept.append(i)
        if preload:
            arrays.append(pixels)
    files = files.subset(kept)
    if not len(files):
        raise DatasetError(f"no readable images: {report.describe()}")
    if not preload:
        return ImageFilesDataset(files, p), files, report
    pixels = torch.from_numpy(np.stack(arrays))  # (N, 3, H, W)
    return torch.utils.data.TensorDataset(pixels, torch.tensor(files.targets)), files, report


def stratified_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, held_out) with about `fraction` of every class held out, deterministic in seed.

    Every class with at least two samples keeps one on each side, so per-class accuracy is defined.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    targets_arr = np.asarray(targets)
    train: list[int] = []
    held: list[int] = []
    for cls in np.unique(targets_arr):
        members = np.flatnonzero(targets_arr == cls)
        rng.shuffle(members)
        n_held = int(round(fraction * len(members)))
        if fraction > 0 and len(members) >= 2:
            n_held = min(max(n_held, 1), len(members) - 1)
        held += members[:n_held].tolist()
        train += members[n_held:].tolist()
    return sorted(train), sorted(held)
