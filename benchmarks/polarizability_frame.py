"""In which frame are qm9pack's polarizability tensors? Symmetry and bond-additivity checks, file frame vs principal axes.

Two readings of the same file are compared: the tensors as given, taken to be in the frame of the QM9
coordinates, and the tensors taken to be in each molecule's principal-axes frame (Gaussian's standard
orientation, `eqkernels.pipelines.qm9io.principal_axes`) and rotated into the coordinates (what
`load_molecules` does). Checks:

- symmetry: a planar molecule has a mirror plane, so its plane normal n (from the coordinates) must be an
  eigenvector of its tensor A whatever the chemistry; reported is the angle between n and the nearest
  eigenvector (only the axis order of the frame matters here, not the axis signs);
- bond additivity: the traceless part of A fitted by least squares as a sum over bonds of
  c_type (b bᵀ − I/3) (b the unit bond vector, one c per element pair); R² of that fit. A tensor in the
  wrong frame cannot be fitted by anything built from the coordinates;
- sign classes: the axis signs of a principal frame are not in the file. The four π-rotations about the
  axes give four candidate tensors; how often the third-moment sign rule picks the one the bond fit prefers
  (among molecules where the fit prefers one clearly: error ratio > 2).
    python benchmarks/polarizability_frame.py --out benchmarks/results/polarizability_frame.json [--n-bond 6000]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

COVALENT_RADIUS = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}      # Å (Cordero et al. 2008)
SIGN_CLASSES = [np.diag(s) for s in ([1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1])]


def _angle(u, v) -> float:
    return float(np.degrees(np.arccos(min(1.0, abs(float(u @ v))))))


def normal_angles(positions, tensors) -> np.ndarray:
    """Angle (degrees) between the plane normal and the nearest eigenvector, for the planar molecules (≥ 4 atoms)."""
    out = []
    for r, a in zip(positions, tensors):
        if len(r) < 4:
            continue
        _, s, vt = np.linalg.svd(r - r.mean(0))
        if s[2] < 1e-3 * s[0]:
            out.append(min(_angle(vt[2], v) for v in np.linalg.eigh(a)[1].T))
    return np.array(out)


def _traceless(a):
    return a - np.trace(a) / 3 * np.eye(3)


def bond_designs(numbers, positions) -> list[dict]:
    """Per molecule {element pair: Σ_bonds (b bᵀ − I/3)}; a bond is a pair closer than 1.2 × the covalent radii."""
    out = []
    for z, r in zip(numbers, positions):
        d = {}
        for i in range(len(z)):
            for j in range(i + 1, len(z)):
                v = r[j] - r[i]
                length = np.linalg.norm(v)
                if length < 1.2 * (COVALENT_RADIUS[int(z[i])] + COVALENT_RADIUS[int(z[j])]):
                    key = tuple(sorted((int(z[i]), int(z[j]))))
                    d[key] = d.get(key, 0) + np.outer(v, v) / length ** 2 - np.eye(3) / 3
        out.append(d)
    return out


def bond_fit(designs, tensors) -> tuple[float, np.ndarray, list]:
    """(R² of the traceless tensors, coefficients, keys) of the least-squares bond-additivity fit."""
    keys = sorted({k for d in designs for k in d})
    x = np.concatenate([np.stack([d.get(k, np.zeros((3, 3))).ravel() for k in keys], 1) for d in designs])
    y = np.concatenate([_traceless(a).ravel() for a in tensors])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    res = y - x @ coef
    return float(1 - res @ res / (y @ y)), coef, keys


def sign_rule_agreement(mols, raw, designs) -> dict:
    """How often the third-moment sign rule picks the sign class that the bond fit prefers clearly."""
    from eqkernels.pipelines.qm9io import principal_axes

    frames = [principal_axes(z, r) for z, r in zip(mols.numbers, mols.positions)]
    rotated = [f.T @ a @ f for f, a in zip(frames, raw)]
    _, coef, keys = bond_fit(designs, rotated)
    picked, clear = [], []
    for f, a, d in zip(frames, raw, designs):
        pred = sum(c * d.get(k, np.zeros((3, 3))) for c, k in zip(coef, keys))
        err = np.array([np.sum((_traceless(f.T @ s @ a @ s @ f) - pred) ** 2) for s in SIGN_CLASSES])
        order = np.sort(err)
        clear.append(order[1] > 2 * order[0])
        picked.append(int(np.argmin(err)) == 0)        # class 0: the signs principal_axes chose
    picked, clear = np.array(picked), np.array(clear)
    return {"n_clear": int(clear.sum()), "rule_agrees": float(picked[clear].mean()), "chance": 0.25}


def main(argv=None) -> dict:
    from eqkernels.pipelines.molecules import full_qm9_path
    from eqkernels.pipelines.qm9io import load_molecules, polarizability_file_beside, read_tensor_csv, tensor_values

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="QM9 data with the polarizability beside it (default: shared/data/qm9)")
    p.add_argument("--n-bond", type=int, default=6000, help="molecules (first of the file) for the bond fit")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    path = args.data or full_qm9_path()
    mols = load_molecules(path)
    idx, raw_all = read_tensor_csv(polarizability_file_beside(path))
    row = {int(g): k for k, g in enumerate(idx)}
    raw = raw_all[[row[int(g)] for g in mols.extras["gdb_index"]]]
    loaded = tensor_values(mols, "polarizability")
    result = {"data": mols.source, "readings": {}}
    head = mols.subset(np.arange(args.n_bond))
    designs = bond_designs(head.numbers, head.positions)
    for name, t in (("as given, coordinate frame", raw), ("principal axes, rotated into the coordinates", loaded)):
        normal = normal_angles(mols.positions, t)
        result["readings"][name] = {
            "n_planar": len(normal),
            "normal_angle_deg": {"median": float(np.median(normal)), "p90": float(np.percentile(normal, 90)),
                                 "p99": float(np.percentile(normal, 99)), "max": float(normal.max()),
                                 "fraction_below_0.1": float(np.mean(normal < 0.1))},
            "bond_fit_r2": bond_fit(designs, t[:args.n_bond])[0]}
    result["n_bond_fit"] = args.n_bond
    result["sign_rule"] = sign_rule_agreement(head, raw[:args.n_bond], designs)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
