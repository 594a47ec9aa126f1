"""Mean predictions of infinitely wide networks trained by gradient flow on the MSE loss.

For a kernel Θ (the NTK) on training inputs X with targets Y (N, T), learning rate η and time t
(Jacot et al. 2018; the loss is ½ Σ_i ‖f(x_i) − y_i‖², summed, so t counts gradient-descent steps):

    μ_t(x) = Θ(x, X) Θ(X, X)⁻¹ (I − exp(−η Θ(X, X) t)) Y = Θ(x, X) α_t

Gradient descent in discrete steps (how finite networks are trained) replaces the exponential
by a power: after k steps at learning rate η, exp(−ηΘt) becomes (I − ηΘ)^k (`discrete=True`,
`time=k`); the two agree only when ηλ_max(Θ) ≪ 1.

t = ∞ is kernel ridge regression, α = (Θ + λ I)⁻¹ Y, with λ = `ridge` × mean(diag Θ) so that
the regulariser does not depend on the kernel's scale. With the NNGP kernel K the same
formulas give the Bayesian posterior mean, and its posterior variance
K(x, x) − K(x, X)(K + λI)⁻¹K(X, x) is the predictive uncertainty offered here.

A kernel ridge regression fit (any kernel matrices will do; here a Gaussian kernel on the line):
the leave-one-out choice of the ridge, then predictions at test points.

    >>> import numpy as np
    >>> from eqkernels import mean_prediction, select_ridge_loo
    >>> x, x_test = np.linspace(0, 3, 30), np.array([0.55, 1.5, 2.45])
    >>> gauss = lambda a, b: np.exp(-(a[:, None] - b[None, :]) ** 2)
    >>> y = np.sin(2 * x)
    >>> ridge, _, alpha = select_ridge_loo(gauss(x, x), y)          # α = (K + λI)⁻¹ y at the chosen λ
    >>> predicted = mean_prediction(gauss(x_test, x), alpha)
    >>> bool(np.max(np.abs(predicted - np.sin(2 * x_test))) < 1e-2)
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from eqkernels.errors import InputError


def check_finite_kernel(k: np.ndarray, which: str) -> None:
    """Refuse a kernel with NaN or infinite entries (a broken kernel would give NaN predictions)."""
    bad = ~np.isfinite(k)
    if np.any(bad):
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"the {which} kernel has {int(bad.sum())} NaN or infinite entries (first at {first})")


def mean_prediction(k_test_train: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """μ(x) = Θ(x, X) α: (M, N) test×train kernel and dual coefficients (N,) or (N, T) → (M,) or (M, T)."""
    k = np.asarray(k_test_train, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    if k.ndim != 2 or k.shape[1] != alpha.shape[0]:
        raise ValueError(f"test kernel {k.shape} and dual coefficients {alpha.shape} do not match")
    check_finite_kernel(k, "test")
    return k @ alpha


def _regulariser(k_train: np.ndarray, ridge: float) -> float:
    scale = float(np.mean(np.diag(k_train)))
    return ridge * (scale if scale > 0 else 1.0)


def dual_coefficients(k_train: np.ndarray, y: np.ndarray, *, ridge: float = 1e-6, time: float | None = None,
                      learning_rate: float = 1.0, discrete: bool = False) -> np.ndarray:
    """α with μ_t(x) = Θ(x, X) α for targets y (N,) or (N, T); `time=None` means t = ∞.

    `discrete=True`: `time` counts gradient-descent steps k, and α = Θ⁻¹ (I − (I − ηΘ)^k) Y.
    """
    k = np.asarray(k_train, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] != y.shape[0]:
        raise ValueError(f"kernel {k.shape} and targets {y.shape} do not match")
    check_finite_kernel(k, "training")
    n = k.shape[0]
    k = 0.5 * (k + k.T)
    reg = _regulariser(k, ridge)
    if time is None or math.isinf(time):
        try:
            factor = scipy.linalg.cho_factor(k + reg * np.eye(n), lower=True, check_finite=False)
            return scipy.linalg.cho_solve(factor, y, check_finite=False)
        except np.linalg.LinAlgError:
            raise InputError("the training kernel is singular even with the ridge; increase --ridge "
                             "(duplicate training inputs cause this)") from None
    if time < 0:
        raise ValueError(f"time must be >= 0, got {time}")
    if discrete and time != int(time):
        raise ValueError(f"discrete gradient descent takes a whole number of steps, got {time}")
    evals, evecs = np.linalg.eigh(k + reg * np.eye(n))
    evals = np.clip(evals, 0.0, None)
    # (1 − e^{−ηλt})/λ, with its limit ηt where λ → 0 (a direction gradient flow has not moved along).
    rate = learning_rate * time
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if discrete:
            step = learning_rate * evals
            # 1 − (1 − ηλ)^k through log1p for small ηλ (the plain power loses digits there); for
            # large ηλ the plain power, which oscillates (1 < ηλ < 2) or diverges (ηλ > 2) as GD does.
            small = step < 0.5
            filled = np.where(small, -np.expm1(time * np.log1p(-np.where(small, step, 0.0))), 1 - (1 - step) ** time)
            gain = np.where(step * time > 1e-12, filled / evals, rate)
        else:
            gain = np.where(evals * rate > 1e-12, -np.expm1(-evals * rate) / evals, rate)
    return evecs @ (gain[:, None] * (evecs.T @ y.reshape(n, -1))).reshape((n,) + y.shape[1:])


@dataclass
class GaussianPosterior:
    """Cholesky factor of K(X,X) + λI for posterior variances of the NNGP."""

    cholesky: np.ndarray  # lower triangular (N, N)
    ridge: float = 0.0    # the relative ridge that made K + λI numerically positive definite

    @classmethod
    def fit(cls, k_train: np.ndarray, ridge: float = 1e-6, *, max_ridge: float = 1e-2) -> "GaussianPosterior":
        """Factor K + λI, raising the ridge tenfold until the factorisation succeeds.

        Duplicate or near-duplicate training inputs make K singular, and a float32 kernel's rounding
        (~1e-7 per entry, up to ~N·1e-7 in its eigenvalues) then leaves tiny negative eigenvalues that
        a small ridge does not cover; the variances only grow slightly with a larger ridge.
        """
        k = 0.5 * (np.asarray(k_train, np.float64) + np.asarray(k_train, np.float64).T)
        eye = np.eye(len(k))
        current = ridge
        while True:
            try:
                return cls(np.linalg.cholesky(k + _regulariser(k, current) * eye), current)
            except np.linalg.LinAlgError:
                if current * 10 > max_ridge * (1 + 1e-9):
                    raise InputError(f"the NNGP kernel of the training inputs is not positive definite even with "
                                     f"a relative ridge of {current:g}") from None
                current = float(f"{max(current, 1e-12) * 10:.6g}")  # 1e-05, not 9.999999999999999e-06

    def variance(self, k_test_diag: np.ndarray, k_test_train: np.ndarray) -> np.ndarray:
        """Posterior variance at test points: (M,) from K(x,x) (M,) and K(x, X) (M, N)."""
        k_diag, k_cross = np.asarray(k_test_diag, np.float64), np.asarray(k_test_train, np.float64)
        check_finite_kernel(k_diag, "test self")
        check_finite_kernel(k_cross, "test")
        v = scipy.linalg.solve_triangular(self.cholesky, k_cross.T, lower=True)
        return np.maximum(k_diag - np.sum(v * v, axis=0), 0.0)


def centred_one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Targets for classification by regression: one-hot minus 1/C, shape (N, C)."""
    y = np.zeros((len(labels), n_classes))
    y[np.arange(len(labels)), np.asarray(labels, int)] = 1.0
    return y - 1.0 / n_classes


