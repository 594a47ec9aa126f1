"""QM9 and other molecule data for the invariant-NTK pipelines: loading, units, splits, checks, features.

Load molecules (`load_molecules`: QM9 xyz, qm9pack CSV/npz, ASE databases, any ASE file), convert
units, split, refuse what a model cannot take, and scale/centre the atom-environment features
(`eqkernels.environments`) the kernels read. The rest of the molecule pipeline mirrors histology:
`molecules_model` (MoleculeModel, fit_model, load_model), `molecules_report` (evaluate, learning
curve, plot), `molecules_ensemble` (predictions from ensemble files) and `molecules_demo` (run_demo).

Targets: the energies U0, U, H, G are first turned into atomization energies with the QM9 atom
reference energies (B3LYP/6-31G(2df,p) isolated atoms, Ramakrishnan et al., Sci. Data 1, 140022
(2014); values read from the metadata of the bundled schnetpack test database), then a per-element
linear fit on the training molecules is removed; the kernel learns the rest. Predictions add both back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eqkernels.environments import EnvironmentSpec, atom_environments
from eqkernels.errors import InputError
from eqkernels.pipelines.qm9io import (NATIVE_UNITS, PROPERTY_NAMES, QM9_PROPERTIES, SYMBOLS,
                                       MoleculeSet, format_qm9_xyz, installed_qm9pack_files, load_molecules,
                                       parse_qm9_xyz, qm9pack_row_to_xyz, qm9pack_rows, read_ase_db,
                                       read_ase_file, read_qm9_tar, read_qm9_xyz_files, read_qm9pack_csv,
                                       read_qm9pack_npz)
from eqkernels.so3 import random_rotations

__all__ = ["MoleculeSet", "load_molecules", "parse_qm9_xyz", "format_qm9_xyz", "qm9pack_row_to_xyz", "qm9pack_rows",
           "read_qm9pack_csv", "read_qm9pack_npz", "read_ase_db", "read_ase_file", "read_qm9_xyz_files",
           "read_qm9_tar", "installed_qm9pack_files", "PROPERTY_NAMES", "QM9_PROPERTIES", "NATIVE_UNITS",
           "convert_units", "energy_factor", "default_unit", "atom_references", "split_indices", "check_molecules",
           "transformed_copies", "normalise_features", "Atoms", "atom_features", "default_data_path", "full_qm9_path"]

ENERGY_UNITS = ("eV", "meV", "Ha", "kcal/mol")


def default_data_path() -> Path:
    """The bundled 2,000-molecule QM9 sample (qm9pack rows)."""
    from eqkernels.datasets import QM9_SAMPLE

    return QM9_SAMPLE


def full_qm9_path() -> Path | None:
    """The full QM9 set: shared/data/qm9 beside the repository, else an installed qm9pack, else None."""
    here = Path(__file__).resolve()
    for root in [Path.cwd(), *here.parents]:
        candidate = root.parent / "shared" / "data" / "qm9"
        if (candidate / "qm9_qm9pack_compact.npz").exists() or (candidate / "qm9pack_v1.0.3").exists():
            return candidate
    return Path("qm9pack") if installed_qm9pack_files() else None


# ----------------------------------------------------------------------------------------------------------
# Units and references

def energy_factor(unit: str) -> float:
    """eV per `unit`."""
    from ase import units

    factors = {"eV": 1.0, "meV": 1e-3, "Ha": units.Hartree, "kcal/mol": units.kcal / units.mol}
    if unit not in factors:
        raise InputError(f"unknown energy unit {unit!r}; choose one of {', '.join(ENERGY_UNITS)}")
    return factors[unit]


def convert_units(values, from_unit: str, to_unit: str) -> np.ndarray:
    """Convert energies between Ha, eV, meV and kcal/mol (other units only to themselves)."""
    values = np.asarray(values, dtype=np.float64)
    if from_unit == to_unit:
        return values
    return values * (energy_factor(from_unit) / energy_factor(to_unit))


def default_unit(target: str) -> str:
    return "eV" if NATIVE_UNITS[target] == "Ha" else NATIVE_UNITS[target]


def atom_references(source: str | Path | None = None) -> dict[str, dict[int, float]]:
    """Isolated-atom reference energies (Ha) per property and atomic number, from an ASE db's metadata.

    The default source is the bundled schnetpack test database, whose `atomrefs` are QM9's
    B3LYP/6-31G(2df,p) atom energies (Ramakrishnan et al. 2014), e.g. U0: H −0.500273, C −37.846772,
    N −54.583861, O −75.064579, F −99.718730 Ha.
    """
    import ase.db

    from eqkernels.datasets import QM9_ASE_DB_SAMPLE

    source = Path(source or QM9_ASE_DB_SAMPLE)
    try:
        refs = ase.db.connect(str(source), type="db").metadata["atomrefs"]
    except Exception:
        raise InputError("no atom reference energies ('atomrefs') in the database metadata", source) from None
    by_db = {p[2]: p[0] for p in QM9_PROPERTIES}
    return {by_db[k]: {z: float(v) for z, v in enumerate(vals) if v != 0.0} for k, vals in refs.items() if k in by_db}


def split_indices(n: int, n_train: int, n_test: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random split: (train, test) index arrays, each sorted; test = the rest if n_test is None."""
    if n_train < 1 or n_train >= n:
        raise InputError(f"--n-train must be between 1 and {n - 1} for {n} molecules, got {n_train}")
    perm = np.random.default_rng(seed).permutation(n)
    rest = perm[n_train:] if n_test is None else perm[n_train:n_train + n_test]
    return np.sort(perm[:n_train]), np.sort(rest)


