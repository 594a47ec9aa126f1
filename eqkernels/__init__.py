"""eqkernels: equivariant neural tangent kernels for histology tiles and molecules.

What a user imports sits here, in one namespace: the kernels of both domains, the solvers, the
finite-width ensembles, the model store and the symmetry groups. The modules behind it
(`eqkernels.kernels`, `eqkernels.so3`, …) stay importable for the rest. Names are loaded on first
use, so `import eqkernels` itself is cheap and sets nothing (no environment variables). Domain
pipelines live in `eqkernels.pipelines`, the `eqk` command line in `eqkernels.apps` and the bundled
sample data in `eqkernels.datasets`.

A molecule kernel on two molecules (methane and water, coordinates in Å): atom environments become
sphere signals, and the SO(3)-averaged MLP kernel does not change when one molecule is rotated.

    >>> import numpy as np
    >>> import eqkernels as eqk
    >>> numbers = [np.array([6, 1, 1, 1, 1]), np.array([8, 1, 1])]
    >>> positions = [np.array([[0, 0, 0], [.63, .63, .63], [-.63, -.63, .63], [-.63, .63, -.63], [.63, -.63, -.63]]),
    ...              np.array([[0, 0, .12], [0, .76, -.47], [0, -.76, -.47]])]
    >>> env = eqk.EnvironmentSpec(l_max=2)
    >>> x, mol = eqk.atom_environments(env, numbers, positions)          # (8 atoms, C, 9), molecule of each
    >>> kernel = eqk.MoleculeKernel(eqk.AtomKernelSpec("mlp-so3avg", quadrature_degree=4), env.l_max, progress=False)
    >>> K = kernel(x, mol, 2)["ntk"]                                     # (2, 2), float64
    >>> turned = [positions[0], positions[1] @ eqk.so3.random_rotations(1, seed=3)[0].T]
    >>> x_turned, _ = eqk.atom_environments(env, numbers, turned)
    >>> K_turned = kernel(x, mol, 2, x_turned, mol, 2)["ntk"]
    >>> K.shape, bool(np.max(np.abs(K_turned - K)) < 1e-4 * np.max(K))
    ((2, 2), True)
"""
from __future__ import annotations

import importlib

from eqkernels._version import __version__

# public name → the module that defines it (imported on first access: PEP 562)
_EXPORTS = {
    # image kernels (histology tiles: C4/D4 roto-translations)
    "ImageKernel": "eqkernels.kernels", "KernelSpec": "eqkernels.kernels", "ConvNetSpec": "eqkernels.kernels",
    "KERNEL_FAMILIES": "eqkernels.kernels",
    # molecule kernels (SO(3))
    "AtomKernelSpec": "eqkernels.so3", "AtomKernel": "eqkernels.so3", "MoleculeKernel": "eqkernels.molecule_kernel",
    "EnvironmentSpec": "eqkernels.environments", "atom_environments": "eqkernels.environments",
    # solvers
    "dual_coefficients": "eqkernels.solvers", "mean_prediction": "eqkernels.solvers",
    "GaussianPosterior": "eqkernels.solvers", "select_ridge_loo": "eqkernels.solvers",
    "solve_ridge_eigh": "eqkernels.solvers",
    # finite-width ensembles
    "EnsembleSpec": "eqkernels.ensembles", "Ensemble": "eqkernels.ensembles",
    "AtomMLPEnsembleSpec": "eqkernels.molecule_ensembles", "MoleculeEnsemble": "eqkernels.molecule_ensembles",
    # groups
    "get_group": "eqkernels.groups", "resolve_group": "eqkernels.groups", "PlanarGroup": "eqkernels.groups",
    "RotationGroup": "eqkernels.groups",
    # errors
    "InputError": "eqkernels.errors", "ModelFileError": "eqkernels.errors",
}
# public modules reached as attributes (eqk.store.save, eqk.metrics.mae, eqk.so3.wigner_d, …)
_MODULES = ("store", "metrics", "solvers", "ensembles", "molecule_ensembles", "groups", "so3", "kernels", "layers")

__all__ = ["__version__", *_EXPORTS, *_MODULES]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(f"eqkernels.{name}")
    else:
        raise AttributeError(f"module 'eqkernels' has no attribute {name!r}")
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
