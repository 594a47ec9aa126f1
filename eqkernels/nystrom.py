"""Large-N kernel ridge regression: Nyström-preconditioned conjugate gradients (the Falkon approach).

Exact kernel ridge regression needs the N×N training kernel and an N³ solve. With M ≪ N inducing
points Z (a subset of the training inputs) the predictor is restricted to f(x) = K(x, Z) β, and the
ridge problem min_β ‖K_NM β − Y‖² + λ βᵀ K_MM β has the normal equations

    H β = K_MN Y,      H = K_MN K_NM + λ K_MM                                        (M × M)

(Rudi, Carratino & Rosasco 2017; Meanti et al. 2020). λ = `ridge` × mean diag K_MM, the house
convention of `eqkernels.solvers` with the mean diagonal estimated on the inducing set (a uniform
sample of the training inputs; equal to the exact one when M = N). At M = N, H = K (K + λI) and
β = (K + λI)⁻¹ Y: exact kernel ridge regression.

Preconditioner (Falkon): with K_MM + jI = TᵀT (T upper triangular, relative jitter j stated in
the solution) and AᵀA = (N/M) T Tᵀ + λ I, P = T⁻¹ A⁻¹ makes Pᵀ H P ≈ I, because for uniformly
chosen inducing points K_MN K_NM ≈ (N/M) K_MM². Conjugate gradients run on Pᵀ H P u = Pᵀ K_MN Y,
β = P u, one CG for all columns of a matrix Y (each column keeps its own step sizes), until the
relative residual ‖K_MN Y − H β‖ / ‖K_MN Y‖ of every column is at most `tol`. The residual is
tracked without extra products (the matrix product H P p of each step is accumulated) and
recomputed from scratch at the end; if rounding let the tracked one drift below `tol` while the
recomputed one is above it, CG restarts from the current β (up to `RESTARTS` times). The
recomputed residual is the one reported.

The N×M kernel is computed in row blocks through the cross-kernel functions of each domain
(`row_blocks`) and held in memory: O(N·M), never the N×N matrix.

NNGP predictive variance: the DTC (deterministic training conditional, Seeger et al. 2003;
Quiñonero-Candela & Rasmussen 2005) counterpart of the exact posterior variance,

    σ²(x) = K(x, x) − K_xM K_MM⁻¹ K_Mx + λ K_xM (K_MN K_NM + λ K_MM)⁻¹ K_Mx,

which is ≥ 0 (a Schur complement plus a positive term) and equals the exact posterior variance
K(x, x) − K_xN (K + λI)⁻¹ K_Nx when M = N (`NystromPosterior`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from eqkernels.errors import InputError

DEFAULT_MEMORY_BUDGET_BYTES = 4 * 2 ** 30   # exact training kernels up to 4 GiB in all, or half the RAM if less
DEFAULT_MAX_INDUCING = 2000                 # `auto` past the budget: M = min(N, 2,000)
DEFAULT_TOLERANCE = 1e-8                    # relative residual of the normal equations
DEFAULT_ROW_BLOCK = 512                     # training inputs per block of the N×M kernel
INITIAL_JITTER = 1e-10                      # relative to mean diag K_MM; raised tenfold until K_MM factors
MAX_JITTER = 1e-3
RESTARTS = 3                                # CG restarts when the recomputed residual misses the tolerance


# --------------------------------------------------------------------------------------------- choice
def parse_inducing(value: str | int | None) -> str | int:
    """'auto', 'exact' or a positive number of inducing points, from the `--inducing` option."""
    if value is None:
        return "auto"
    text = str(value).strip().lower()
    if text in ("auto", "exact"):
        return text
    try:
        m = int(text)
    except ValueError:
        raise InputError(f"--inducing must be 'auto', 'exact' or a positive number of inducing points, "
                         f"got {value!r}") from None
    if m < 1:
        raise InputError(f"--inducing must be a positive number of inducing points, got {m}")
    return m


def check_inducing(choice: str | int, n: int) -> str | int:
    """The parsed `--inducing` choice, refused (one line) when it asks for more inducing points than N."""
    if isinstance(choice, int) and choice > n:
        raise InputError(f"--inducing {choice} exceeds the {n} training examples")
    return choice


def memory_budget_bytes() -> int:
    """The exact solver's memory budget: 4 GiB, or half the physical memory if that is less."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        physical = 2 * DEFAULT_MEMORY_BUDGET_BYTES
    return int(min(DEFAULT_MEMORY_BUDGET_BYTES, physical // 2))


def plan_solver(n: int, inducing: str | int | None, *, stored_kernels: int, budget_bytes: int | None = None,
                max_inducing: int = DEFAULT_MAX_INDUCING) -> dict:
    """Exact KRR or Nyström-CG for N training inputs, and why: {'solver', 'inducing', 'reason', ...}.

    `stored_kernels`: how many N×N float64 arrays the exact fit holds at once (kernels, factors).
    `auto` is exact when N²·8·stored_kernels fits `budget_bytes`, else Nyström with M = min(N, max_inducing).
    """
    choice = parse_inducing(inducing)
    budget = memory_budget_bytes() if budget_bytes is None else int(budget_bytes)
    exact_bytes = int(n) * int(n) * 8 * int(stored_kernels)
    plan = {"exact_bytes": exact_bytes, "budget_bytes": budget, "n_train": int(n)}
    if choice == "exact":
        return {**plan, "solver": "exact", "inducing": None, "reason": "--inducing exact"}
    if isinstance(check_inducing(choice, n), int):
        return {**plan, "solver": "nystrom", "inducing": choice, "reason": f"--inducing {choice}"}
    need = f"{exact_bytes / 2 ** 20:.0f} MiB"
    if exact_bytes <= budget:
        return {**plan, "solver": "exact", "inducing": None,
                "reason": f"auto: the exact training kernels ({need}) fit the memory budget ({budget / 2 ** 20:.0f} MiB)"}
    m = min(int(n), int(max_inducing))
    return {**plan, "solver": "nystrom", "inducing": m,
            "reason": f"auto: the exact training kernels ({need}) exceed the memory budget "
                      f"({budget / 2 ** 20:.0f} MiB); M = min(N, {max_inducing})"}


def describe_solver(solver: dict | None) -> str:
    """One line on the solver a model was fitted with, and why."""
    if not solver:
        return "exact kernel ridge regression"
    if solver.get("solver") != "nystrom":
        return f"exact kernel ridge regression ({solver.get('reason')})"
    state = "converged" if solver.get("cg_converged") else "NOT converged"
    return (f"Nyström-CG with M = {solver['inducing']} inducing points ({solver.get('reason')}): "
            f"{solver['cg_iterations']} CG iterations, relative residual {solver['cg_residual']:.1e} "
            f"(tolerance {solver['cg_tolerance']:.0e}, {state})")


def uniform_inducing(n: int, m: int, seed: int = 0) -> np.ndarray:
    """Indices (M,) of M of N training inputs drawn uniformly without replacement, sorted.

    The first M of one seeded permutation, so the sets are nested as M grows.
    """
    if not 1 <= m <= n:
        raise InputError(f"the number of inducing points must lie in 1..{n}, got {m}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:m])


# ---------------------------------------------------------------------------------------- kernels
def row_blocks(cross, n: int, block: int = DEFAULT_ROW_BLOCK) -> dict[str, np.ndarray]:
    """Stack `cross(start, stop)` → {name: (stop − start, M)} over row blocks of N rows: {name: (N, M)}.

    Only one block's intermediate arrays exist at a time besides the (N, M) result.
    """
    out: dict[str, np.ndarray] = {}
    for start in range(0, n, block):
        stop = min(start + block, n)
        for name, part in cross(start, stop).items():
            part = np.asarray(part, np.float64)
            if name not in out:
                out[name] = np.empty((n,) + part.shape[1:])
            out[name][start:stop] = part
    return out


def _symmetric(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k, np.float64)
    return 0.5 * (k + k.T)


def factor_inducing(k_mm: np.ndarray) -> tuple[np.ndarray, float]:
    """(T upper (M, M) with TᵀT = K_MM + j·mean diag·I, relative jitter j): the smallest tenfold j that factors."""
    k = _symmetric(k_mm)
    scale = float(np.mean(np.diag(k))) or 1.0
    eye = np.eye(len(k))
    jitter = INITIAL_JITTER
    while True:
        try:
            return scipy.linalg.cholesky(k + jitter * scale * eye, lower=False), jitter
        except np.linalg.LinAlgError:
            if jitter * 10 > MAX_JITTER * (1 + 1e-9):
                raise InputError(f"the kernel of the inducing points is not positive definite even with a relative "
                                 f"jitter of {jitter:g}; use fewer inducing points") from None
            jitter = float(f"{jitter * 10:.6g}")


# --------------------------------------------------------------------------------------------- solver
@dataclass
class NystromSolution:
    """Coefficients β (M,) or (M, T) with f(x) = K(x, Z) β, and how the solve went."""

    coef: np.ndarray
    ridge: float          # relative ridge (× mean diag K_MM)
    reg: float            # the absolute λ
    jitter: float         # relative jitter added to K_MM (in H and the preconditioner)
    iterations: int
    residual: float       # max over columns of ‖K_MN Y − H β‖ / ‖K_MN Y‖, recomputed after the last step
    tolerance: float
    converged: bool

    def info(self) -> dict:
        """The JSON-able figures of the solve (for model metadata and reports)."""
        return {"ridge": self.ridge, "reg": self.reg, "jitter": self.jitter, "cg_iterations": self.iterations,
                "cg_residual": self.residual, "cg_tolerance": self.tolerance, "cg_converged": self.converged}


def normal_matvec(k_nm: np.ndarray, k_mm_j: np.ndarray, reg: float, v: np.ndarray) -> np.ndarray:
    """H v = K_MN (K_NM v) + λ K_MM v for v (M,) or (M, T)."""
    return k_nm.T @ (k_nm @ v) + reg * (k_mm_j @ v)


def _preconditioner(t_upper: np.ndarray, n: int, reg: float) -> np.ndarray:
    """A upper (M, M) with AᵀA = (N/M) T Tᵀ + λ I (Falkon's second Cholesky)."""
    m = len(t_upper)
    inner = (n / m) * (t_upper @ t_upper.T) + reg * np.eye(m)
    return scipy.linalg.cholesky(_symmetric(inner), lower=False)


def falkon_solve(k_nm: np.ndarray, k_mm: np.ndarray, y: np.ndarray, *, ridge: float = 1e-6,
                 tol: float = DEFAULT_TOLERANCE, max_iter: int | None = None) -> NystromSolution:
    """Nyström KRR coefficients from K_NM (N, M), K_MM (M, M) and targets y (N,) or (N, T) by preconditioned CG."""
    k_nm = np.asarray(k_nm, np.float64)
    y = np.asarray(y, np.float64)
    n, m = k_nm.shape
    if y.shape[0] != n or k_mm.shape != (m, m):
        raise ValueError(f"kernels {k_nm.shape}, {k_mm.shape} and targets {y.shape} do not match")
    if not ridge > 0:
        raise InputError(f"the Nyström solver needs a positive ridge, got {ridge}")
    t_upper, jitter = factor_inducing(k_mm)
    scale = float(np.mean(np.diag(_symmetric(k_mm)))) or 1.0
    reg = ridge * scale
    k_mm_j = _symmetric(k_mm) + jitter * scale * np.eye(m)
    a_upper = _preconditioner(t_upper, n, reg)
    tri = scipy.linalg.solve_triangular

    def precondition(u):           # P u = T⁻¹ A⁻¹ u
        return tri(t_upper, tri(a_upper, u, lower=False), lower=False)

    def precondition_t(w):         # Pᵀ w = A⁻ᵀ T⁻ᵀ w
        return tri(a_upper, tri(t_upper, w, trans="T", lower=False), trans="T", lower=False)

    b = (k_nm.T @ y).reshape(m, -1)
    b_norm = np.linalg.norm(b, axis=0)
    b_norm = np.where(b_norm > 0, b_norm, 1.0)
    u, h_beta = np.zeros_like(b), np.zeros_like(b)
    r = precondition_t(b)
    p, rr = r.copy(), np.sum(r * r, axis=0)
    max_iter = max_iter or max(100, 2 * m)
    iterations = 0
    for _ in range(RESTARTS + 1):
        while iterations < max_iter and np.max(np.linalg.norm(b - h_beta, axis=0) / b_norm) > tol:
            h_p = normal_matvec(k_nm, k_mm_j, reg, precondition(p))
            w_p = precondition_t(h_p)
            denom = np.sum(p * w_p, axis=0)
            step = np.where(denom > 0, rr / np.where(denom > 0, denom, 1.0), 0.0)  # a converged column stops
            u += step * p
            h_beta += step * h_p
            r -= step * w_p
            rr_new = np.sum(r * r, axis=0)
            p = r + np.where(rr > 0, rr_new / np.where(rr > 0, rr, 1.0), 0.0) * p
            rr = rr_new
            iterations += 1
        beta = precondition(u)
        h_beta = normal_matvec(k_nm, k_mm_j, reg, beta)    # the residual from scratch, not the recursion's
        residual = float(np.max(np.linalg.norm(b - h_beta, axis=0) / b_norm))
        if residual <= tol or iterations >= max_iter:
            break
        # The recursively updated residual drifted below tol while the true one did not: restart CG from β.
        r = precondition_t(b - h_beta)
        p, rr = r.copy(), np.sum(r * r, axis=0)
    return NystromSolution(beta.reshape((m,) + y.shape[1:]), float(ridge), float(reg), float(jitter), iterations,
                           residual, float(tol), bool(residual <= tol))


# ------------------------------------------------------------------------------------------- variance
@dataclass
class NystromPosterior:
    """Factors of the DTC predictive variance (see the module docstring) of an NNGP kernel.

    `cholesky`: lower L (M, M), L Lᵀ = K_MM + jI; `system`: lower R (M, M), R Rᵀ = L⁻¹ K_MN K_NM L⁻ᵀ + λ I,
    so that K_MN K_NM + λ (K_MM + jI) = L R Rᵀ Lᵀ.
    """

    cholesky: np.ndarray
    system: np.ndarray
    reg: float
    ridge: float = 0.0
    jitter: float = 0.0

    @classmethod
    def fit(cls, k_nm: np.ndarray, k_mm: np.ndarray, ridge: float = 1e-6,
            block: int = DEFAULT_ROW_BLOCK) -> "NystromPosterior":
        """Factor from K_NM (N, M) and K_MM (M, M); L⁻¹ K_MN K_NM L⁻ᵀ is summed over row blocks (O(block·M) extra)."""
        t_upper, jitter = factor_inducing(k_mm)
        lower = t_upper.T
        m = len(lower)
        reg = ridge * (float(np.mean(np.diag(_symmetric(k_mm)))) or 1.0)
        gram = reg * np.eye(m)
        for start in range(0, len(k_nm), block):
            q = scipy.linalg.solve_triangular(lower, np.asarray(k_nm[start:start + block], np.float64).T, lower=True)
            gram += q @ q.T
        return cls(lower, np.linalg.cholesky(_symmetric(gram)), float(reg), float(ridge), float(jitter))

    def variance(self, k_test_diag: np.ndarray, k_test_inducing: np.ndarray) -> np.ndarray:
        """σ²(x) (T,) from K(x, x) (T,) and K(x, Z) (T, M)."""
        from eqkernels.solvers import check_finite_kernel

        k_diag, k_cross = np.asarray(k_test_diag, np.float64), np.asarray(k_test_inducing, np.float64)
        check_finite_kernel(k_diag, "test self")
        check_finite_kernel(k_cross, "test")
        a = scipy.linalg.solve_triangular(self.cholesky, k_cross.T, lower=True)     # L⁻¹ k
        c = scipy.linalg.solve_triangular(self.system, a, lower=True)               # R⁻¹ L⁻¹ k
        return np.maximum(k_diag - np.sum(a * a, axis=0) + self.reg * np.sum(c * c, axis=0), 0.0)


def condition_number(k_mm: np.ndarray) -> float:
    """2-norm condition number of a symmetric matrix (for tolerance statements in reports and tests)."""
    ev = np.linalg.eigvalsh(_symmetric(k_mm))
    return float(ev[-1] / ev[0]) if ev[0] > 0 else math.inf