# ----------------------------------------------------------------------------------------------------------
# Checks on input molecules

def check_molecules(mols: MoleculeSet, elements: tuple[int, ...], *, max_atoms: int | None = None,
                    min_distance: float = 0.5, path: str | Path | None = None) -> None:
    """Refuse what a model cannot take, with one line naming the file and the problem."""
    where = path or mols.source or None
    if len(mols) == 0:
        raise InputError("no molecules in the input", where)
    known = ", ".join(SYMBOLS[e] for e in elements)
    for name, z, r in zip(mols.names, mols.numbers, mols.positions):
        if len(z) == 0:
            raise InputError(f"molecule {name}: no atoms", where)
        bad = sorted(set(int(e) for e in z) - set(elements))
        if bad:
            sym = ", ".join(SYMBOLS[e] if 0 < e < len(SYMBOLS) else f"Z={e}" for e in bad)
            raise InputError(f"molecule {name}: element {sym} is not supported (the model knows {known})", where)
        if not np.all(np.isfinite(r)):
            raise InputError(f"molecule {name}: coordinates contain NaN or infinity", where)
        if max_atoms is not None and len(z) > max_atoms:
            raise InputError(f"molecule {name}: {len(z)} atoms, more than the {max_atoms} this model supports", where)
        if len(z) > 1:
            d = np.linalg.norm(r[:, None] - r[None], axis=-1) + np.eye(len(z)) * 1e9
            i, j = np.unravel_index(np.argmin(d), d.shape)
            if d[i, j] < min_distance:
                raise InputError(f"molecule {name}: atoms {min(i, j) + 1} and {max(i, j) + 1} overlap "
                                 f"({d[i, j]:.3f} Å apart, minimum {min_distance} Å)", where)


def transformed_copies(mols: MoleculeSet, seed: int = 0, *, rotate=True, translate=True, permute=True):
    """Each molecule randomly rotated, translated and with its atoms permuted (same properties)."""
    rng = np.random.default_rng(seed)
    rots = random_rotations(len(mols), seed) if rotate else np.broadcast_to(np.eye(3), (len(mols), 3, 3))
    numbers, positions = [], []
    for k, (z, r) in enumerate(zip(mols.numbers, mols.positions)):
        order = rng.permutation(len(z)) if permute else np.arange(len(z))
        shift = rng.normal(scale=5.0, size=3) if translate else np.zeros(3)
        numbers.append(z[order])
        positions.append(r[order] @ rots[k].T + shift)
    return MoleculeSet(list(mols.names), numbers, positions, dict(mols.properties), mols.source + " (transformed)")




def normalise_features(x: np.ndarray, scale: np.ndarray, l0_mean: np.ndarray) -> np.ndarray:
    """Scale channels and centre their degree-0 coefficients; both commute with rotations."""
    x = np.asarray(x, np.float64) * scale[None, :, None]
    x[:, :, 0] -= l0_mean[None, :]
    return x.astype(np.float32)


@dataclass
class Atoms:
    """Flat atom signals (A, C, M) of N molecules, atoms sorted by molecule."""

    x: np.ndarray
    mol: np.ndarray
    n: int


def atom_features(env: EnvironmentSpec, mols: MoleculeSet, scale: np.ndarray, l0_mean: np.ndarray) -> Atoms:
    """The molecules' atom environments, scaled and degree-0-centred (`normalise_features`)."""
    x, mol = atom_environments(env, mols.numbers, mols.positions)
    return Atoms(normalise_features(x, scale, l0_mean), mol, len(mols))
