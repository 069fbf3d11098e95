"""One result row per input image, shared by scoring jobs, `vitserve score` and Ray scoring.

A row is ``{"path": str, "labels": [str, ...], "scores": [float, ...]}`` (top-k, best first,
scores are softmax probabilities) or ``{"path": str, "error": {"code": str, "message": str}}``.
Result files of `vitserve score` also say which model answered: ``"model"`` (the served name)
and ``"weights_sha256"`` after ``"path"`` (``ModelIdentity``), so a file never mixes two models
unnoticed. JSON lines and parquet keep that shape; CSV spreads it over fixed columns
``path, [model, weights_sha256,] label_1, score_1, ..., label_k, score_k, error_code, error``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.runtime.postprocess import top_k

IDENTITY_FIELDS = ("model", "weights_sha256")


@dataclass(frozen=True)
class ModelIdentity:
    """Which model wrote a result file's rows.

    Args:
        name: the served name (service.core.metadata.ModelMetadata.served_name).
        weights_sha256: the hash the file's metadata records, else the model file's own.
    """

    name: str
    weights_sha256: str

    def fields(self) -> dict[str, str]:
        return {"model": self.name, "weights_sha256": self.weights_sha256}

    @classmethod
    def of_row(cls, row: dict) -> ModelIdentity | None:
        """The identity a stored row records; None for rows written without one."""
        if not all(isinstance(row.get(name), str) for name in IDENTITY_FIELDS):
            return None
        return cls(row["model"], row["weights_sha256"])

    def describe(self) -> str:
        return f"{self.name!r} (weights {self.weights_sha256[:12] or 'unknown'})"


def stamped(row: dict, identity: dict[str, str]) -> dict:
    """``row`` with the model's identity fields (``ModelIdentity.fields()``) right after its path."""
    return {"path": row["path"], **identity, **{k: v for k, v in row.items() if k != "path"}}


def prediction_row(path: str, logits: np.ndarray, labels: Sequence[str], k: int) -> dict:
    best = top_k(logits, labels, k)
    return {"path": path, "labels": [p["label"] for p in best], "scores": [p["probability"] for p in best]}


def error_row(path: str, code: str, message: str) -> dict:
    return {"path": path, "error": {"code": code, "message": message}}


def csv_header(k: int, *, identity: bool = False) -> list[str]:
    ranked = [name for rank in range(1, k + 1) for name in (f"label_{rank}", f"score_{rank}")]
    return ["path", *(IDENTITY_FIELDS if identity else ()), *ranked, "error_code", "error"]


def csv_fields(row: dict, k: int, *, identity: bool = False) -> list[str]:
    """A row as CSV cells matching ``csv_header(k, identity=...)`` (scores with repr precision: they round-trip)."""
    cells = [row["path"], *((row[name] for name in IDENTITY_FIELDS) if identity else ())]
    labels, scores = row.get("labels", []), row.get("scores", [])
    for rank in range(k):
        cells += [labels[rank], repr(float(scores[rank]))] if rank < len(labels) else ["", ""]
    error = row.get("error")
    cells += [error["code"], error["message"]] if error else ["", ""]
    return cells


def row_from_csv(cells: dict[str, str]) -> dict:
    """Inverse of ``csv_fields`` (a csv.DictReader row) -> the row dict."""
    identity = {name: cells[name] for name in IDENTITY_FIELDS if name in cells}
    if cells.get("error_code"):
        return stamped(error_row(cells["path"], cells["error_code"], cells.get("error", "")), identity)
    labels, scores = [], []
    rank = 1
    while cells.get(f"label_{rank}"):
        labels.append(cells[f"label_{rank}"])
        scores.append(float(cells[f"score_{rank}"]))
        rank += 1
    return stamped({"path": cells["path"], "labels": labels, "scores": scores}, identity)
