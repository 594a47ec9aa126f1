"""Benchmark: eqkernels molecule NTKs against FCHL19 KRR (qmllib) and local-SOAP KRR (dscribe), same split, same run.

    python benchmarks/molecules_peers.py --out benchmarks/results/molecules_peers.json \
        [--sizes 100,1000] [--targets U0,homo,lumo,gap,mu] [--models fchl19,soap,mlp,mlp-so3avg] \
        [--n-test 2000] [--quadrature 7] [--specs tuned.json] [--budget-minutes 70]

Split (as benchmarks/molecules.py): seed-0 permutation of all 130,831 qm9pack molecules; the first 4,000
are the nested training pool (N = 100 is the first 100), the next `--n-test` (2,000) the test set.
Targets: U0 (meV) minus the QM9 atom references; HOMO, LUMO, gap (meV); dipole-moment norm mu (D).
Every model regresses the same residual: the target minus a linear fit on the N training molecules,
on element counts for the extensive U0 (kernel summed over atom pairs) and on element fractions for
the intensive targets (kernel averaged over atom pairs, K / (n n'): `eqkernels.tuning.atom_mean_kernel`;
the same for the peers' local kernels).
Hyperparameters by 5-fold cross-validation on the N training molecules only (`eqkernels.tuning`):
FCHL19 kernel width σ; SOAP r_cut / n_max / l_max and the local-kernel power ζ; eqkernels NTK or NNGP;
the ridge for all. The test kernel is computed only for the chosen setting; test MAE only for it.
Each model family runs in a fresh process (peak resident memory of that process). Results are written
after every family, so a run cut short keeps what it finished.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp_
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from molecules import BENCH_ENV, machine_info  # noqa: E402  (benchmarks/molecules.py: machine facts, environment)

POOL = 4000
TARGETS = {"U0": ("meV", "sum"), "homo": ("meV", "mean"), "lumo": ("meV", "mean"), "gap": ("meV", "mean"),
           "mu": ("D", "mean")}
FCHL_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
SOAP_GRID = ((4.0, 6, 4), (5.0, 8, 4), (5.0, 8, 6))  # (r_cut Å, n_max, l_max)
SOAP_ZETAS = (1, 2, 4, 8, 16)
RIDGES = tuple(float(f"{r:.3g}") for r in 10.0 ** np.arange(-9, 0.25, 0.5))
N_MOVED = 100  # test molecules whose rotated copies measure the eqkernels predictions' invariance


def load_split(n_test: int):
    """(molecules, pool indices (POOL,) in permutation order, test indices (n_test,), targets {name: (n,)})."""
    from eqkernels.pipelines import molecules as mp

    mols = mp.load_molecules(mp.full_qm9_path())
    perm = np.random.default_rng(0).permutation(len(mols))
    pool, test = perm[:POOL], perm[POOL:POOL + n_test]
    elements = (1, 6, 7, 8, 9)
    counts = mols.element_counts(elements)
    refs = mp.atom_references()["U0"]
    y = {"U0": mp.convert_units(mols.properties["U0"] - counts @ np.array([refs[z] for z in elements]), "Ha", "meV")}
    for name in ("homo", "lumo", "gap"):
        y[name] = mp.convert_units(mols.properties[name], "Ha", "meV")
    y["mu"] = np.asarray(mols.properties["mu"], np.float64)
    return mols, pool, test, y, counts


def evaluate_target(k_train_by_label, k_test_fn, y, counts, tr, te, reduction, min_ridge=0.0, k_moved_fn=None):
    """CV choice over the candidate training kernels, then test MAE of the chosen one.

    k_train_by_label: {label: K (N, N) already reduced}; k_test_fn(label) → K (n_test, N) reduced;
    k_moved_fn(label) → K (m, N) reduced of the first m test molecules moved (rotated, translated, permuted):
    adds 'invariance_error' = max |Δ learned part| / rms(learned part on the test set).
    """
    from eqkernels.pipelines.molecules_model import baseline_inputs
    from eqkernels.solvers import solve_ridge_eigh
    from eqkernels.tuning import select_by_cv

    feats = baseline_inputs(counts, reduction)
    coef = np.linalg.lstsq(feats[tr], y[tr], rcond=None)[0]
    resid = y[tr] - feats[tr] @ coef
    t0 = time.perf_counter()
    choice = select_by_cv(k_train_by_label, resid, [r for r in RIDGES if r >= min_ridge])
    cv_seconds = time.perf_counter() - t0
    alpha = solve_ridge_eigh(k_train_by_label[choice["name"]], resid, choice["ridge"])
    t0 = time.perf_counter()
    k_test = k_test_fn(choice["name"])
    test_seconds = time.perf_counter() - t0
    err = feats[te] @ coef + k_test @ alpha - y[te]
    best_per_label = {k: min(v.values()) for k, v in choice["scores"].items()}
    extra = {}
    if k_moved_fn is not None:
        learned = k_test @ alpha
        change = k_moved_fn(choice["name"]) @ alpha - learned[:N_MOVED]
        extra = {"invariance_error": float(np.max(np.abs(change)) / np.sqrt(np.mean(learned ** 2))),
                 "invariance_max_change": float(np.max(np.abs(change))), "invariance_molecules": len(change)}
    return {**extra, "chosen": choice["name"], "ridge": choice["ridge"], "cv_mae": choice["cv_mae"],
            "cv_mae_per_candidate": best_per_label, "mae": float(np.mean(np.abs(err))),
            "rmse": float(np.sqrt(np.mean(err ** 2))),
            "linear_only_mae": float(np.mean(np.abs(feats[te] @ coef - y[te]))),
            "cv_seconds": cv_seconds, "test_kernel_seconds": test_seconds}


def reduce(k, reduction, n1, n2):
    from eqkernels.tuning import reduce_kernel

    return reduce_kernel(k, reduction, n1, n2)


# ------------------------------------------------------------------------------------------------- families

def _membership(n_atoms: np.ndarray):
    """Sparse (molecules × atoms) indicator of atoms sorted by molecule."""
    import scipy.sparse

    mol = np.repeat(np.arange(len(n_atoms)), n_atoms)
    return scipy.sparse.csr_matrix((np.ones(len(mol)), (mol, np.arange(len(mol)))), shape=(len(n_atoms), len(mol)))


def soap_features(mols, idx, r_cut, n_max, l_max):
    """Unit-normalised local SOAP vectors of every atom of the molecules `idx`, (n_atoms, D), sorted by molecule."""
    import ase
    from dscribe.descriptors import SOAP

    soap = SOAP(species=[1, 6, 7, 8, 9], r_cut=r_cut, n_max=n_max, l_max=l_max, periodic=False)
    p = np.concatenate([soap.create(ase.Atoms(numbers=mols.numbers[i], positions=mols.positions[i])) for i in idx])
    return p / np.linalg.norm(p, axis=1, keepdims=True)


def soap_sum_kernels(p1, n1, p2, n2, zetas, chunk=4000):
    """{ζ: Σ_{i∈A, j∈B} (p_i·p_j)^ζ} (N1, N2) for atom vectors sorted by molecule, atom rows in chunks."""
    s2 = _membership(n2)
    out = {z: np.zeros((len(n1), len(n2))) for z in zetas}
    mol1 = np.repeat(np.arange(len(n1)), n1)
    for start in range(0, len(p1), chunk):
        g = p1[start:start + chunk] @ p2.T
        rows = mol1[start:start + chunk]
        s1 = _membership(np.bincount(rows - rows[0]))
        for z in zetas:
            out[z][rows[0]:rows[-1] + 1] += s1 @ (s2 @ (g ** z).T).T
    return out


def family_soap(mols, pool, test, sizes):
    n_all = mols.n_atoms
    nmax = max(sizes)
    tr_idx = pool[:nmax]
    train = {}
    feats = {}
    for setting in SOAP_GRID:
        feats[setting] = soap_features(mols, tr_idx, *setting)
        for z, k in soap_sum_kernels(feats[setting], n_all[tr_idx], feats[setting], n_all[tr_idx], SOAP_ZETAS).items():
            train[f"r_cut={setting[0]:g},n_max={setting[1]},l_max={setting[2]},zeta={z}"] = k

    def test_kernel(label):
        parts = dict(p.split("=") for p in label.split(","))
        setting = (float(parts["r_cut"]), int(parts["n_max"]), int(parts["l_max"]))
        pt = soap_features(mols, test, *setting)
        return soap_sum_kernels(pt, n_all[test], feats[setting], n_all[tr_idx], (int(parts["zeta"]),))[int(parts["zeta"])]
    return train, test_kernel


def family_fchl19(mols, pool, test, sizes):
    """FCHL19 local kernels for every σ of the grid in one pass each (qmllib's *_kernels: the pair loop is
    shared, so the whole grid costs about one σ; equal to the one-σ routines to 3e-16, checked)."""
    from qmllib.kernels import get_local_kernels, get_local_symmetric_kernels
    from qmllib.representations import generate_fchl19

    nmax = max(sizes)
    tr_idx = pool[:nmax]
    pad = int(mols.n_atoms.max())

    def rep(idx):
        return (np.array([generate_fchl19(mols.numbers[i], mols.positions[i], elements=[1, 6, 7, 8, 9], pad=pad)
                          for i in idx]), [np.asarray(mols.numbers[i]) for i in idx])
    x_tr, q_tr = rep(tr_idx)
    labels = [f"sigma={s:g}" for s in FCHL_SIGMAS]
    train = dict(zip(labels, get_local_symmetric_kernels(x_tr, q_tr, list(FCHL_SIGMAS))))
    test_all = {}

    def test_kernel(label):
        if not test_all:
            x_te, q_te = rep(test)
            test_all.update(zip(labels, get_local_kernels(x_tr, x_te, q_tr, q_te, list(FCHL_SIGMAS))))
        k = test_all[label]                                 # qmllib returns (N2, N1)
        assert k.shape == (len(test), len(tr_idx)), k.shape
        return k
    return train, test_kernel


def featuriser(mols, env, scale_idx):
    """idx → (x (n_atoms, C, M) float32, molecule index): atom environments with the channel scales and degree-0
    centring of the molecules `scale_idx` (training molecules), as `pipelines.molecules_model.training_features`."""
    from eqkernels.environments import atom_environments
    from eqkernels.pipelines import molecules as mp
    from eqkernels.pipelines import molecules_model as mm

    _, _, scale, l0_mean = mm.training_features(mols.subset(scale_idx), env)

    def feats(idx):
        sub = idx if hasattr(idx, "numbers") else mols.subset(idx)   # indices into `mols`, or a MoleculeSet
        x, mol = atom_environments(env, sub.numbers, sub.positions)
        return mp.normalise_features(x, scale, l0_mean), mol
    return feats


def family_eqkernels(mols, pool, test, sizes, spec_dict, env_dict, quadrature):
    """Molecule NTK and NNGP of one eqkernels per-atom kernel on the pool's first max(sizes) and the test set.

    Also returns moved(label): the kernel rows of the first `N_MOVED` test molecules rotated, translated and
    permuted (`transformed_copies`), so the benchmark reports how far the fitted predictions move.
    """
    from eqkernels.environments import EnvironmentSpec, atom_amplitudes
    from eqkernels.molecule_kernel import MoleculeKernel
    from eqkernels.pipelines import molecules_model as mm
    from eqkernels.pipelines.molecules import transformed_copies
    from eqkernels.so3 import AtomKernelSpec, quadrature_error

    env = EnvironmentSpec(**{**BENCH_ENV, **env_dict})
    spec = AtomKernelSpec(**{"quadrature_degree": quadrature, **spec_dict})
    tr_idx = pool[:max(sizes)]
    feats = featuriser(mols, env, pool[:min(sizes)])  # channel scales and centring from the smallest training set

    def side(idx):
        sub = idx if hasattr(idx, "numbers") else mols.subset(idx)
        x, m = feats(sub)
        return x, m, len(sub), atom_amplitudes(env, sub.numbers)   # amplitudes 0 leave atoms out (c_H = 0)

    kernel = MoleculeKernel(spec, env.l_max, progress=False)
    x_tr, m_tr, n_tr, w_tr = side(tr_idx)
    t0 = time.perf_counter()
    train = kernel(x_tr, m_tr, n_tr, weight1=w_tr)
    rate = len(tr_idx) ** 2 / 2 / (time.perf_counter() - t0)
    cache, moved_cache = {}, {}

    def test_kernel(label):
        if not cache:
            x_te, m_te, n_te, w_te = side(test)
            cache.update(kernel(x_te, m_te, n_te, x_tr, m_tr, n_tr, weight1=w_te, weight2=w_tr))
        return cache[label]

    def moved(label):
        if not moved_cache:
            x_mv, m_mv, n_mv, w_mv = side(transformed_copies(mols.subset(test[:N_MOVED]), seed=1))
            moved_cache.update(kernel(x_mv, m_mv, n_mv, x_tr, m_tr, n_tr, weight1=w_mv, weight2=w_tr))
        return moved_cache[label]
    # The ridge: CV above the float32 floor, as `fit_model`'s leave-one-out (`molecules_model.RIDGE_FLOOR`);
    # the quadrature error is recorded, and the predictions' motion under rotation is measured instead.
    q_error = quadrature_error(spec, mm.error_sample(x_tr, m_tr)) if spec.invariant else 0.0
    info = {"spec": spec.to_dict(), "env": env.to_dict(), "train_pairs_per_s": rate, "quadrature_error": q_error,
            "min_ridge": mm.RIDGE_FLOOR}
    return {"ntk": train["ntk"], "nngp": train["nngp"]}, test_kernel, info, moved


def run_family(family: str, args: dict, queue) -> None:
    """One model family in its own process: rows per (N, target), its peak memory and seconds."""
    start = time.perf_counter()
    mols, pool, test, y, counts = load_split(args["n_test"])
    sizes = args["sizes"]
    info, moved_fn = {}, None
    if family == "fchl19":
        train, test_fn = family_fchl19(mols, pool, test, sizes)
    elif family == "soap":
        train, test_fn = family_soap(mols, pool, test, sizes)
    else:
        spec = args["specs"][family]
        train, test_fn, info, moved_fn = family_eqkernels(mols, pool, test, sizes, spec["kernel_spec"], spec.get("env", {}),
                                                args["quadrature"])
    train_seconds = time.perf_counter() - start
    nmax = max(sizes)
    n_atoms = mols.n_atoms
    test_cache = {}
    rows = []
    for n in sizes:
        tr = pool[:n]
        for target in args["targets"]:
            unit, reduction = TARGETS[target]
            k_tr = {lab: reduce(k[:n, :n], reduction, n_atoms[tr], n_atoms[tr]) for lab, k in train.items()}

            def k_test(label):
                if label not in test_cache:
                    test_cache[label] = test_fn(label)
                return reduce(test_cache[label][:, :n], reduction, n_atoms[test], n_atoms[tr])

            def k_moved(label):
                return reduce(moved_fn(label)[:, :n], reduction, n_atoms[test[:N_MOVED]], n_atoms[tr])
            row = {"model": family, "n_train": n, "n_test": len(test), "target": target, "unit": unit,
                   "reduction": reduction, **evaluate_target(k_tr, k_test, y[target], counts, tr, test, reduction,
                                                             info.get("min_ridge", 0.0),
                                                             k_moved if moved_fn is not None else None)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    queue.put({"rows": rows, "info": info, "seconds": time.perf_counter() - start,
               "train_kernels_seconds": train_seconds, "n_train_max": nmax,
               "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_tune(kernel: str, args: dict, queue) -> None:
    """`pipelines/molecules_tune.tune` for U0 on the pool's first `tune_n` molecules (training molecules only)."""
    from eqkernels.pipelines.molecules_tune import tune
    from eqkernels.so3 import AtomKernelSpec

    mols, pool, _, _, _ = load_split(1)
    result = tune(mols.subset(pool[:args["tune_n"]]), "U0", kernel, budget_seconds=args["tune_budget"], unit="meV",
                  spec=AtomKernelSpec(kernel, quadrature_degree=args["quadrature"]), progress=False)
    env, spec = result["env"].to_dict(), result["kernel_spec"].to_dict()
    for d in (env, spec):
        d.pop("spec_version")
    queue.put({"kernel_spec": spec, "env": env, "trials": result["trials"], "cv_mae": result["cv_mae"],
               "seconds": result["seconds"], "n_train": args["tune_n"],
               "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def in_child(target, *args):
    """Run target(*args, queue) in a fresh spawned process and return what it put on the queue."""
    ctx = mp_.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    got = queue.get()
    proc.join()
    return got


def plot(results: dict, path: Path) -> None:
    """Log-log learning curves, one panel per target, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in results["mae"]}, key=list(TARGETS).index)
    fig, axes = plt.subplots(1, len(targets), figsize=(3.4 * len(targets), 3.2), dpi=110, squeeze=False)
    for ax, target in zip(axes[0], targets):
        for model in results["models"]:
            rows = sorted((r for r in results["mae"] if r["model"] == model and r["target"] == target),
                          key=lambda r: r["n_train"])
            if rows:
                ax.loglog([r["n_train"] for r in rows], [r["mae"] for r in rows], "o-", label=model)
        unit = TARGETS[target][0]
        ax.set_title(target)
        ax.set_xlabel("training molecules")
        ax.set_ylabel(f"test MAE ({unit})")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--models", default="fchl19,soap,mlp,mlp-so3avg")
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--quadrature", type=int, default=7, help="SO(3) quadrature degree (a speed option below 17)")
    parser.add_argument("--specs", default=None, help="JSON {label: {'kernel_spec': {...}, 'env': {...}}} of extra "
                        "eqkernels models (e.g. the setting chosen by `pipelines/molecules_tune.py`)")
    parser.add_argument("--plot", default=None, help="PNG of the learning curves (default: beside --out)")
    parser.add_argument("--budget-minutes", type=float, default=70.0)
    parser.add_argument("--tune", default="", help="eqkernels kernels to tune first (comma-separated): adds "
                        "'<kernel>-tuned', chosen by `pipelines/molecules_tune.py` on U0 of the first --tune-n "
                        "training molecules")
    parser.add_argument("--tune-n", type=int, default=500)
    parser.add_argument("--tune-budget", type=float, default=600.0, help="seconds per tuned kernel")
    parser.add_argument("--merge", default=None, help="add the families of another run's JSON (same split and "
                        "settings, e.g. run concurrently) to --out's, computing nothing, and redraw the plot")
    return parser.parse_args(argv)


def merge(out: Path, other: Path, plot_path: Path) -> int:
    """--out's results plus the families of `other` (refused unless split, grids and degree agree)."""
    results, extra = json.loads(out.read_text()), json.loads(other.read_text())
    for key in ("split", "grids", "quadrature_degree", "targets"):
        if results[key] != extra[key]:
            print(f"{other}: {key} differs from {out}'s; not merged", file=sys.stderr)
            return 2
    for model in extra["models"]:
        results["models"].append(model)
        results["families"][model] = extra["families"][model]
        results["mae"].extend(r for r in extra["mae"] if r["model"] == model)
    results["tuning"].update(extra.get("tuning", {}))
    results["merged_runs"] = results.get("merged_runs", []) + [{"file": str(other), "models": extra["models"],
                                                                "seconds": extra["seconds"],
                                                                "load_average": extra.get("load_average")}]
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, plot_path)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    plot_path = Path(args.plot) if args.plot else out.with_suffix(".png")
    if args.merge:
        return merge(out, Path(args.merge), plot_path)
    specs = {name: {"kernel_spec": {"name": name}} for name in ("mlp", "mlp-so3avg", "so3gcnn")}
    if args.specs:
        specs.update(json.loads(Path(args.specs).read_text()))  # a 'tuning' entry: how the setting was chosen
    models = [m for m in args.models.split(",") if m]
    tuned = [k for k in args.tune.split(",") if k]
    unknown = [m for m in models if m not in specs and m not in ("fchl19", "soap") and m[:-6] not in tuned]
    if unknown:
        print(f"{args.specs or 'molecules_peers'}: unknown models {unknown}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    shared = {"n_test": args.n_test, "sizes": sorted(int(s) for s in args.sizes.split(",")),
              "targets": [t for t in args.targets.split(",") if t], "specs": specs, "quadrature": args.quadrature}
    results = {"machine": machine_info(), "split": {"seed": 0, "pool": POOL, "n_test": args.n_test,
                                                "train": "first N of the seed-0 permutation",
                                                "test": f"permutation[{POOL}:{POOL + args.n_test}]"},
               "targets": {t: {"unit": TARGETS[t][0], "reduction": TARGETS[t][1]} for t in shared["targets"]},
               "grids": {"fchl19_sigma": FCHL_SIGMAS, "soap_r_cut_n_max_l_max": SOAP_GRID, "soap_zeta": SOAP_ZETAS,
                         "ridges": RIDGES, "eqkernels": ["ntk", "nngp"], "cv": "5-fold on the training set"},
               "quadrature_degree": args.quadrature, "models": [], "families": {}, "mae": [], "not_done": [],
               "load_average": [os.getloadavg()[0]]}

    def save():
        results["seconds"] = time.perf_counter() - start
        out.write_text(json.dumps(results, indent=2) + "\n")

    results["tuning"] = {label: {**spec["tuning"], "from": args.specs} for label, spec in specs.items() if "tuning" in spec}
    for kernel in tuned:
        got = in_child(run_tune, kernel, {**shared, "tune_n": args.tune_n, "tune_budget": args.tune_budget})
        results["tuning"][kernel] = got
        specs[f"{kernel}-tuned"] = {"kernel_spec": got["kernel_spec"], "env": got["env"]}
        if f"{kernel}-tuned" not in models:
            models.append(f"{kernel}-tuned")
        save()
    for model in models:
        if time.perf_counter() - start > 60 * args.budget_minutes:
            results["not_done"].append(f"{model}: time budget spent")
            save()
            continue
        got = in_child(run_family, model, shared)
        results["models"].append(model)
        results["mae"].extend(got.pop("rows"))
        results["families"][model] = got
        results["load_average"].append(os.getloadavg()[0])  # the machine is shared: load after each family
        save()
    plot(results, plot_path)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
