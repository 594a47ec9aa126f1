"""Benchmark: QM9 U0 with the three molecule NTKs on a fixed random split of the full QM9 set.

    python benchmarks/molecules.py --out results.json [--budget-minutes 90] [--sizes 100,1000,4000]

Split: seed 0 permutation of all 130,831 qm9pack molecules; the first 4,000 are the training pool
(N = 100 uses the first 100 of them, N = 1,000 the first 1,000: nested), the next 2,000 the test set.
Target: U0 (meV) minus the QM9 atom reference energies and a per-element linear fit on the N training
molecules. Ridge by leave-one-out on the training set, not below the kernel's numerical precision
(`ridge_floor`: 1e-6, or the measured SO(3) quadrature error). Results are written after every step, so a run cut short keeps what it finished.
Also measured: molecule pairs per second and peak resident memory of each kernel (in a fresh process),
and the invariance error of the predictions on 100 randomly rotated / translated / permuted test molecules.
Reference figures on such a split (MAE, meV, N = 100 / 1,000 / 4,000): Coulomb-matrix Laplacian KRR
809 / 520 / 350; local-SOAP sum-kernel KRR 421 / 172 / 84.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp_
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

KERNELS = ("mlp", "mlp-so3avg", "so3gcnn")


def machine_info() -> dict:
    """CPU model, cores, Python, platform, jax backend and library versions of this machine (for results files)."""
    import jax

    from eqkernels.store import library_versions

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "jax_backend": jax.default_backend(), "versions": library_versions()}


def _throughput_worker(name: str, degree: int, queue) -> None:
    from eqkernels.environments import EnvironmentSpec, atom_environments, channel_scales
    from eqkernels.molecule_kernel import MoleculeKernel
    from eqkernels.pipelines import molecules as mp
    from eqkernels.so3 import AtomKernelSpec

    mols = mp.load_molecules(mp.default_data_path()).subset(np.arange(120))
    env = EnvironmentSpec(**BENCH_ENV)
    x, mol = atom_environments(env, mols.numbers, mols.positions)
    x = (x * channel_scales(env, x)[None, :, None]).astype(np.float32)
    kernel = MoleculeKernel(AtomKernelSpec(name, quadrature_degree=degree), env.l_max, progress=False)
    kernel(x[:200], mol[:200], int(mol[199]) + 1)  # compile
    start = time.perf_counter()
    kernel(x, mol, len(mols), x, mol, len(mols))
    seconds = time.perf_counter() - start
    queue.put({"molecule_pairs_per_s": len(mols) ** 2 / seconds, "atom_pairs_per_s": len(x) ** 2 / seconds,
               "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def throughput(name: str, degree: int) -> dict:
    """Full 120×120 molecule kernel (non-symmetric path) in a fresh process: rate and peak memory."""
    ctx = mp_.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_throughput_worker, args=(name, degree, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


BENCH_ENV = {"radial": "gaussian", "n_radial": 12, "cutoff": 4.0}


def _arguments(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", default=None, help="full QM9 (default: ../shared/data/qm9 or installed qm9pack)")
    parser.add_argument("--sizes", default="100,1000,4000")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--quadrature", type=int, default=None, help="SO(3) quadrature degree (default: the library's)")
    parser.add_argument("--budget-minutes", type=float, default=120.0)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    from eqkernels.so3 import DEFAULT_QUADRATURE_DEGREE

    args.quadrature = args.quadrature or DEFAULT_QUADRATURE_DEGREE
    return args


def _split(args, mols, sizes: list[int], results: dict) -> dict:
    """The fixed split and its features: {'pool', 'test_idx', 'n_moved', 'y_all', 'counts_all', features (x, mol)
    of the test, moved-test and pool molecules, 'atoms_before' (atoms of the first k pool molecules)}."""
    from eqkernels.environments import EnvironmentSpec, atom_environments, channel_scales
    from eqkernels.pipelines import molecules as mp

    _, test_idx = mp.split_indices(len(mols), max(sizes), args.n_test, seed=0)
    perm = np.random.default_rng(0).permutation(len(mols))
    pool = perm[:max(sizes)]  # in permutation order, so the first N are the N-molecule training set
    results["split"] = {"data": str(args.data_path), "n_molecules": len(mols), "seed": 0, "n_test": len(test_idx),
                        "train": "first N of the seed-0 permutation", "test": "next 2,000 of it"}
    env = EnvironmentSpec(**BENCH_ENV)
    counts_all = mols.element_counts(env.elements)
    # U0 minus the QM9 atom reference energies (atomization energy), then minus a per-element linear fit
    # on the training molecules. The references change nothing for elements the training set has (the
    # fit absorbs them) but keep an element absent from a small training set (F at N = 100) from
    # costing its whole atomic energy (~2.7·10⁶ meV for F) in the test predictions.
    refs = mp.atom_references()["U0"]
    y_all = mp.convert_units(mols.properties["U0"] - counts_all @ np.array([refs[z] for z in env.elements]),
                             "Ha", "meV")
    test = mols.subset(test_idx)
    n_moved = min(100, len(test_idx))
    moved = mp.transformed_copies(test.subset(np.arange(n_moved)), seed=1)
    scale_src = mols.subset(pool[:min(sizes)])
    x0, _ = atom_environments(env, scale_src.numbers, scale_src.positions)
    scale = channel_scales(env, x0)

    def feats(sub):
        x, mol = atom_environments(env, sub.numbers, sub.positions)
        return (x * scale[None, :, None]).astype(np.float32), mol

    return {"pool": pool, "test_idx": test_idx, "n_moved": n_moved, "y_all": y_all, "counts_all": counts_all,
            "l_max": env.l_max, "test": feats(test), "moved": feats(moved), "pool_x": feats(mols.subset(pool)),
            "atoms_before": np.concatenate([[0], np.cumsum(mols.n_atoms[pool])])}


def _kernel_states(kernels: list[str], quadrature: int, d: dict) -> dict:
    """Per kernel: the molecule kernel, its measured quadrature error and the kernel columns done so far."""
    from eqkernels.molecule_kernel import MoleculeKernel
    from eqkernels.pipelines.molecules_model import error_sample
    from eqkernels.so3 import AtomKernelSpec, quadrature_error

    state = {name: {"kernel": MoleculeKernel(AtomKernelSpec(name, quadrature_degree=quadrature), d["l_max"],
                                           progress=False), "test": [], "move": [], "done": 0, "stopped": False}
             for name in kernels}
    x_pool, m_pool = d["pool_x"]
    for name in kernels:
        # measured on self pairs and rotated copies of whole pool molecules (`so3.quadrature_errors`)
        state[name]["quadrature_error"] = quadrature_error(state[name]["kernel"].spec, error_sample(x_pool, m_pool))
    return state


def _extend_kernels(st: dict, n: int, d: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train × train, test × train, moved × train) kernels at N = n, adding only the new training columns."""
    kernel, done = st["kernel"], st["done"]
    (x_te, m_te), (x_mv, m_mv), (x_pool, m_pool) = d["test"], d["moved"], d["pool_x"]
    atoms_before = d["atoms_before"]
    new = slice(atoms_before[done], atoms_before[n])
    xs, ms = x_pool[new], m_pool[new] - done
    st["test"].append(kernel(x_te, m_te, len(d["test_idx"]), xs, ms, n - done)["ntk"])
    st["move"].append(kernel(x_mv, m_mv, d["n_moved"], xs, ms, n - done)["ntk"])
    k_train = kernel(x_pool[:atoms_before[n]], m_pool[:atoms_before[n]], n)["ntk"]
    st["done"] = n
    return k_train, np.concatenate(st["test"], 1), np.concatenate(st["move"], 1)


