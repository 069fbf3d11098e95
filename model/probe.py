"""Closed-form linear probe: the paper's few-shot linear evaluation.

The paper measures representations by "solving a regularized least-squares regression problem
that maps the (frozen) representation of a subset of training images to {-1, 1}^K target
vectors" (Dosovitskiy et al., 2021, Sec. 4.1). Here: ridge regression on the frozen pooled
features (the class token after the final LayerNorm), with the regulariser chosen by k-fold
cross-validation on the training features only, solved for every candidate at once from one
eigendecomposition per fold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from model.vit import VisionTransformer

# Candidate regularisers, relative to the mean eigenvalue of the centred Gram matrix, so that the
# same grid suits features of any scale and any number of samples.
RELATIVE_LAMBDAS = tuple(10.0**e for e in np.arange(-6.0, 3.01, 0.5))


@dataclass(frozen=True)
class RidgeFit:
    """A linear classifier logits = features @ weight.T + bias, and how it was chosen.

    Args:
        weight: (K, D), the head's weight matrix.
        bias: (K,).
        lam: the ridge regulariser used for the final fit.
        cv_accuracy: mean cross-validated accuracy of that regulariser on the training features.
    """

    weight: np.ndarray
    bias: np.ndarray
    lam: float
    cv_accuracy: float


class _RidgePath:
    """Ridge solutions for many regularisers from one eigendecomposition of X_c^T X_c."""

    def __init__(self, features: np.ndarray, targets: np.ndarray, num_classes: int) -> None:
        x = features.astype(np.float64)
        y = 2.0 * np.eye(num_classes)[targets] - 1.0  # (N, K) targets in {-1, 1}^K, as the paper
        self.x_mean = x.mean(axis=0)  # centring fits the bias without penalising it
        self.y_mean = y.mean(axis=0)
        xc, yc = x - self.x_mean, y - self.y_mean
        self.eigvals, self.eigvecs = np.linalg.eigh(xc.T @ xc)  # (D,), (D, D)
        self.eigvals = np.clip(self.eigvals, 0.0, None)
        self.projected = self.eigvecs.T @ (xc.T @ yc)  # (D, K)
        self.scale = max(float(self.eigvals.mean()), 1e-12)

    def solve(self, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """(weight (K, D), bias (K,)) minimising |X_c W - Y_c|^2 + lam |W|^2."""
        w = self.eigvecs @ (self.projected / (self.eigvals + lam)[:, None])  # (D, K)
        return w.T, self.y_mean - self.x_mean @ w


def _fold_ids(targets: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Stratified fold assignment: each class's samples shuffled, then dealt round-robin."""
    rng = np.random.default_rng(seed)
    folds = np.empty(len(targets), dtype=np.int64)
    for cls in np.unique(targets):
        members = np.flatnonzero(targets == cls)
        rng.shuffle(members)
        folds[members] = np.arange(len(members)) % n_folds
    return folds


def fit_ridge(
    features: np.ndarray,
    targets: np.ndarray,
    num_classes: int,
    *,
    n_folds: int = 5,
    relative_lambdas: Iterable[float] = RELATIVE_LAMBDAS,
    seed: int = 0,
) -> RidgeFit:
    """Fit the ridge head on (N, D) features and integer targets; choose lambda by k-fold CV.

    Ties go to the larger lambda (the simpler model). With fewer than two samples per fold the
    middle of the grid is used without cross-validation.
    """
    features = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if features.ndim != 2 or len(features) != len(targets):
        raise ValueError(f"need features (N, D) and N targets, got {features.shape} and {targets.shape}")
    if targets.min() < 0 or targets.max() >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got [{targets.min()}, {targets.max()}]")
    full = _RidgePath(features, targets, num_classes)
    candidates = sorted(relative_lambdas)
    n_folds = min(n_folds, len(targets) // 2)
    if n_folds < 2:
        lam = candidates[len(candidates) // 2] * full.scale
        weight, bias = full.solve(lam)
        return RidgeFit(weight, bias, lam, float("nan"))

    folds = _fold_ids(targets, n_folds, seed)
    correct = np.zeros(len(candidates))
    for k in range(n_folds):
        fit, held = folds != k, folds == k
        path = _RidgePath(features[fit], targets[fit], num_classes)
        for j, rel in enumerate(candidates):
            weight, bias = path.solve(rel * path.scale)
            correct[j] += np.sum((features[held] @ weight.T + bias).argmax(axis=1) == targets[held])
    best = max(range(len(candidates)), key=lambda j: (correct[j], candidates[j]))
    lam = candidates[best] * full.scale
    weight, bias = full.solve(lam)
    return RidgeFit(weight, bias, lam, float(correct[best] / len(targets)))


@torch.no_grad()
def extract_features(
    model: VisionTransformer,
    batches: Iterable,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable], Iterable] = lambda xs: xs,
) -> tuple[np.ndarray, np.ndarray]:
    """Frozen pooled features (the input of the head): (N, D) float32 and (N,) targets."""
    model.eval()
    feats, labels = [], []
    for pixels, targets in progress(batches):
        tokens = model.forward_features(pixels.to(device))  # (B, N+1, D)
        feats.append(model.pool(tokens).float().cpu().numpy())  # (B, D)
        labels.append(np.asarray(targets))
    return np.concatenate(feats), np.concatenate(labels)


@torch.no_grad()
def install_head(model: VisionTransformer, fit: RidgeFit) -> None:
    """Replace the model's head by a fresh K x D layer holding the ridge solution."""
    num_classes, dim = fit.weight.shape
    if dim != model.config.embed_dim:
        raise ValueError(f"ridge weight has D={dim}, the model's embed_dim is {model.config.embed_dim}")
    device = next(model.parameters()).device
    model.reset_head(num_classes)
    model.head.to(device)
    model.head.weight.copy_(torch.from_numpy(fit.weight).to(device, torch.float32))
    model.head.bias.copy_(torch.from_numpy(fit.bias).to(device, torch.float32))
