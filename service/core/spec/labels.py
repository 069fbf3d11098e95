"""Class-name files: a text file with one name per line, or JSON (a list, an index map, a config with id2label)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def load_labels(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Class names from a file, index order.

    ``.json``: a list of names; an object mapping "0".."K-1" to names; or an object with
    ``id2label`` (a Hugging Face config.json) or ``labels``. Anything else: one name per line
    (trailing blank lines ignored).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "id2label" in data:
            data = data["id2label"]
        elif isinstance(data, dict) and "labels" in data:
            data = data["labels"]
        if isinstance(data, dict):
            try:
                by_index = {int(k): v for k, v in data.items()}
            except ValueError as exc:
                raise ValueError(f"{path}: keys must be class indices 0..K-1: {exc}") from None
            if sorted(by_index) != list(range(len(by_index))):
                raise ValueError(f"{path}: class indices must run 0..{len(by_index) - 1} without gaps")
            data = [by_index[i] for i in range(len(by_index))]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of names, an index -> name object or a config with id2label")
        return check_labels(data, str(path))
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    empty = [i + 1 for i, line in enumerate(lines) if not line]
    if empty:
        raise ValueError(f"{path}: empty label on line(s) {empty[:5]}")
    return check_labels(lines, str(path))


def check_labels(items: Sequence[Any], where: str) -> tuple[str, ...]:
    if not items:
        raise ValueError(f"{where}: no labels")
    if not all(isinstance(v, (str, int)) for v in items):
        raise ValueError(f"{where}: labels must be strings")
    return tuple(str(v) for v in items)