def _fit_row(name: str, n: int, st: dict, d: dict, kernels: tuple, kernel_seconds: float) -> dict:
    """Ridge (leave-one-out above the ridge floor) at N = n and the row of test figures."""
    from eqkernels.pipelines.molecules_model import ridge_floor
    from eqkernels.solvers import select_ridge_loo

    k_train, k_test, k_move = kernels
    counts_all, y_all, test_idx, n_moved = d["counts_all"], d["y_all"], d["test_idx"], d["n_moved"]
    tr = d["pool"][:n]
    coef = np.linalg.lstsq(counts_all[tr], y_all[tr], rcond=None)[0]
    resid_tr = y_all[tr] - counts_all[tr] @ coef
    ridge, loo, alpha = select_ridge_loo(k_train, resid_tr, min_ridge=ridge_floor(st["quadrature_error"]))
    pred = counts_all[test_idx] @ coef + k_test @ alpha
    err = pred - y_all[test_idx]
    pred_mv = counts_all[test_idx[:n_moved]] @ coef + k_move @ alpha
    learned = k_test[:n_moved] @ alpha
    row = {"kernel": name, "n_train": n, "n_test": len(test_idx), "mae_meV": float(np.mean(np.abs(err))),
           "rmse_meV": float(np.sqrt(np.mean(err ** 2))), "ridge": ridge, "loo_mae_meV": loo,
           "mae_transformed_meV_first100": float(np.mean(np.abs(pred_mv - y_all[test_idx[:n_moved]]))),
           "mae_same_first100_meV": float(np.mean(np.abs(err[:n_moved]))),
           "invariance_error_max_meV": float(np.max(np.abs(pred_mv - pred[:n_moved]))),
           "invariance_error_rel": float(np.max(np.abs(pred_mv - pred[:n_moved])) /
                                         max(np.sqrt(np.mean(learned ** 2)), 1e-300)),
           "linear_fit_only_mae_meV": float(np.mean(np.abs(counts_all[test_idx] @ coef - y_all[test_idx]))),
           "dual_l1_meV": float(np.sum(np.abs(alpha))), "kernel_seconds": kernel_seconds}
    row["quadrature_error_per_atom_ntk"] = st["quadrature_error"]
    row["max_abs_error_meV"] = float(np.max(np.abs(err)))
    return row


