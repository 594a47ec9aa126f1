"""Symmetric rank-2 tensor properties of molecules (QM9's polarizability) with SO(3)-equivariant NTKs.

A symmetric tensor A splits into degrees 0 ⊕ 2 (`eqkernels.so3_equivariant.cartesian_to_irreps`):
c₀ = tr(A)/√3, invariant, and c₂ (5 components), which rotates with D²(R). Each part is regressed with
its own block of the equivariant molecule kernel (symmetry-adapted GPR), both blocks from one pass over
the atom pairs:

    c₀(X) = counts(X)·β + Σ_b K₀(X, X_b) α₀,b         (per-element linear fit, then the kernel)
    c₂(X) = Σ_b K₂(X, X_b) α₂,b                        (K₂ (5 × 5) blocks, α₂,b ∈ R⁵; no mean: 0 is the
                                                        only equivariant constant)

so a rotated molecule gets exactly the rotated prediction, R A Rᵀ, up to the SO(3) quadrature error.
Features, units of energies and the ridge selection are those of `eqkernels.pipelines.molecules`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eqkernels.environments import EnvironmentSpec, atom_environments, channel_scales
from eqkernels.errors import InputError, ModelFileError
from eqkernels.molecule_kernel import MoleculeKernel
from eqkernels.pipelines.molecules import check_molecules, normalise_features, transformed_copies
from eqkernels.pipelines.molecules_model import ridge_floor
from eqkernels.pipelines.qm9io import (PROPERTY_NAMES, TENSOR_NATIVE_UNITS, MoleculeSet, tensor_property_names,
                                       tensor_values)
from eqkernels.so3 import AtomKernelSpec, random_rotations, reference_degree_for
from eqkernels.solvers import select_ridge_loo, solve_ridge_eigh
from eqkernels.so3_equivariant import (EQUIVARIANT_KERNELS, anisotropy, block_quadrature_error, cartesian_to_irreps,
                                       degree_block, irreps_to_cartesian, isotropic_part)

TENSOR_MODEL_KIND = "molecule-tensor-model"
TENSOR_MODEL_VERSION = 1
DEGREES = (0, 2)
BOHR3_IN_ANGSTROM3 = 0.529177210903 ** 3          # CODATA 2018 Bohr radius, Å
VOLUME_UNITS = {"a0^3": 1.0, "bohr^3": 1.0, "Å^3": 1 / BOHR3_IN_ANGSTROM3, "A^3": 1 / BOHR3_IN_ANGSTROM3}  # bohr³ per unit


def is_tensor_target(target: str) -> bool:
    """Targets that are not one of the 15 scalar QM9 properties are looked up as tensors."""
    return target not in PROPERTY_NAMES


def convert_volume(values, from_unit: str, to_unit: str) -> np.ndarray:
    """Polarizability volumes between bohr³ (a0^3) and Å³ (any other unit only to itself)."""
    if from_unit == to_unit:
        return np.asarray(values, np.float64)
    for u in (from_unit, to_unit):
        if u not in VOLUME_UNITS:
            raise InputError(f"unknown unit {u!r} for a polarizability; choose one of {', '.join(VOLUME_UNITS)}")
    return np.asarray(values, np.float64) * (VOLUME_UNITS[from_unit] / VOLUME_UNITS[to_unit])


def target_tensors(mols: MoleculeSet, target: str, *, path=None) -> np.ndarray:
    """(N, 3, 3) tensors of `target`; one line if the data lacks them or has missing values."""
    values = tensor_values(mols, target)
    where = path or mols.source or None
    if values is None and target in TENSOR_NATIVE_UNITS:
        raise InputError(f"the data has no {target!r} tensor (for QM9 put qm9pack's qm9_polarizability.csv.xz "
                         "beside the data)", where)
    if values is None:
        keys = tensor_property_names(target)
        raise InputError(f"unknown target {target!r}: not one of {', '.join(PROPERTY_NAMES)}, and the data has no "
                         f"tensor of that name ({keys[0]} … {keys[-1]})", where)
    bad = np.nonzero(~np.all(np.isfinite(values), axis=(1, 2)))[0]
    if len(bad):
        raise InputError(f"molecule {mols.names[bad[0]]}: no {target!r} tensor ({len(bad)} molecules lack it)", where)
    return values


def tensor_summary(tensors: np.ndarray) -> dict[str, np.ndarray]:
    """The six components (N, 6) in qm9pack order (xx xy yy xz yz zz), isotropic part and anisotropy."""
    t = np.asarray(tensors, np.float64)
    six = np.stack([t[:, 0, 0], t[:, 0, 1], t[:, 1, 1], t[:, 0, 2], t[:, 1, 2], t[:, 2, 2]], axis=1)
    return {"components": six, "isotropic": isotropic_part(t), "anisotropy": anisotropy(t)}


@dataclass
class TensorModel:
    """Everything a tensor prediction needs; saved with `eqkernels.store` as a 'molecule-tensor-model'."""

    target: str
    unit: str
    env_spec: EnvironmentSpec
    kernel_spec: AtomKernelSpec
    channel_scale: np.ndarray
    l0_mean: np.ndarray
    x_train: np.ndarray          # (n_atoms, C, M) float32, already scaled
    mol_train: np.ndarray        # (n_atoms,)
    alpha0: np.ndarray           # (N,) dual coefficients of the degree-0 part
    alpha2: np.ndarray           # (N, 5) dual coefficients of the degree-2 part
    element_coef: np.ndarray     # (E,) per-element linear fit of c₀, in `unit`
    max_atoms: int
    ridges: tuple[float, float]
    meta: dict = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return len(self.alpha0)

    def kernel(self, progress: bool | None = None) -> MoleculeKernel:
        return MoleculeKernel(self.kernel_spec, self.env_spec.l_max, progress=progress, output_degrees=DEGREES)

    def features(self, mols: MoleculeSet):
        x, mol = atom_environments(self.env_spec, mols.numbers, mols.positions)
        return normalise_features(x, self.channel_scale, self.l0_mean), mol

    def predict(self, mols: MoleculeSet, *, check: bool = True, path=None, progress: bool | None = None) -> np.ndarray:
        """(N, 3, 3) predicted tensors in `unit`."""
        if check:
            check_molecules(mols, self.env_spec.elements, max_atoms=self.max_atoms, path=path)
        x, mol = self.features(mols)
        k = self.kernel(progress)(x, mol, len(mols), self.x_train, self.mol_train, self.n_train,
                                  description=f"predicting {len(mols)} molecules")["ntk"]
        c0 = mols.element_counts(self.env_spec.elements) @ self.element_coef + degree_block(k, DEGREES, 0) @ self.alpha0
        c2 = (degree_block(k, DEGREES, 2) @ self.alpha2.ravel()).reshape(len(mols), 5)
        return irreps_to_cartesian(np.concatenate([c0[:, None], c2], axis=1))

    def save(self, path: str | Path) -> Path:
        from eqkernels import store

        meta = {"model_version": TENSOR_MODEL_VERSION, "target": self.target, "unit": self.unit,
                "env_spec": self.env_spec.to_dict(), "kernel_spec": self.kernel_spec.to_dict(),
                "max_atoms": self.max_atoms, "ridges": list(self.ridges), **self.meta}
        arrays = {"x_train": self.x_train, "mol_train": self.mol_train.astype(np.int32), "alpha0": self.alpha0,
                  "alpha2": self.alpha2, "channel_scale": self.channel_scale, "l0_mean": self.l0_mean,
                  "element_coef": self.element_coef}
        return store.save(path, TENSOR_MODEL_KIND, meta, arrays)


def load_tensor_model(path: str | Path) -> TensorModel:
    """Read a tensor model file; other kinds, newer versions and unknown fields are refused with one line."""
    from eqkernels import store

    meta, arrays = store.load_model_file(path, TENSOR_MODEL_KIND, TENSOR_MODEL_VERSION,
                                         {"x_train", "mol_train", "alpha0", "alpha2", "channel_scale", "l0_mean",
                                          "element_coef"}, label="tensor model")
    try:
        env, spec = EnvironmentSpec.from_dict(meta["env_spec"]), AtomKernelSpec.from_dict(meta["kernel_spec"])
        fixed = (meta["target"], meta["unit"], int(meta["max_atoms"]), tuple(float(r) for r in meta["ridges"]))
    except (KeyError, TypeError, ValueError, InputError) as e:
        raise ModelFileError(f"model metadata not understood by this version: {e}", path) from None
    known = {store.VERSION_KEY, "target", "unit", "env_spec", "kernel_spec", "max_atoms", "ridges"}
    return TensorModel(fixed[0], fixed[1], env, spec, arrays["channel_scale"], arrays["l0_mean"], arrays["x_train"],
                       arrays["mol_train"].astype(np.int64), arrays["alpha0"], arrays["alpha2"],
                       arrays["element_coef"], fixed[2], fixed[3], {k: v for k, v in meta.items() if k not in known})


def _fit_part(k_train: np.ndarray, y: np.ndarray, ridge: float | None, floor: float):
    """(ridge, dual coefficients) of one degree's block: leave-one-out choice if ridge is None."""
    if ridge is None:
        r, _, alpha = select_ridge_loo(k_train, y, min_ridge=floor)
        return float(r), alpha
    return float(ridge), solve_ridge_eigh(k_train, y, ridge)


