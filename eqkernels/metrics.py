"""Evaluation measures: classification quality, regression errors and symmetry measures."""
from __future__ import annotations

import numpy as np


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return float(np.mean(labels == predicted)) if len(labels) else float("nan")


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, int), np.asarray(predicted, int)), 1)
    return cm


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall of each class from a confusion matrix (NaN where a class has no test example)."""
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / np.maximum(totals, 1), np.nan)


def orbit_same_predictions(orbit_predictions: np.ndarray) -> np.ndarray:
    """How many of the |G| transformed copies get the prediction of the untransformed input.

    `orbit_predictions` (|G|, N): predicted class of g·x_n, identity first. Returns (N,) in 1..|G|;
    |G| everywhere means the classifier is invariant on these inputs (Gerken & Kessel 2024).
    """
    p = np.asarray(orbit_predictions)
    return np.sum(p == p[0][None], axis=0)


def max_relative_change(orbit_outputs: np.ndarray) -> float:
    """max over inputs and group elements of ‖f(g·x) − f(x)‖ / ‖f(x)‖ for outputs (|G|, N, T)."""
    out = np.asarray(orbit_outputs, dtype=np.float64)
    if out.ndim == 2:
        out = out[..., None]
    base = out[0]
    norm = np.linalg.norm(base, axis=-1)
    diff = np.linalg.norm(out - base[None], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(norm[None] > 0, diff / np.maximum(norm[None], 1e-300), diff)
    return float(np.max(rel)) if rel.size else 0.0


def mean_relative_change(orbit_outputs: np.ndarray, scale: float | None = None) -> float:
    """Invariance error: mean over inputs and g ≠ e of ‖f(g·x) − f(x)‖, over the RMS of ‖f(x)‖.

    `orbit_outputs` (|G|, N, T), identity first. 0 for an invariant function. Dividing by one scale
    for the whole input set (not by each ‖f(x)‖) keeps inputs with near-zero outputs, such as
    noise images, from dominating the average. `scale` replaces the RMS by a fixed value (e.g. the
    norm of a target), so that functions of different size, such as ensembles of different sizes
    whose means carry less and less initial noise, are measured in the same units.
    """
    out = np.asarray(orbit_outputs, dtype=np.float64)
    if out.ndim == 2:
        out = out[..., None]
    if out.shape[0] < 2 or out.shape[1] == 0:
        return 0.0
    diff = np.linalg.norm(out[1:] - out[:1], axis=-1)
    if scale is None:
        scale = np.sqrt(np.mean(np.sum(out[0] ** 2, axis=-1)))
    return float(np.mean(diff) / scale) if scale > 0 else float(np.mean(diff))


def relative_distance(outputs: np.ndarray, reference: np.ndarray) -> float:
    """‖outputs − reference‖ / ‖reference‖ (Frobenius norms over every input and output)."""
    a, b = np.asarray(outputs, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a - b))


def mae(y: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y) - np.asarray(predicted))))


def rmse(y: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(y) - np.asarray(predicted)) ** 2)))
