"""Molecule deep ensembles as files: what `eqk compare --task molecules` saves beside the parameters
(features and baseline), and predictions (meV) from such a file (`eqk molecules predict`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eqkernels.environments import EnvironmentSpec
from eqkernels.errors import ModelFileError
from eqkernels.molecule_ensembles import MoleculeEnsemble
from eqkernels.pipelines.molecules import atom_features, check_molecules

TARGET, UNIT = "U0", "meV"


@dataclass
class EnsembleFile:
    """A molecule ensemble with what a prediction needs beside its parameters (`ensemble_meta`)."""

    ensemble: MoleculeEnsemble
    meta: dict
    arrays: dict[str, np.ndarray]

    def save(self, path: str | Path) -> Path:
        return self.ensemble.save(path, self.meta, self.arrays)


def ensemble_meta(inputs) -> tuple[dict, dict[str, np.ndarray]]:
    """What a prediction from a saved ensemble needs besides the parameters: features and baseline."""
    meta = {"target": TARGET, "unit": UNIT, "env_spec": inputs.env_spec.to_dict(), "y_scale": inputs.y_scale,
            "atomrefs": {str(k): v for k, v in inputs.atomrefs.items()}, "max_atoms": 2 * inputs.max_train_atoms,
            "source": "eqk compare --task molecules"}
    arrays = {"channel_scale": np.asarray(inputs.channel_scale), "l0_mean": np.asarray(inputs.l0_mean),
              "element_coef": np.asarray(inputs.element_coef)}
    return meta, arrays


def ensemble_file_info(path: str | Path) -> tuple[str, str, tuple, int]:
    """(target, unit, elements the environments know, largest molecule accepted) of an ensemble file."""
    _, meta, _ = MoleculeEnsemble.load(path)
    try:
        env = EnvironmentSpec.from_dict(meta["env_spec"])
        return str(meta["target"]), str(meta["unit"]), tuple(env.elements), int(meta.get("max_atoms", 10 ** 6))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"ensemble file lacks the molecule preprocessing ({type(e).__name__}: {e})", path) from None


def predict_with_ensemble(path: str | Path, mols) -> np.ndarray:
    """Ensemble-mean prediction (meV) of the target for molecules, from a file written by `write_report`."""
    ens, meta, arrays = MoleculeEnsemble.load(path)
    try:
        env = EnvironmentSpec.from_dict(meta["env_spec"])
        refs = np.array([meta["atomrefs"][str(z)] for z in env.elements])
        scale, l0, coef, y_scale = arrays["channel_scale"], arrays["l0_mean"], arrays["element_coef"], meta["y_scale"]
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"ensemble file lacks the molecule preprocessing ({type(e).__name__}: {e})", path) from None
    check_molecules(mols, env.elements, max_atoms=int(meta.get("max_atoms", 10 ** 6)))
    atoms = atom_features(env, mols, scale, l0)
    counts = mols.element_counts(env.elements)
    return counts @ (refs + coef) + ens.mean(atoms.x, atoms.mol, atoms.n) * y_scale
