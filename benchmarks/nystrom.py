"""Benchmark: Nyström-preconditioned CG (`eqkernels.nystrom`) beside exact kernel ridge regression.

    python benchmarks/nystrom.py --out benchmarks/results/nystrom.json [--parts molecules,histology,memory]

Parts (each writes its rows into the JSON as soon as it has them, so a run cut short keeps what it finished):

- `molecules`: QM9 U0 (meV) on the fixed split of `benchmarks/molecules.py` (seed-0 permutation of all
  130,831 molecules; the first N are the training set, the test set is the first `n_test` of the next
  2,000; same environments, targets, per-element linear fit and ridge floor). Inducing molecules: the
  first M of the training set in permutation order, which is a uniform random M-subset of every
  training set (and lets every N share one N×M kernel). Exact: ridge by leave-one-out on all N (as
  `benchmarks/molecules.py`); Nyström: ridge by leave-one-out on the M-molecule subproblem (as
  `eqk molecules train --inducing`), then CG on all N. Kernels are computed once for the largest
  sizes and sliced; `kernel_seconds` of a row is its pairs divided by the pair rate measured in this
  run, `solve_seconds` and the tracemalloc peak of the solve are measured per row.
- `histology`: `eqk histology train` (the pipeline's `train_model`, `cnn`, ridge 1e-6) exact and with
  `--inducing M` on Kather 2016 (5,000 real 8 px tiles) and the 718 PathMNIST test tiles (16 px);
  accuracy on held-out tiles, wall time, CG iterations and residual.
- `memory`: peak resident memory (ru_maxrss, fresh process) and tracemalloc peak of `train_model`
  with N = 10,000 and M = 2,000: the 5,000 Kather 8 px tiles and their mirror images, the one-layer
  `cnn` (the cheapest image kernel; the solver's memory does not depend on the kernel), against a
  smaller N = 2,500, M = 500 in the same way, and the N×N bytes the exact fit would need.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp_
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from molecules import BENCH_ENV, machine_info  # noqa: E402  (same split, features and machine record)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KATHER = SHARED / "histology" / "kather2016_chmnist_8x8" / "hmnist_8_8_RGB.csv"
PATHMNIST = SHARED / "histology" / "pathmnist_test_subset718" / "pathmnist.npz"


def _timed_solve(fn):
    """(result, seconds, tracemalloc peak MiB) of fn()."""
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    tracemalloc.stop()
    return out, seconds, peak


# ------------------------------------------------------------------------------------------- molecules
def _molecule_setup(n_pool: int, n_test: int):
    from eqkernels.environments import EnvironmentSpec, atom_environments, channel_scales
    from eqkernels.pipelines import molecules as mp

    mols = mp.load_molecules(mp.full_qm9_path())
    perm = np.random.default_rng(0).permutation(len(mols))
    pool, test_idx = perm[:n_pool], np.sort(perm[4000:4000 + 2000])[:n_test]
    env = EnvironmentSpec(**BENCH_ENV)
    counts = mols.element_counts(env.elements)
    refs = mp.atom_references()["U0"]
    y = mp.convert_units(mols.properties["U0"] - counts @ np.array([refs[z] for z in env.elements]), "Ha", "meV")
    src = mols.subset(pool[:100])
    x0, _ = atom_environments(env, src.numbers, src.positions)
    scale = channel_scales(env, x0)

    def feats(idx):
        sub = mols.subset(idx)
        x, mol = atom_environments(env, sub.numbers, sub.positions)
        return (x * scale[None, :, None]).astype(np.float32), mol

    return {"env": env, "pool": pool, "test": test_idx, "counts": counts, "y": y, "feats": feats,
            "n_molecules": len(mols), "mp": mp}


def _kernel_block(kernel, a, b, stats):
    """NTK between feature sets a = (x, mol, n) and b (None: symmetric), timing the pairs."""
    start = time.perf_counter()
    out = kernel(a[0], a[1], a[2]) if b is None else kernel(a[0], a[1], a[2], b[0], b[1], b[2])
    stats["seconds"] += time.perf_counter() - start
    stats["pairs"] += a[2] * (a[2] + 1) / 2 if b is None else a[2] * b[2]
    return out["ntk"]


def _slice(feats, first, last):
    x, mol = feats
    keep = (mol >= first) & (mol < last)
    return x[keep], mol[keep] - first, last - first


def molecule_curve(name: str, *, n_test: int, m: int, exact_sizes, nystrom_sizes, quadrature: int | None,
                   record) -> None:
    """Rows of the U0 learning curve for one kernel (see the module docstring); `record(row)` stores each."""
    from eqkernels.molecule_kernel import MoleculeKernel
    from eqkernels.nystrom import falkon_solve
    from eqkernels.so3 import DEFAULT_QUADRATURE_DEGREE, AtomKernelSpec, quadrature_error
    from eqkernels.pipelines.molecules_model import error_sample, ridge_floor
    from eqkernels.solvers import select_ridge_loo

    n_max, n_exact = max(nystrom_sizes + exact_sizes), max(exact_sizes + [m])
    s = _molecule_setup(n_max, n_test)
    pool, test_idx, y, counts = s["pool"], s["test"], s["y"], s["counts"]
    spec = AtomKernelSpec(name, quadrature_degree=quadrature or DEFAULT_QUADRATURE_DEGREE)
    kernel = MoleculeKernel(spec, s["env"].l_max, progress=False)
    fp, ft = s["feats"](pool), s["feats"](test_idx)
    floor = ridge_floor(quadrature_error(spec, error_sample(*fp)))
    stats = {"seconds": 0.0, "pairs": 0.0}
    te = (ft[0], ft[1], len(test_idx))
    k_exact = _kernel_block(kernel, _slice(fp, 0, n_exact), None, stats)          # (n_exact, n_exact)
    k_test = _kernel_block(kernel, te, _slice(fp, 0, n_exact), stats)              # (n_test, n_exact)
    rest = [_kernel_block(kernel, _slice(fp, a, min(a + 1000, n_max)), _slice(fp, 0, m), stats)
            for a in range(n_exact, n_max, 1000)]
    k_nm_all = np.concatenate([k_exact[:, :m]] + rest)                              # (n_max, M)
    rate = stats["pairs"] / stats["seconds"]
    y_test = y[test_idx]

    def row(solver, n, pred, coef_info, solve_s, peak, pairs, extra):
        err = pred - y_test
        return {"kernel": name, "solver": solver, "n_train": n, "n_test": len(test_idx), **extra,
                "mae_meV": float(np.mean(np.abs(err))), "rmse_meV": float(np.sqrt(np.mean(err ** 2))),
                **coef_info, "solve_seconds": solve_s, "solve_tracemalloc_peak_MiB": peak, "kernel_pairs": pairs,
                "kernel_seconds_at_measured_rate": pairs / rate, "molecule_pairs_per_s": rate,
                "quadrature_degree": spec.quadrature_degree if name != "mlp" else None}

    for n in sorted(set(exact_sizes) | set(nystrom_sizes)):
        tr = pool[:n]
        coef = np.linalg.lstsq(counts[tr], y[tr], rcond=None)[0]
        resid, base = y[tr] - counts[tr] @ coef, counts[test_idx] @ coef
        if n in exact_sizes:
            (ridge, loo, alpha), secs, peak = _timed_solve(
                lambda: select_ridge_loo(k_exact[:n, :n], resid, min_ridge=floor))
            record(row("exact", n, base + k_test[:, :n] @ alpha, {"ridge": ridge}, secs, peak,
                       n * (n + 1) / 2 + len(test_idx) * n, {}))
        if n in nystrom_sizes:
            k_nm, k_mm = k_nm_all[:n], k_nm_all[:m]

            def solve():
                ridge = select_ridge_loo(k_mm, resid[:m], min_ridge=floor)[0]
                return falkon_solve(k_nm, k_mm, resid, ridge=ridge)

            sol, secs, peak = _timed_solve(solve)
            pairs = n * m + len(test_idx) * m  # the pipeline computes K_NM whole; K_MM is its rows
            record(row("nystrom", n, base + k_test[:, :m] @ sol.coef, sol.info(), secs, peak, pairs, {"inducing": m}))


# ------------------------------------------------------------------------------------------- histology
def histology_pair(path: Path, size: int, n_train: int, n_test: int, inducing: list, record, label: str) -> None:
    """Exact and Nyström `train_model` on one data set; accuracy on `n_test` held-out tiles."""
    from eqkernels.kernels import KernelSpec
    from eqkernels.pipelines.histology import load_tiles, stratified_split
    from eqkernels.pipelines.histology_model import train_model

    tiles = load_tiles(path)
    train_idx, test_idx = stratified_split(tiles.labels, n_train, n_test, seed=0)
    for choice in ["exact"] + list(inducing):
        start = time.perf_counter()
        model, timings = train_model(KernelSpec("cnn"), tiles.subset(train_idx), size=size, progress=False,
                                     options={"seed": 0}, inducing=choice)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        pred = model.predict(tiles.images[test_idx], progress=False)
        solver = model.options["solver"]
        record({"data": label, "kernel": "cnn", "size": size, "n_train": len(train_idx), "n_test": len(test_idx),
                "solver": solver["solver"], "inducing": solver["inducing"],
                "accuracy": float(np.mean(pred.classes == tiles.labels[test_idx])),
                "fit_seconds": fit_s, **timings, "predict_seconds": time.perf_counter() - start,
                **{k: solver.get(k) for k in ("cg_iterations", "cg_residual", "cg_tolerance", "cg_converged")},
                "mean_nngp_variance": float(np.mean(pred.variance))})


# ---------------------------------------------------------------------------------------------- memory
def _memory_worker(n: int, m: int, queue) -> None:
    from eqkernels.kernels import ConvNetSpec, KernelSpec
    from eqkernels.pipelines.histology import TileSet, load_tiles
    from eqkernels.pipelines.histology_model import train_model

    tiles = load_tiles(KATHER)
    order = np.random.default_rng(0).permutation(2 * len(tiles))[:n]       # the CSV is sorted by class
    images = np.concatenate([tiles.images, tiles.images[:, :, ::-1]])[order]   # tiles and their mirror images
    labels = np.concatenate([tiles.labels, tiles.labels])[order]
    train = TileSet(images, labels, tiles.class_names, [f"t{i}" for i in range(n)])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    start = time.perf_counter()
    model, timings = train_model(KernelSpec("cnn", ConvNetSpec(depth=1)), train, size=8, progress=False,
                                 options={"seed": 0}, inducing=m)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    solver = model.options["solver"]
    queue.put({"n_train": n, "inducing": m, "kernel": "cnn, depth 1, 8 px", "fit_seconds": seconds, **timings,
               "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "rss_before_fit_MiB": base_rss, "tracemalloc_peak_MiB": peak,
               "n_by_m_float64_MiB": n * m * 8 / 2 ** 20, "exact_n_by_n_kernels_MiB": 3 * n * n * 8 / 2 ** 20,
               **{k: solver.get(k) for k in ("cg_iterations", "cg_residual", "cg_converged")}})


def memory_point(n: int, m: int) -> dict:
    ctx = mp_.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_worker, args=(n, m, queue))
    proc.start()
    while proc.is_alive() or not queue.empty():   # a worker that dies must not hang the run
        try:
            return queue.get(timeout=5)
        except Exception:
            continue
    return {"n_train": n, "inducing": m, "error": f"worker exited with code {proc.exitcode}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--parts", default="molecules,histology,memory")
    parser.add_argument("--mlp", default="250,500,1000/500/500,1000,2000,4000",
                        help="exact sizes / M / Nyström sizes for mlp")
    parser.add_argument("--so3avg", default="100,200/100/100,200,500,1000",
                        help="exact sizes / M / Nyström sizes for mlp-so3avg")
    parser.add_argument("--n-test-mlp", type=int, default=1000)
    parser.add_argument("--n-test-so3avg", type=int, default=200)
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = {"machine": machine_info(), "shared_machine": "2 cores shared with four other sessions",
               "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "molecules": [], "histology": [],
               "memory": [], "notes": []}
    start = time.perf_counter()

    def record(section):
        def put(row):
            results[section].append(row)
            results["seconds"] = time.perf_counter() - start
            out.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(row), flush=True)
        return put

    parts = args.parts.split(",")
    if "molecules" in parts:
        for name, spec, n_test in (("mlp", args.mlp, args.n_test_mlp), ("mlp-so3avg", args.so3avg, args.n_test_so3avg)):
            if not spec:
                continue
            exact, m, nys = spec.split("/")
            molecule_curve(name, n_test=n_test, m=int(m), exact_sizes=[int(v) for v in exact.split(",")],
                           nystrom_sizes=[int(v) for v in nys.split(",")], quadrature=None, record=record("molecules"))
    if "histology" in parts:
        histology_pair(KATHER, 8, 2000, 1000, [500], record("histology"), "Kather 2016 (hmnist 8×8 RGB)")
        histology_pair(PATHMNIST, 16, 500, 218, [125], record("histology"), "PathMNIST test subset (718)")
    if "memory" in parts:
        for n, m in ((2500, 500), (10000, 2000)):
            record("memory")(memory_point(n, m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
