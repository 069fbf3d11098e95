"""One result row per input image, shared by scoring jobs, `vitserve score` and Ray scoring.

A row is ``{"path": str, "labels": [str, ...], "scores": [float, ...]}`` (top-k, best first,
scores are softmax probabilities) or ``{"path": str, "error": {"code": str, "message": str}}``.
JSON lines and parquet keep that shape; CSV spreads it over fixed columns
``path, label_1, score_1, ..., label_k, score_k, error_code, error``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.runtime.postprocess import top_k


def prediction_row(path: str, logits: np.ndarray, labels: Sequence[str], k: int) -> dict:
    best = top_k(logits, labels, k)
    return {"path": path, "labels": [p["label"] for p in best], "scores": [p["probability"] for p in best]}


def error_row(path: str, code: str, message: str) -> dict:
    return {"path": path, "error": {"code": code, "message": message}}


def csv_header(k: int) -> list[str]:
    ranked = [name for rank in range(1, k + 1) for name in (f"label_{rank}", f"score_{rank}")]
    return ["path", *ranked, "error_code", "error"]


def csv_fields(row: dict, k: int) -> list[str]:
    """A row as CSV cells matching ``csv_header(k)`` (scores with repr precision: they round-trip)."""
    cells = [row["path"]]
    labels, scores = row.get("labels", []), row.get("scores", [])
    for rank in range(k):
        cells += [labels[rank], repr(float(scores[rank]))] if rank < len(labels) else ["", ""]
    error = row.get("error")
    cells += [error["code"], error["message"]] if error else ["", ""]
    return cells


def row_from_csv(cells: dict[str, str]) -> dict:
    """Inverse of ``csv_fields`` (a csv.DictReader row) -> the row dict."""
    if cells.get("error_code"):
        return error_row(cells["path"], cells["error_code"], cells.get("error", ""))
    labels, scores = [], []
    rank = 1
    while cells.get(f"label_{rank}"):
        labels.append(cells[f"label_{rank}"])
        scores.append(float(cells[f"score_{rank}"]))
        rank += 1
    return {"path": cells["path"], "labels": labels, "scores": scores}
