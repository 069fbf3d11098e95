"""Softmax and top-k against PyTorch's."""

from __future__ import annotations

import numpy as np

from service.runtime.postprocess import softmax, top_k


def test_softmax_and_top_k_match_torch():
    import torch

    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 5
    expected = torch.softmax(torch.from_numpy(logits).double(), -1)
    values, indices = expected.topk(5)
    out = top_k(logits, [f"c{i}" for i in range(1000)], 5)
    assert [p["index"] for p in out] == indices.tolist()
    np.testing.assert_allclose([p["probability"] for p in out], values.numpy(), rtol=1e-12)
    assert out[0]["label"] == f"c{indices[0].item()}"


def test_softmax_is_stable_for_huge_logits():
    probs = softmax(np.array([1e4, 1e4 - 1, -1e4], dtype=np.float32))
    assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-12
    assert probs[0] / probs[1] == np.float64(np.e) or abs(probs[0] / probs[1] - np.e) < 1e-9


def test_ties_keep_the_lower_index_first_and_k_is_clamped():
    out = top_k(np.zeros(4, np.float32), ["a", "b", "c", "d"], 10)
    assert [p["index"] for p in out] == [0, 1, 2, 3]
    assert all(abs(p["probability"] - 0.25) < 1e-15 for p in out)
