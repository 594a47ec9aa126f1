"""Are qm9pack's polarizability tensors in the frame of its coordinates? A symmetry check on planar molecules.

A planar molecule has a mirror plane, so its plane normal n (from the coordinates) must be an eigenvector
of its polarizability tensor A, whatever the chemistry. Reported: the angle between n and the nearest
eigenvector of A. Within the plane, the axis of largest polarizability of a planar molecule normally
follows its long axis; reported too: the angle between the two for molecules whose normal is aligned
(< 2°) and whose in-plane anisotropy is clear (eigenvalue gap > 10 %).
    python benchmarks/polarizability_frame.py --out benchmarks/results/polarizability_frame.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def _angle(u, v) -> float:
    return float(np.degrees(np.arccos(min(1.0, abs(float(u @ v))))))


def frame_angles(positions, tensors) -> tuple[np.ndarray, np.ndarray]:
    """(normal angles of all planar molecules, in-plane main-axis angles of the aligned, clearly anisotropic ones)."""
    normal, in_plane = [], []
    for r, a in zip(positions, tensors):
        if len(r) < 4:
            continue
        _, s, vt = np.linalg.svd(r - r.mean(0))
        if s[2] >= 1e-3 * s[0]:
            continue
        n = vt[2]
        _, vecs = np.linalg.eigh(a)
        normal.append(min(_angle(n, v) for v in vecs.T))
        p = np.eye(3) - np.outer(n, n)
        w, v = np.linalg.eigh(p @ a @ p)
        if normal[-1] < 2 and w[-1] - w[-2] > 0.1 * w[-1]:
            in_plane.append(_angle(v[:, -1], vt[0]))
    return np.array(normal), np.array(in_plane)


def main(argv=None) -> dict:
    from eqkernels.pipelines.molecules import full_qm9_path, load_molecules
    from eqkernels.pipelines.qm9io import tensor_values

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="QM9 data with the polarizability beside it (default: shared/data/qm9)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    mols = load_molecules(args.data or full_qm9_path())
    normal, in_plane = frame_angles(mols.positions, tensor_values(mols, "polarizability"))
    result = {"data": mols.source, "n_planar": len(normal),
              "normal_angle_deg": {"median": float(np.median(normal)), "p90": float(np.percentile(normal, 90)),
                                   "max": float(normal.max()), "fraction_below_1": float(np.mean(normal < 1)),
                                   "fraction_below_0.1": float(np.mean(normal < 0.1))},
              "n_in_plane": len(in_plane),
              "in_plane_angle_deg": {"quartiles": np.percentile(in_plane, [25, 50, 75]).tolist(),
                                     "fraction_below_10": float(np.mean(in_plane < 10)),
                                     "uniform_reference_quartiles": [22.5, 45.0, 67.5]}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
