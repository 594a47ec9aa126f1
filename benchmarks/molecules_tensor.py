"""Benchmark: the QM9 polarizability tensor with the equivariant NTK against two non-equivariant baselines.

Split: seed-0 permutation of all 130,831 qm9pack molecules (as benchmarks/molecules.py); training set the
first N of it, test set the `--n-test` molecules after the first 1,000. Models (all on the same atom
environments, L = 3, 12 Gaussian radial channels):

- `equivariant`: `mlp-so3avg` λ = 0 ⊕ 2 blocks (`eqkernels.pipelines.molecules_tensor`);
- `fixed-frame`: the invariant `mlp-so3avg` kernel (λ = 0 block) predicting the six components in each
  molecule's principal-axes frame (`qm9io.principal_axes`, the frame qm9pack's tensors come in), rotated back;
- `mlp-augmented`: the non-invariant `mlp` kernel predicting the six components, trained on `--augment`
  randomly rotated copies of each training molecule (tensors rotated with them);
- `isotropic-oracle` (reference, no training): the true isotropic part and no anisotropy.

MAE in bohr³ per component, of the isotropic part and of the anisotropy, on the test set as stored and on
randomly rotated copies (tensors rotated). Usage:
    python benchmarks/molecules_tensor.py --sizes 100 1000 --n-test 300 --out benchmarks/results/molecules_tensor.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _cpu_flags() -> list[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return sorted(have & {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"})
    return []


def _principal_frames(mols) -> np.ndarray:
    """(N, 3, 3) rotations F with rows the principal axes of each molecule (`qm9io.principal_axes`): the frame
    qm9pack's tensors come in, so the fixed-frame baseline gets the data's own frame."""
    from eqkernels.pipelines.qm9io import principal_axes

    return np.array([principal_axes(z, r) for z, r in zip(mols.numbers, mols.positions)])


def _in_frame(mols, frames):
    from eqkernels.pipelines.qm9io import MoleculeSet

    pos = [r @ f.T for r, f in zip(mols.positions, frames)]
    return MoleculeSet(list(mols.names), list(mols.numbers), pos, dict(mols.properties), mols.source, {})


def _scalar_fit(kernel_name, degree, train, y, test_sets):
    """Six independent kernel regressions (ridge by leave-one-out each); predictions (n, 6) per test set."""
    from eqkernels.environments import EnvironmentSpec, atom_environments, channel_scales
    from eqkernels.molecule_kernel import MoleculeKernel
    from eqkernels.pipelines.molecules import normalise_features
    from eqkernels.solvers import select_ridge_loo
    from eqkernels.so3 import AtomKernelSpec

    env = EnvironmentSpec()
    x, mol = atom_environments(env, train.numbers, train.positions)
    scale = channel_scales(env, x)
    l0 = np.mean(x[:, :, 0] * scale[None], axis=0)
    x = normalise_features(x, scale, l0)
    mk = MoleculeKernel(AtomKernelSpec(kernel_name, quadrature_degree=degree), env.l_max, progress=False)
    k = mk(x, mol, len(train))["ntk"]
    counts = train.element_counts(env.elements)
    coef = np.linalg.lstsq(counts, y, rcond=None)[0]
    alphas = np.stack([select_ridge_loo(k, y[:, c] - counts @ coef[:, c], min_ridge=1e-5)[2] for c in range(6)], 1)
    out = []
    for t in test_sets:
        xt, mt = atom_environments(env, t.numbers, t.positions)
        kt = mk(normalise_features(xt, scale, l0), mt, len(t), x, mol, len(train))["ntk"]
        out.append(t.element_counts(env.elements) @ coef + kt @ alphas)
    return out


def _use_gyration_tensor(mols) -> None:
    """Replace the polarizability by the gyration tensor of the coordinates (in place): a target that is
    certainly in the coordinates' frame, to tell the model's ability from the data's frame problem."""
    from eqkernels.pipelines.qm9io import tensor_property_names

    g = np.array([(r - r.mean(0)).T @ (r - r.mean(0)) for r in mols.positions])
    for key, (i, j) in zip(tensor_property_names("polarizability"), ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2))):
        mols.properties[key] = g[:, i, j]


def _six_to_tensor(six):
    xx, xy, yy, xz, yz, zz = six.T
    return np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2)