def fit_tensor_model(train: MoleculeSet, target: str = "polarizability", kernel: str = "mlp-so3avg", *,
                     unit: str | None = None, env_spec: EnvironmentSpec | None = None,
                     kernel_spec: AtomKernelSpec | None = None, ridge: float | None = None,
                     max_atoms: int | None = None, progress: bool | None = None, meta: dict | None = None) -> TensorModel:
    """Fit the degree-0 and degree-2 NTK regressions of a symmetric tensor target on the training molecules.

    The ridge of each part is chosen by leave-one-out (per scalar component for the degree-2 part),
    not below that block's measured per-atom quadrature error, unless `ridge` is given. The degree-2
    block needs a finer quadrature than the invariant kernel: on QM9 environments (L = 3) the
    equivariance error of predictions was 6 % of their RMS at degree 7, 0.05 % at 9 (use ≥ 9).
    """
    if kernel not in EQUIVARIANT_KERNELS:
        raise InputError(f"kernel {kernel!r} is not rotation-equivariant; a tensor target needs one of "
                         f"{', '.join(EQUIVARIANT_KERNELS)}")
    if ridge is not None and not ridge > 0:
        raise InputError(f"--ridge must be positive, got {ridge}")
    native = TENSOR_NATIVE_UNITS.get(target, "as in the data")
    unit = unit or native
    convert_volume(0.0, native, unit)
    env_spec = env_spec or EnvironmentSpec()
    kernel_spec = kernel_spec or AtomKernelSpec(kernel)
    check_molecules(train, env_spec.elements, path=train.source)
    coeffs = np.asarray(cartesian_to_irreps(convert_volume(target_tensors(train, target), native, unit)).array)
    counts = train.element_counts(env_spec.elements)
    element_coef = np.linalg.solve(counts.T @ counts + 1e-8 * np.eye(counts.shape[1]), counts.T @ coeffs[:, 0])
    x, mol = atom_environments(env_spec, train.numbers, train.positions)
    scale = channel_scales(env_spec, x)
    l0_mean = np.mean(x[:, :, 0] * scale[None, :], axis=0)
    x = normalise_features(x, scale, l0_mean)
    mk = MoleculeKernel(kernel_spec, env_spec.l_max, progress=progress, output_degrees=DEGREES)
    k = mk(x, mol, len(train), description=f"training kernel ({len(train)} molecules)")["ntk"]
    # Atoms against themselves and each other: self pairs sit on ReLU's cusp, where the quadrature is
    # least accurate (pairs of different atoms alone understate the error, issue 11 item 2).
    q_error = block_quadrature_error(kernel_spec, DEGREES, x[:24], x[:24]) if len(x) > 2 else dict.fromkeys(DEGREES, 0.0)
    r0, alpha0 = _fit_part(degree_block(k, DEGREES, 0), coeffs[:, 0] - counts @ element_coef, ridge,
                           ridge_floor(q_error[0]))
    r2, alpha2 = _fit_part(degree_block(k, DEGREES, 2), coeffs[:, 1:].ravel(), ridge, ridge_floor(q_error[2]))
    info = {"n_train": len(train), "train_names": list(train.names)[:5000], "data": train.source,
            "kernel_seconds": mk.last_seconds, "quadrature_error": max(q_error.values()),
            "quadrature_error_per_degree": {str(k): v for k, v in q_error.items()},
            "quadrature_reference_degree": reference_degree_for(kernel_spec.quadrature_degree), "native_unit": native,
            **(meta or {})}
    return TensorModel(target, unit, env_spec, kernel_spec, scale, l0_mean, x, mol, alpha0, alpha2.reshape(-1, 5),
                       element_coef, max_atoms or 2 * int(train.n_atoms.max()), (r0, r2), info)


