"""Hyperparameter choice for kernel ridge regression on precomputed kernels, by k-fold cross-validation.

Nothing here knows a dataset: a candidate is a name and a training kernel (N, N) (e.g. NTK or NNGP of
one architecture, summed or averaged over atoms); the ridge is relative to the mean diagonal of the
fold's training block, as in `eqkernels.solvers`, so it does not depend on the kernel's scale.

    scores = kfold_ridge_mae(k, y, ridges, n_folds=5)       # (len(ridges),) CV MAE
    choice = select_by_cv({"ntk": k1, "nngp": k2}, y)       # best candidate and ridge, with every score

Per-molecule reductions of a sum-over-atoms kernel K(A, B) = Σ_{i∈A, j∈B} k(i, j):
`atom_mean_kernel` gives the mean over atom pairs, K / (n_A n_B), the kernel of f(A) = (1/n_A) Σ_i g(i)
(for intensive targets: HOMO, LUMO, gap, dipole norm, which do not grow with the number of atoms).
"""
from __future__ import annotations

import numpy as np

DEFAULT_RIDGES = tuple(float(f"{r:.3g}") for r in 10.0 ** np.arange(-8, 0.25, 0.5))
REDUCTIONS = ("sum", "mean")


def kfold_indices(n: int, n_folds: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, validation) index arrays of a shuffled k-fold partition of range(n); folds differ in size by ≤ 1."""
    if n_folds < 2 or n_folds > n:
        raise ValueError(f"need 2 <= n_folds <= n, got n_folds={n_folds} for n={n}")
    order = np.random.default_rng(seed).permutation(n)
    folds = np.array_split(order, n_folds)
    return [(np.sort(np.concatenate(folds[:k] + folds[k + 1:])), np.sort(folds[k])) for k in range(n_folds)]


def _fold_predictions(k_train: np.ndarray, y: np.ndarray, fit: np.ndarray, val: np.ndarray, ridges) -> np.ndarray:
    """Validation predictions (len(ridges), len(val), ...) of ridge fits on the `fit` block, one eigh for all ridges."""
    block = k_train[np.ix_(fit, fit)]
    block = 0.5 * (block + block.T)
    evals, evecs = np.linalg.eigh(block)
    evals = np.clip(evals, 0.0, None)  # float32 kernels and quadrature leave tiny negative eigenvalues
    scale = float(np.mean(np.diag(block))) or 1.0
    projected = evecs.T @ y[fit].reshape(len(fit), -1)                    # (n_fit, T)
    cross = k_train[np.ix_(val, fit)] @ evecs                             # (n_val, n_fit)
    out = [cross @ (projected / (evals + r * scale)[:, None]) for r in ridges]
    return np.stack(out).reshape((len(ridges), len(val)) + y.shape[1:])


def kfold_ridge_mae(k_train: np.ndarray, y: np.ndarray, ridges=DEFAULT_RIDGES, *, n_folds: int = 5,
                    seed: int = 0) -> np.ndarray:
    """k-fold cross-validated MAE of ridge regression for each relative ridge: (len(ridges),).

    k_train (N, N) kernel, y (N,) or (N, T) targets (MAE over all entries).
    """
    k_train, y = np.asarray(k_train, np.float64), np.asarray(y, np.float64)
    if k_train.shape != (len(y), len(y)):
        raise ValueError(f"kernel {k_train.shape} and targets {y.shape} do not match")
    errors = np.zeros(len(ridges))
    for fit, val in kfold_indices(len(y), n_folds, seed):
        pred = _fold_predictions(k_train, y, fit, val, ridges)
        errors += np.abs(pred - y[val][None]).reshape(len(ridges), -1).sum(axis=1)
    return errors / y.size


def select_by_cv(candidates: dict[str, np.ndarray], y: np.ndarray, ridges=DEFAULT_RIDGES, *, n_folds: int = 5,
                 seed: int = 0) -> dict:
    """The candidate kernel and ridge with the lowest k-fold CV MAE.

    Returns {'name', 'ridge', 'cv_mae', 'scores': {name: {ridge: CV MAE}}}; ties go to the earlier candidate
    and the larger ridge (the smoother fit).
    """
    if not candidates:
        raise ValueError("no candidate kernels")
    scores, best = {}, None
    for name, k in candidates.items():
        mae = kfold_ridge_mae(k, y, ridges, n_folds=n_folds, seed=seed)
        scores[name] = {float(r): float(m) for r, m in zip(ridges, mae)}
        for r, m in sorted(zip(ridges, mae), reverse=True):
            if best is None or m < best[2]:
                best = (name, float(r), float(m))
    return {"name": best[0], "ridge": best[1], "cv_mae": best[2], "scores": scores}


def atom_mean_kernel(k: np.ndarray, n_atoms1, n_atoms2=None) -> np.ndarray:
    """K(A, B) / (n_A n_B): the mean over atom pairs of a sum-over-atoms kernel, (N1, N2) (or (N1, N2, ...))."""
    n1 = np.asarray(n_atoms1, np.float64)
    n2 = n1 if n_atoms2 is None else np.asarray(n_atoms2, np.float64)
    k = np.asarray(k, np.float64)
    if k.shape[:2] != (len(n1), len(n2)):
        raise ValueError(f"kernel {k.shape} does not match {len(n1)} × {len(n2)} molecules")
    if np.any(n1 <= 0) or np.any(n2 <= 0):
        raise ValueError("every molecule needs at least one atom")
    denom = np.outer(n1, n2)
    return k / denom.reshape(denom.shape + (1,) * (k.ndim - 2))


def reduce_kernel(k: np.ndarray, reduction: str, n_atoms1, n_atoms2=None) -> np.ndarray:
    """The molecule kernel for `reduction`: 'sum' (extensive targets, unchanged) or 'mean' (`atom_mean_kernel`)."""
    if reduction == "sum":
        return np.asarray(k, np.float64)
    if reduction == "mean":
        return atom_mean_kernel(k, n_atoms1, n_atoms2)
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