def _run_size(name, n, mols, perm, test, moved, degree, augment):
    from eqkernels.pipelines.molecules import transformed_copies
    from eqkernels.pipelines.molecules_tensor import fit_tensor_model, target_tensors, tensor_summary
    from eqkernels.so3 import AtomKernelSpec, random_rotations

    train = mols.subset(perm[:n])
    t0 = time.perf_counter()
    if name == "isotropic-oracle":     # reference, no model: the true isotropic part, no anisotropy
        return [tensor_summary(a)["isotropic"][:, None, None] * np.eye(3)
                for a in (target_tensors(test, "polarizability"), target_tensors(moved, "polarizability"))], 0.0
    if name == "equivariant":
        model = fit_tensor_model(train, kernel_spec=AtomKernelSpec("mlp-so3avg", quadrature_degree=degree),
                                 progress=False)
        return [model.predict(s, check=False, progress=False) for s in (test, moved)], time.perf_counter() - t0
    a = target_tensors(train, "polarizability")
    if name == "fixed-frame":
        f_train = _principal_frames(train)
        y = tensor_summary(np.einsum("nij,njk,nlk->nil", f_train, a, f_train))["components"]
        frames = [_principal_frames(s) for s in (test, moved)]
        preds = _scalar_fit("mlp-so3avg", degree, _in_frame(train, f_train), y,
                            [_in_frame(s, f) for s, f in zip((test, moved), frames)])
        out = [np.einsum("nji,njk,nkl->nil", f, _six_to_tensor(p), f) for p, f in zip(preds, frames)]
        return out, time.perf_counter() - t0
    copies = [transformed_copies(train, seed=100 + k, translate=False, permute=False) for k in range(augment)]
    rot = [random_rotations(n, 100 + k) for k in range(augment)]   # the rotations transformed_copies applied
    big = copies[0]
    for c in copies[1:]:
        big = type(big)(big.names + c.names, big.numbers + c.numbers, big.positions + c.positions,
                        {k: np.concatenate([v, c.properties[k]]) for k, v in big.properties.items()}, big.source, {})
    y = tensor_summary(np.concatenate([np.einsum("nij,njk,nlk->nil", r, a, r) for r in rot]))["components"]
    preds = _scalar_fit("mlp", degree, big, y, [test, moved])
    return [_six_to_tensor(p) for p in preds], time.perf_counter() - t0


def main(argv=None) -> dict:
    from molecules import machine_info

    from eqkernels.pipelines.molecules import full_qm9_path, load_molecules, transformed_copies
    from eqkernels.pipelines.molecules_tensor import target_tensors, tensor_errors
    from eqkernels.so3 import random_rotations

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--models", nargs="+", default=["equivariant", "fixed-frame", "mlp-augmented"])
    p.add_argument("--quadrature", type=int, default=9)
    p.add_argument("--augment", type=int, default=8)
    p.add_argument("--target", choices=("polarizability", "gyration"), default="polarizability",
                   help="gyration: a control tensor in the coordinates' own frame, Σ_i (r_i − r̄)(r_i − r̄)ᵀ (Å²)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    mols = load_molecules(full_qm9_path())
    if args.target == "gyration":
        _use_gyration_tensor(mols)
    perm = np.random.default_rng(0).permutation(len(mols))
    test = mols.subset(perm[1000:1000 + args.n_test])
    moved = transformed_copies(test, seed=1)
    rots = random_rotations(len(test), 1)                       # the rotations transformed_copies applied
    truth = target_tensors(test, "polarizability")
    truth_moved = np.einsum("nij,njk,nlk->nil", rots, truth, rots)
    results = {"target": args.target, "unit": "a0^3" if args.target == "polarizability" else "Å^2", "machine": {**machine_info(), "cpu_flags": _cpu_flags(),
               "note": "2 cores shared with four other sessions: times are indicative only"},
               "split": {"seed": 0, "train": "first N of the seed-0 permutation",
                         "test": f"permutation[1000:{1000 + args.n_test}]"},
               "quadrature_degree": args.quadrature, "augment": args.augment, "rows": []}
    for n in args.sizes:
        for name in args.models:
            (pred, pred_moved), seconds = _run_size(name, n, mols, perm, test, moved, args.quadrature,
                                                    args.augment)
            row = {"model": name, "n_train": n, "n_test": len(test), "seconds": seconds,
                   **tensor_errors(pred, truth), "rotated_copies": tensor_errors(pred_moved, truth_moved)}
            results["rows"].append(row)
            print(json.dumps({k: row[k] for k in ("model", "n_train", "mae_component_mean", "mae_isotropic",
                                                  "mae_anisotropy", "seconds")}), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")   # after every row: a partial run keeps its rows
    return results


if __name__ == "__main__":
    main()
