"""Logits -> probabilities -> the top-k answer the API returns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np


class Prediction(TypedDict):
    """One class of an answer: its index in the logits, its name, its probability."""

    index: int
    label: str
    probability: float


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64 (max-subtracted), so tiny probabilities stay exact."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    probabilities: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return probabilities


def top_k(logits: np.ndarray, labels: Sequence[str], k: int) -> list[Prediction]:
    """The k most probable classes of one image's logits (K,), highest first.

    Ties keep the lower class index first (stable sort), so answers are deterministic.
    Returns ``[{"index": int, "label": str, "probability": float}, ...]`` with min(k, K) items.
    """
    probs = softmax(logits)
    k = max(0, min(int(k), probs.shape[-1]))
    order = np.argsort(-probs, kind="stable")[:k]
    return [
        {"index": int(i), "label": labels[i] if i < len(labels) else str(int(i)), "probability": float(probs[i])}
        for i in order
    ]
