"""Vector and symmetric rank-2 tensor properties of molecules with SO(3)-equivariant NTKs.

An equivariant target is regressed in its irreducible parts, each with its own degree-λ block of the
equivariant molecule kernel (symmetry-adapted GPR), all blocks from one pass over the atom pairs:

- a vector v (e.g. the Mulliken charge dipole) is degree 1: in e3nn's basis its coefficients are
  (x, y, z) and D¹(R) = R, so c₁ = v;
- a symmetric tensor A (QM9's polarizability) splits into 0 ⊕ 2 (`eqkernels.so3_equivariant.cartesian_to_irreps`):
  c₀ = tr(A)/√3, invariant, and c₂ (5 components), which rotates with D²(R).

    c₀(X) = counts(X)·β + Σ_b K₀(X, X_b) α₀,b         (per-element linear fit, then the kernel)
    c_λ(X) = Σ_b K_λ(X, X_b) α_λ,b   (λ ≥ 1)           ((2λ+1) × (2λ+1) blocks, α_λ,b ∈ R^{2λ+1}; no mean:
                                                        0 is the only equivariant constant)

so a rotated molecule gets exactly the rotated prediction, R v or R A Rᵀ, up to the SO(3) quadrature
error. Features and the ridge selection are those of `eqkernels.pipelines.molecules`.
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
from eqkernels.pipelines.qm9io import (MULLIKEN_DIPOLE, PROPERTY_NAMES, TENSOR_NATIVE_UNITS, MoleculeSet,
                                       tensor_property_names, tensor_values, vector_property_names, vector_values)
from eqkernels.so3 import AtomKernelSpec, random_rotations, reference_degree_for
from eqkernels.solvers import select_ridge_loo, solve_ridge_eigh
from eqkernels.so3_equivariant import (EQUIVARIANT_KERNELS, anisotropy, block_quadrature_error, cartesian_to_irreps,
                                       degree_block, irreps_to_cartesian, isotropic_part)

TENSOR_MODEL_KIND = "molecule-tensor-model"
TENSOR_MODEL_VERSION = 2          # 2: any output form (meta "form"); version-1 files are symmetric tensors
DEGREES = (0, 2)                  # of a symmetric tensor
BOHR3_IN_ANGSTROM3 = 0.529177210903 ** 3          # CODATA 2018 Bohr radius, Å
VOLUME_UNITS = {"a0^3": 1.0, "bohr^3": 1.0, "Å^3": 1 / BOHR3_IN_ANGSTROM3, "A^3": 1 / BOHR3_IN_ANGSTROM3}  # bohr³ per unit
DEBYE_PER_E_ANGSTROM = 4.8032                     # 1 e·Å = 4.8032 D (e = 1.602177e-19 C, D = 3.33564e-30 C·m)
DIPOLE_UNITS = {"e*Å": 1.0, "e*A": 1.0, "eÅ": 1.0, "D": 1 / DEBYE_PER_E_ANGSTROM, "debye": 1 / DEBYE_PER_E_ANGSTROM}
VECTOR_NATIVE_UNITS = {MULLIKEN_DIPOLE: "e*Å"}
NATIVE_UNITS = {**TENSOR_NATIVE_UNITS, **VECTOR_NATIVE_UNITS}
UNIT_TABLES = {"a0^3": VOLUME_UNITS, "e*Å": DIPOLE_UNITS}          # by native unit


@dataclass(frozen=True)
class OutputForm:
    """How a Cartesian target maps to irreps coefficients: 'vector' (1) or 'symmetric-tensor' (0 ⊕ 2)."""

    name: str
    degrees: tuple[int, ...]

    def to_coefficients(self, values: np.ndarray) -> np.ndarray:
        """Cartesian values (N, 3) or (N, 3, 3) → (N, Σ(2λ+1)) coefficients, degree-major."""
        if self.name == "vector":
            return np.asarray(values, np.float64).reshape(-1, 3)      # e3nn's 1o basis is (x, y, z)
        return np.asarray(cartesian_to_irreps(values).array)

    def from_coefficients(self, coefficients: np.ndarray) -> np.ndarray:
        if self.name == "vector":
            return np.asarray(coefficients, np.float64)
        return irreps_to_cartesian(coefficients)

    def rotate(self, rotations: np.ndarray, values: np.ndarray) -> np.ndarray:
        """R v or R A Rᵀ per molecule; rotations (N, 3, 3)."""
        if self.name == "vector":
            return np.einsum("nij,nj->ni", rotations, values)
        return np.einsum("nij,njk,nlk->nil", rotations, values, rotations)

    def columns(self, degree: int) -> slice:
        """Where degree λ's 2λ+1 coefficients lie in `to_coefficients`' output."""
        start = sum(2 * lam + 1 for lam in self.degrees[:self.degrees.index(degree)])
        return slice(start, start + 2 * degree + 1)


VECTOR = OutputForm("vector", (1,))
SYMMETRIC_TENSOR = OutputForm("symmetric-tensor", DEGREES)
FORMS = {f.name: f for f in (VECTOR, SYMMETRIC_TENSOR)}


def is_tensor_target(target: str) -> bool:
    """Targets that are not one of the 15 scalar QM9 properties are looked up as vectors or tensors."""
    return target not in PROPERTY_NAMES


def convert_target_unit(values, native: str, from_unit: str, to_unit: str) -> np.ndarray:
    """Values between units of the same kind as `native` (volumes, dipoles; any other unit only to itself)."""
    if from_unit == to_unit:
        return np.asarray(values, np.float64)
    table = UNIT_TABLES.get(native)
    if table is None:
        raise InputError(f"the target is in {native!r} as in the data; it cannot be given in {to_unit!r}")
    for u in (from_unit, to_unit):
        if u not in table:
            raise InputError(f"unknown unit {u!r}; choose one of {', '.join(table)}")
    return np.asarray(values, np.float64) * (table[from_unit] / table[to_unit])


def convert_volume(values, from_unit: str, to_unit: str) -> np.ndarray:
    """Polarizability volumes between bohr³ (a0^3) and Å³ (any other unit only to itself)."""
    return convert_target_unit(values, "a0^3", from_unit, to_unit)


def target_form(mols: MoleculeSet, target: str, *, path=None) -> OutputForm:
    """The form of `target` in this data: a vector if it is one (mulliken_dipole, NAME_x/_y/_z), else a tensor.

    One line if the data has neither.
    """
    where = path or mols.source or None
    if target == MULLIKEN_DIPOLE and vector_values(mols, target) is None:
        raise InputError("the data has no Mulliken charges for 'mulliken_dipole' (they are in qm9pack's CSVs, "
                         "column Mulliken_pop, and in QM9 xyz files; the npz repack has none)", where)
    if vector_values(mols, target) is not None:
        return VECTOR
    if tensor_values(mols, target) is None and target not in TENSOR_NATIVE_UNITS:
        vec, ten = vector_property_names(target), tensor_property_names(target)
        raise InputError(f"unknown target {target!r}: not one of {', '.join(PROPERTY_NAMES)}, "
                         f"{MULLIKEN_DIPOLE}, and the data has no vector ({', '.join(vec)}) or "
                         f"tensor ({ten[0]} … {ten[-1]}) of that name", where)
    return SYMMETRIC_TENSOR


def target_values(mols: MoleculeSet, target: str, *, path=None) -> tuple[OutputForm, np.ndarray]:
    """(form, values (N, 3) or (N, 3, 3)) of `target`; one line if the data lacks it or has missing values."""
    form = target_form(mols, target, path=path)
    if form is SYMMETRIC_TENSOR:
        return form, target_tensors(mols, target, path=path)
    values = vector_values(mols, target)
    bad = np.nonzero(~np.all(np.isfinite(values), axis=1))[0]
    if len(bad):
        raise InputError(f"molecule {mols.names[bad[0]]}: no {target!r} vector ({len(bad)} molecules lack it)",
                         path or mols.source or None)
    return form, values


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


def vector_summary(vectors: np.ndarray) -> dict[str, np.ndarray]:
    """The components (N, 3) (x y z) and the norm (N,)."""
    v = np.asarray(vectors, np.float64)
    return {"components": v, "norm": np.linalg.norm(v, axis=1)}


@dataclass
class TensorModel:
    """Everything an equivariant (vector or tensor) prediction needs; saved with `eqkernels.store` as a
    'molecule-tensor-model'."""

    target: str
    unit: str
    env_spec: EnvironmentSpec
    kernel_spec: AtomKernelSpec
    channel_scale: np.ndarray
    l0_mean: np.ndarray
    x_train: np.ndarray          # (n_atoms, C, M) float32, already scaled
    mol_train: np.ndarray        # (n_atoms,)
    alphas: dict[int, np.ndarray]  # λ → (N, 2λ+1) dual coefficients of the degree-λ part
    element_coef: np.ndarray     # (E,) per-element linear fit of c₀, in `unit` (empty without λ = 0)
    max_atoms: int
    ridges: tuple[float, ...]    # one per output degree
    meta: dict = field(default_factory=dict)
    form: OutputForm = SYMMETRIC_TENSOR

    @property
    def degrees(self) -> tuple[int, ...]:
        return self.form.degrees

    @property
    def n_train(self) -> int:
        return len(next(iter(self.alphas.values())))

    def kernel(self, progress: bool | None = None) -> MoleculeKernel:
        return MoleculeKernel(self.kernel_spec, self.env_spec.l_max, progress=progress, output_degrees=self.degrees)

    def features(self, mols: MoleculeSet):
        x, mol = atom_environments(self.env_spec, mols.numbers, mols.positions)
        return normalise_features(x, self.channel_scale, self.l0_mean), mol

    def predict(self, mols: MoleculeSet, *, check: bool = True, path=None, progress: bool | None = None) -> np.ndarray:
        """(N, 3) predicted vectors or (N, 3, 3) tensors in `unit`."""
        if check:
            check_molecules(mols, self.env_spec.elements, max_atoms=self.max_atoms, path=path)
        x, mol = self.features(mols)
        k = self.kernel(progress)(x, mol, len(mols), self.x_train, self.mol_train, self.n_train,
                                  description=f"predicting {len(mols)} molecules")["ntk"]
        parts = []
        for lam in self.degrees:
            c = (degree_block(k, self.degrees, lam) @ self.alphas[lam].ravel()).reshape(len(mols), 2 * lam + 1)
            if lam == 0:
                c = c + (mols.element_counts(self.env_spec.elements) @ self.element_coef)[:, None]
            parts.append(c)
        return self.form.from_coefficients(np.concatenate(parts, axis=1))

    def save(self, path: str | Path) -> Path:
        from eqkernels import store

        meta = {"model_version": TENSOR_MODEL_VERSION, "target": self.target, "unit": self.unit,
                "form": self.form.name, "env_spec": self.env_spec.to_dict(), "kernel_spec": self.kernel_spec.to_dict(),
                "max_atoms": self.max_atoms, "ridges": list(self.ridges), **self.meta}
        arrays = {"x_train": self.x_train, "mol_train": self.mol_train.astype(np.int32),
                  "channel_scale": self.channel_scale, "l0_mean": self.l0_mean, "element_coef": self.element_coef,
                  **{f"alpha{lam}": a for lam, a in self.alphas.items()}}
        return store.save(path, TENSOR_MODEL_KIND, meta, arrays)


def load_tensor_model(path: str | Path) -> TensorModel:
    """Read a vector/tensor model file; other kinds, newer versions and unknown fields are refused with one line."""
    from eqkernels import store

    meta, arrays = store.load_model_file(path, TENSOR_MODEL_KIND, TENSOR_MODEL_VERSION,
                                         {"x_train", "mol_train", "channel_scale", "l0_mean", "element_coef"},
                                         label="tensor model")
    form_name = meta.get("form", SYMMETRIC_TENSOR.name)        # version 1 wrote tensors only, without "form"
    if form_name not in FORMS:
        raise ModelFileError(f"unknown output form {form_name!r} (this version knows {', '.join(FORMS)})", path)
    form = FORMS[form_name]
    missing = [f"alpha{lam}" for lam in form.degrees if f"alpha{lam}" not in arrays]
    if missing:
        raise ModelFileError(f"model lacks arrays {missing}", path)
    try:
        env, spec = EnvironmentSpec.from_dict(meta["env_spec"]), AtomKernelSpec.from_dict(meta["kernel_spec"])
        fixed = (meta["target"], meta["unit"], int(meta["max_atoms"]), tuple(float(r) for r in meta["ridges"]))
    except (KeyError, TypeError, ValueError, InputError) as e:
        raise ModelFileError(f"model metadata not understood by this version: {e}", path) from None
    known = {store.VERSION_KEY, "target", "unit", "form", "env_spec", "kernel_spec", "max_atoms", "ridges"}
    alphas = {lam: arrays[f"alpha{lam}"].reshape(len(arrays[f"alpha{lam}"]), 2 * lam + 1) for lam in form.degrees}
    return TensorModel(fixed[0], fixed[1], env, spec, arrays["channel_scale"], arrays["l0_mean"], arrays["x_train"],
                       arrays["mol_train"].astype(np.int64), alphas, arrays["element_coef"], fixed[2], fixed[3],
                       {k: v for k, v in meta.items() if k not in known}, form)


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
    """Fit the degree-λ NTK regressions of a vector (λ = 1) or symmetric tensor (λ = 0, 2) target.

    The ridge of each part is chosen by leave-one-out (per scalar component for λ ≥ 1), not below
    that block's measured per-atom quadrature error, unless `ridge` is given. The λ ≥ 1 blocks need a
    finer quadrature than the invariant kernel: on QM9 environments (L = 3) the equivariance error of
    tensor predictions was 6 % of their RMS at degree 7, 0.05 % at 9 (use ≥ 9).
    """
    if kernel not in EQUIVARIANT_KERNELS:
        raise InputError(f"kernel {kernel!r} is not rotation-equivariant; a vector or tensor target needs one of "
                         f"{', '.join(EQUIVARIANT_KERNELS)}")
    if ridge is not None and not ridge > 0:
        raise InputError(f"--ridge must be positive, got {ridge}")
    native = NATIVE_UNITS.get(target, "as in the data")
    unit = unit or native
    convert_target_unit(0.0, native, native, unit)
    env_spec = env_spec or EnvironmentSpec()
    kernel_spec = kernel_spec or AtomKernelSpec(kernel)
    check_molecules(train, env_spec.elements, path=train.source)
    if env_spec.element_amplitudes:      # the matrix-valued pair sum has no per-atom weights
        raise InputError("element amplitudes are not supported for vector and tensor targets")
    form, values = target_values(train, target)
    degrees = form.degrees
    coeffs = form.to_coefficients(convert_target_unit(values, native, native, unit))
    counts = train.element_counts(env_spec.elements)
    element_coef = np.zeros(0)
    if 0 in degrees:
        element_coef = np.linalg.solve(counts.T @ counts + 1e-8 * np.eye(counts.shape[1]), counts.T @ coeffs[:, 0])
    x, mol = atom_environments(env_spec, train.numbers, train.positions)
    scale = channel_scales(env_spec, x)
    l0_mean = np.mean(x[:, :, 0] * scale[None, :], axis=0)
    x = normalise_features(x, scale, l0_mean)
    mk = MoleculeKernel(kernel_spec, env_spec.l_max, progress=progress, output_degrees=degrees)
    k = mk(x, mol, len(train), description=f"training kernel ({len(train)} molecules)")["ntk"]
    # Atoms against themselves and each other: self pairs sit on ReLU's cusp, where the quadrature is
    # least accurate (pairs of different atoms alone understate the error, issue 11 item 2).
    q_error = block_quadrature_error(kernel_spec, degrees, x[:24], x[:24]) if len(x) > 2 else dict.fromkeys(degrees, 0.0)
    ridges, alphas = [], {}
    for lam in degrees:
        y = coeffs[:, form.columns(lam)]
        if lam == 0:
            y = y - (counts @ element_coef)[:, None]
        r, a = _fit_part(degree_block(k, degrees, lam), y.ravel(), ridge, ridge_floor(q_error[lam]))
        ridges.append(r)
        alphas[lam] = np.asarray(a).reshape(len(train), 2 * lam + 1)
    info = {"n_train": len(train), "train_names": list(train.names)[:5000], "data": train.source,
            "kernel_seconds": mk.last_seconds, "quadrature_error": max(q_error.values()),
            "quadrature_error_per_degree": {str(k): v for k, v in q_error.items()},
            "quadrature_reference_degree": reference_degree_for(kernel_spec.quadrature_degree), "native_unit": native,
            **(meta or {})}
    return TensorModel(target, unit, env_spec, kernel_spec, scale, l0_mean, x, mol, alphas, element_coef,
                       max_atoms or 2 * int(train.n_atoms.max()), tuple(ridges), info, form)


def tensor_errors(pred: np.ndarray, true: np.ndarray) -> dict:
    """MAE per component (xx xy yy xz yz zz), of the isotropic part and of the anisotropy, mean component MAE."""
    p, t = tensor_summary(pred), tensor_summary(true)
    per = np.mean(np.abs(p["components"] - t["components"]), axis=0)
    return {"mae_components": dict(zip(("xx", "xy", "yy", "xz", "yz", "zz"), per.tolist())),
            "mae_component_mean": float(np.mean(np.abs(pred - true))),
            "mae_isotropic": float(np.mean(np.abs(p["isotropic"] - t["isotropic"]))),
            "mae_anisotropy": float(np.mean(np.abs(p["anisotropy"] - t["anisotropy"])))}


def vector_errors(pred: np.ndarray, true: np.ndarray) -> dict:
    """MAE per component (x y z), mean component MAE and MAE of the norm."""
    p, t = vector_summary(pred), vector_summary(true)
    per = np.mean(np.abs(p["components"] - t["components"]), axis=0)
    return {"mae_components": dict(zip(("x", "y", "z"), per.tolist())),
            "mae_component_mean": float(np.mean(per)),
            "mae_norm": float(np.mean(np.abs(p["norm"] - t["norm"])))}


def target_errors(form: OutputForm, pred: np.ndarray, true: np.ndarray) -> dict:
    return vector_errors(pred, true) if form is VECTOR else tensor_errors(pred, true)


def evaluate_tensor(model: TensorModel, test: MoleculeSet, *, seed: int = 1, progress: bool | None = None) -> dict:
    """Errors on `test` and the equivariance error: predictions of rotated (translated, atom-permuted)
    copies against the rotated predictions (R v or R A Rᵀ)."""
    form, values = target_values(test, model.target)
    if form is not model.form:
        raise InputError(f"the data's {model.target!r} is a {form.name}, the model's a {model.form.name}",
                         test.source or None)
    native = model.meta.get("native_unit", NATIVE_UNITS.get(model.target, "as in the data"))
    true = convert_target_unit(values, native, native, model.unit)
    check_molecules(test, model.env_spec.elements, max_atoms=model.max_atoms)
    pred = model.predict(test, check=False, progress=progress)
    moved = transformed_copies(test, seed)
    rots = random_rotations(len(test), seed)          # the rotations transformed_copies applied (same seed)
    pred_moved = model.predict(moved, check=False, progress=progress)
    err = np.max(np.abs(pred_moved - form.rotate(rots, pred)))
    rms = float(np.sqrt(np.mean(pred ** 2))) or 1.0
    return {"n_test": len(test), **target_errors(form, pred, true),
            "mae_rotated_copies": target_errors(form, pred_moved, form.rotate(rots, true)),
            "equivariance_error_abs": float(err), "equivariance_error_rel": float(err / rms),
            "predictions": pred, "targets": true, "predictions_rotated": pred_moved, "rotations": rots}