def tensor_errors(pred: np.ndarray, true: np.ndarray) -> dict:
    """MAE per component (xx xy yy xz yz zz), of the isotropic part and of the anisotropy, mean component MAE."""
    p, t = tensor_summary(pred), tensor_summary(true)
    per = np.mean(np.abs(p["components"] - t["components"]), axis=0)
    return {"mae_components": dict(zip(("xx", "xy", "yy", "xz", "yz", "zz"), per.tolist())),
            "mae_component_mean": float(np.mean(np.abs(pred - true))),
            "mae_isotropic": float(np.mean(np.abs(p["isotropic"] - t["isotropic"]))),
            "mae_anisotropy": float(np.mean(np.abs(p["anisotropy"] - t["anisotropy"])))}


def evaluate_tensor(model: TensorModel, test: MoleculeSet, *, seed: int = 1, progress: bool | None = None) -> dict:
    """Errors on `test` and the equivariance error: predictions of rotated (translated, atom-permuted)
    copies against the rotated predictions R A Rᵀ."""
    true = convert_volume(target_tensors(test, model.target), model.meta.get("native_unit", "a0^3"), model.unit)
    check_molecules(test, model.env_spec.elements, max_atoms=model.max_atoms)
    pred = model.predict(test, check=False, progress=progress)
    moved = transformed_copies(test, seed)
    rots = random_rotations(len(test), seed)          # the rotations transformed_copies applied (same seed)
    pred_moved = model.predict(moved, check=False, progress=progress)
    rotated_pred = np.einsum("nij,njk,nlk->nil", rots, pred, rots)
    err = np.max(np.abs(pred_moved - rotated_pred))
    rms = float(np.sqrt(np.mean(pred ** 2))) or 1.0
    return {"n_test": len(test), **tensor_errors(pred, true),
            "mae_rotated_copies": tensor_errors(pred_moved, np.einsum("nij,njk,nlk->nil", rots, true, rots)),
            "equivariance_error_abs": float(err), "equivariance_error_rel": float(err / rms),
            "predictions": pred, "targets": true, "predictions_rotated": pred_moved, "rotations": rots}
