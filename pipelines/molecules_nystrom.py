"""Molecule models on many molecules: Nyström-preconditioned CG (`eqkernels.nystrom`) in place of exact KRR.

M inducing molecules are drawn uniformly from the training molecules (seeded by the split seed); the
N×M NTK is computed in row blocks of molecules with `MoleculeKernel(train rows, inducing)`, and K_MM
is its rows at the inducing molecules. Ridge: the given one, or the leave-one-out choice of
`molecules_model.fit_dual` on the exact M-molecule subproblem (same floor and, at the default quadrature
degree, the same invariance admissibility test on rotated training molecules) — leave-one-out on
all N would need the N×N kernel. The model stores the inducing molecules' atoms as its training set
(predictions are K(x, Z) β), the residual targets of the inducing molecules as `y_train` (so
`learning_curve` refits exact KRR on subsets of the inducing set), and the solver's choice, reason,
CG iterations and residual in `meta['solver']`.
"""
from __future__ import annotations

import numpy as np

from eqkernels.molecule_kernel import MoleculeKernel
from eqkernels.nystrom import falkon_solve, row_blocks, uniform_inducing

STORED_KERNELS = 2  # the exact fit holds the N×N NTK and the N×N eigenvectors of the leave-one-out ridge choice


def molecule_atoms(x: np.ndarray, mol: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Atoms (n, C, L) of the molecules `idx` (sorted) and their molecule numbers 0..len(idx)−1 (n,)."""
    keep = np.isin(mol, idx)
    return x[keep], np.searchsorted(idx, mol[keep])


def inducing_ntk(kernel: MoleculeKernel, x: np.ndarray, mol: np.ndarray, n: int, idx: np.ndarray,
                 block: int = 1024, executor=None, choice: dict | None = None) -> np.ndarray:
    """Regression kernel (N, M) between the N molecules (flat atoms x, sorted molecule indices mol) and the
    molecules idx: choice['kernel_output'] reduced by choice['atom_reduction'] (default: NTK summed over atom
    pairs; see `molecules_model.molecule_kernel_values`)."""
    from eqkernels.pipelines.molecules_model import molecule_kernel_values

    x_ind, mol_ind = molecule_atoms(x, mol, idx)
    starts = np.searchsorted(mol, np.arange(n + 1))  # atom offset of each molecule
    n_atoms = np.diff(starts)

    def cross(first, last):
        atoms = slice(starts[first], starts[last])
        k = kernel(x[atoms], mol[atoms] - first, last - first, x_ind, mol_ind, len(idx), executor=executor,
                   description=f"train × inducing kernel, molecules {first}–{last} of {n}")
        return {"ntk": molecule_kernel_values(k, choice or {}, n_atoms[first:last], n_atoms[idx])}

    return row_blocks(cross, n, block)["ntk"]


def fit_nystrom(kernel: MoleculeKernel, train, parts: dict, residual: np.ndarray, plan: dict, *,
                ridge: float | None, n_check: int, seed: int = 0, executor=None) -> tuple:
    """Nyström-CG fit of the residual targets (N,) with plan['inducing'] inducing molecules.

    parts: {'x', 'mol', 'scale', 'l0_mean', 'env_spec'} of the N training molecules (as in `molecules_model.fit_model`).
    Returns (inducing atoms, their molecule numbers, their residuals, ridge, β (M,), kernel change of the first
    `n_check` training molecules under motion (n_check, M), K_NM (N, M), solver record).
    """
    from eqkernels.pipelines.molecules_model import fit_dual, kernel_change_under_motion

    n, x, mol = len(train), parts["x"], parts["mol"]
    idx = uniform_inducing(n, int(plan["inducing"]), seed)
    k_nm = inducing_ntk(kernel, x, mol, n, idx, executor=executor, choice=parts)
    x_ind, mol_ind = molecule_atoms(x, mol, idx)
    change = kernel_change_under_motion(kernel, dict(parts, x=x_ind, mol=mol_ind), train.subset(np.arange(n_check)),
                                         k_nm[:n_check])
    k_mm = k_nm[idx]
    given = ridge is not None
    ridge, _ = fit_dual(kernel.spec, k_mm, residual[idx], ridge, change)
    solution = falkon_solve(k_nm, k_mm, residual, ridge=ridge)
    solver = dict(plan, rule="uniform", seed=seed, **solution.info(),
                  ridge_rule="given" if given else "leave-one-out on the inducing subproblem")
    return x_ind, mol_ind, residual[idx], float(ridge), solution.coef, change, k_nm, solver