def select_ridge_loo(k_train: np.ndarray, y: np.ndarray, ridges=tuple(10.0 ** np.arange(-6, 0.25, 0.5)), *,
                      min_ridge: float = 0.0, admissible=None):
    """Ridge (relative to mean diag) with the lowest leave-one-out MAE, from one eigendecomposition.

    Only ridges ≥ `min_ridge` whose dual coefficients pass `admissible(alpha)` (if given) compete; if
    none passes, the largest ridge is used.
    """
    ridges = [r for r in ridges if r >= min_ridge] or [max(ridges)]
    k = 0.5 * (k_train + k_train.T)
    scale = float(np.mean(np.diag(k)))
    evals, evecs = np.linalg.eigh(k)
    evals = np.clip(evals, 0, None)
    vy = evecs.T @ y
    best = None
    for r in ridges:
        inv = 1.0 / (evals + r * scale)
        alpha = evecs @ (inv * vy)
        if admissible is not None and r != ridges[-1] and not admissible(alpha):
            continue
        diag = np.einsum("ik,k,ik->i", evecs, inv, evecs)
        loo = float(np.mean(np.abs(alpha / diag)))
        if best is None or loo < best[1]:
            best = (r, loo, alpha)
    return best


def solve_ridge_eigh(k_train: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """(K + λ I)⁻¹ y with λ = ridge × mean diag K, via eigh with negative eigenvalues clipped to 0.

    Float32 kernels and SO(3) quadrature leave tiny negative eigenvalues (≈1e-7 of the largest),
    which make a Cholesky factorisation fail at small ridges; clipping is the PSD projection.
    """
    k = 0.5 * (k_train + k_train.T)
    evals, evecs = np.linalg.eigh(k)
    inv = 1.0 / (np.clip(evals, 0, None) + ridge * float(np.mean(np.diag(k))))
    return evecs @ (inv * (evecs.T @ y))