def _new_results(args) -> dict:
    return {"machine": machine_info(), "split": {}, "environment": BENCH_ENV, "quadrature_degree": args.quadrature,
            "throughput": {}, "mae": [], "reference_mae_meV": {
                "coulomb_matrix_laplacian_krr": {"100": 809, "1000": 520, "4000": 350},
                "local_soap_sum_kernel_krr": {"100": 421, "1000": 172, "4000": 84},
                "entk_authors_so3_demo": {"10": 3341}}, "not_done": []}


def _run_sizes(args, kernels: list[str], sizes: list[int], d: dict, results: dict, deadline: float, save) -> None:
    """Sizes outer, kernels inner: every kernel gets N = 100 and 1,000 before any gets 4,000."""
    state = _kernel_states(kernels, args.quadrature, d)
    for n in sizes:
        for name in kernels:
            st = state[name]
            if st["stopped"]:
                continue
            est = (results["throughput"].get(name, {}).get("molecule_pairs_per_s") or 1e4)
            need = (n * n / 2 + (n - st["done"]) * (len(d["test_idx"]) + d["n_moved"])) / est * 1.3
            if time.perf_counter() + need > deadline:
                results["not_done"].append(f"{name} N={n}: estimated {need / 60:.0f} min exceeds the time budget")
                st["stopped"] = True
                save()
                continue
            t0 = time.perf_counter()
            blocks = _extend_kernels(st, n, d)
            row = _fit_row(name, n, st, d, blocks, time.perf_counter() - t0)
            results["mae"].append(row)
            print(json.dumps(row), flush=True)
            save()


def main(argv=None) -> int:
    args = _arguments(argv)
    from eqkernels.pipelines import molecules as mp

    start = time.perf_counter()
    deadline = start + 60 * args.budget_minutes
    out = Path(args.out)
    results = _new_results(args)

    def save():
        results["seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(results, indent=2) + "\n")

    kernels = [k for k in args.kernels.split(",") if k]
    if not args.skip_throughput:
        for name in kernels:
            results["throughput"][name] = throughput(name, args.quadrature)
            print(name, results["throughput"][name], flush=True)
            save()
    args.data_path = args.data or mp.full_qm9_path()
    if args.data_path is None:
        results["not_done"].append("full QM9 not found (../shared/data/qm9 or pip install qm9pack)")
        save()
        return 1
    mols = mp.load_molecules(args.data_path)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    d = _split(args, mols, sizes, results)
    save()
    _run_sizes(args, kernels, sizes, d, results, deadline, save)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
