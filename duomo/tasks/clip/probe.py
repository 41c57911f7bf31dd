"""Linear probes: logistic regression (scikit-learn) on frozen image features, C chosen on a validation split.

Features are standardised (fit on the training set). The inverse regularisation strength C is picked from a
log-spaced grid by accuracy on a stratified validation split of the training set, then the probe is refit on
the whole training set. Few-shot probes keep k random training images per class; with fewer than two per
class there is nothing to validate on, and C falls back to 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from duomo.errors import InputError
from duomo.tasks.clip.evaluate import classification_metrics

DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
FALLBACK_C = 1.0


@dataclass
class ProbeResult:
    """Test metrics of a fitted probe, and how it was fitted."""

    metrics: dict[str, float]
    C: float
    n_train: int
    n_test: int
    k_shot: int | None
    val_accuracy: float | None

    def settings(self) -> dict[str, Any]:
        """The fitting choices, for the result record."""
        return {"C": self.C, "n_train": self.n_train, "k_shot": self.k_shot, "val_top1": self.val_accuracy}


def _require_sklearn() -> Any:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:
        raise InputError(
            "linear probes need scikit-learn: pip install scikit-learn (or 'duomo[train]')"
        ) from exc
    return LogisticRegression


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: about `fraction` of each class held out, at least one kept per class."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    kept, held = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_held = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 0
        held.extend(members[:n_held])
        kept.extend(members[n_held:])
    return np.sort(np.asarray(kept, dtype=np.int64)), np.sort(np.asarray(held, dtype=np.int64))


def few_shot_indices(labels: torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    """k random indices per class (all of a class's samples when it has fewer)."""
    if k < 1:
        raise InputError(f"k-shot must be >= 1, got {k}")
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(picked))


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> Any:
    logistic_regression = _require_sklearn()
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    # Small problems: with torch loaded, BLAS/OpenMP threads fighting over the cores make fits ~30x slower.
    with threadpool_limits(1):
        return make_pipeline(StandardScaler(), logistic_regression(C=c, max_iter=max_iter)).fit(x, y)


def _scores(probe: Any, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """Class scores [N, num_classes] (log-probabilities; -inf for classes the probe never saw)."""
    scores = torch.full((len(x), num_classes), float("-inf"))
    seen = torch.as_tensor(probe.classes_, dtype=torch.long)
    scores[:, seen] = torch.as_tensor(probe.predict_log_proba(x), dtype=torch.float32)
    return scores


def select_c(
    x: np.ndarray, y: np.ndarray, cs: tuple[float, ...], val_fraction: float, seed: int, max_iter: int
) -> tuple[float, float | None]:
    """(best C, its validation accuracy) on a stratified validation split; (1, None) if one is impossible."""
    counts = np.bincount(y)
    if counts[counts > 0].min() < 2 or len(cs) == 1:
        return (cs[0] if len(cs) == 1 else FALLBACK_C), None
    fit_idx, val_idx = stratified_split(torch.as_tensor(y), val_fraction, seed)
    best_c, best_acc = FALLBACK_C, -1.0
    for c in cs:
        probe = _fit(x[fit_idx], y[fit_idx], c, max_iter)
        acc = float((probe.predict(x[val_idx]) == y[val_idx]).mean())
        if acc > best_acc:  # ties keep the stronger regularisation (the earlier, smaller C)
            best_c, best_acc = c, acc
    return best_c, best_acc


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int | None = None,
    k_shot: int | None = None,
    cs: tuple[float, ...] = DEFAULT_CS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> ProbeResult:
    """Fit logistic regression on train features (optionally k per class) and score it on test features."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise InputError("a linear probe needs labelled training and test images")
    if k_shot is not None:
        keep = few_shot_indices(train_y, k_shot, seed)
        train_x, train_y = train_x[keep], train_y[keep]
    if len(train_y.unique()) < 2:
        raise InputError("a linear probe needs training images of at least two classes")
    x, y = train_x.float().numpy(), train_y.numpy()
    c, val_acc = select_c(x, y, tuple(cs), val_fraction, seed, max_iter)
    probe = _fit(x, y, c, max_iter)
    n_cls = num_classes or int(max(int(train_y.max()), int(test_y.max())) + 1)
    metrics = classification_metrics(_scores(probe, test_x.float().numpy(), n_cls), test_y)
    return ProbeResult(metrics, float(c), len(y), len(test_y), k_shot, val_acc)
