"""Exploration (issue 16): variants of the heavy-atom molecule NTK on QM9 U0, each scored by CV and on the test set.

    python benchmarks/u0_variants.py '{"variant": "plain", "spec": {"quadrature_degree": 11}}'
    python benchmarks/u0_variants.py '{"variant": "element_pairs", "spec": {"quadrature_degree": 11}}'
    python benchmarks/u0_variants.py '{"variant": "normalised", "p": 1.0}'

Split and features as benchmarks/molecules_peers.py (training = the first `n_train` of the seed-0 permutation,
test = permutation[4000:4000 + n_test], channel scales from the first 100); U0 (meV) minus the linear fit on
element counts; only heavy atoms' environments are summed (H stay neighbours). Variants:
- plain: K(A, B) = Σ k(x_i, x_j); 5-fold CV MAE and test MAE at every ridge of molecules_peers.RIDGES (no
  floor: shows where the old quadrature floor sat), then the NTK/NNGP mix a·NTK/s + (1−a)·NNGP/s'.
- element_pairs: W_ab-weighted sums Σ W_{Z_i Z_j} k (W = 1, δ, (1 − w)δ + w), ridge by CV.
- normalised: amplitudes c_i = k(x_i, x_i)^(−p/2) (the per-atom kernel normalised for p = 1).
Kernels are cached in $EQK_EXPLORE_CACHE (default /tmp/eqk-explore-u0), keyed by the JSON config; one
line of results per run is appended to benchmarks/explore_u0/<variant>.jsonl (the figures benchmarks/README.md
cites; the 2-core machine was shared, so seconds are indicative only).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from element_pairs import ELEMENTS, combine, element_blocks  # noqa: E402
from molecules import BENCH_ENV  # noqa: E402
from molecules_peers import RIDGES, featuriser, load_split  # noqa: E402

CACHE = Path(os.environ.get("EQK_EXPLORE_CACHE", "/tmp/eqk-explore-u0"))
RESULTS = Path(__file__).resolve().parent / "explore_u0"


def kernels(cfg, mols, pool, test):
    """{ntk, nngp, ntk_te, nngp_te}: training (N, N) and test (n_test, N) kernels ((N, E, N, E) blocks for
    element_pairs), computed once per config and cached."""
    from eqkernels.environments import EnvironmentSpec
    from eqkernels.molecule_kernel import MoleculeKernel
    from eqkernels.so3 import AtomKernel, AtomKernelSpec

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / (hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12] + ".npz")
    if path.exists():
        return dict(np.load(path))
    env = EnvironmentSpec(**{**BENCH_ENV, **cfg.get("env", {})})
    spec = AtomKernelSpec(**{"name": "mlp-so3avg", "quadrature_degree": 7, **cfg.get("spec", {})})
    feats, atom_kernel = featuriser(mols, env, pool[:100]), AtomKernel(spec, env.l_max)
    mk = MoleculeKernel(spec, env.l_max, progress=False)

    def side(idx):
        x, m = feats(idx)
        heavy = np.concatenate([mols.numbers[i] for i in idx]) != 1
        x, m = x[heavy], m[heavy]
        nums = [np.asarray(mols.numbers[i])[np.asarray(mols.numbers[i]) != 1] for i in idx]
        w = None
        if cfg["variant"] == "normalised":
            diag = np.concatenate([np.diagonal(atom_kernel(x[s:s + 64], x[s:s + 64])["nngp"])
                                   for s in range(0, len(x), 64)])
            w = diag ** (-cfg.get("p", 1.0) / 2)
        return x, m, nums, len(idx), w

    def pair(a, b=None):
        """K(a, b) (b=None: K(a, a)) of sides (x, mol, numbers, N, amplitudes)."""
        if cfg["variant"] == "element_pairs":
            return element_blocks(mk, a[:4], None if b is None else b[:4])
        if b is None:
            return mk(a[0], a[1], a[3], weight1=a[4])
        return mk(a[0], a[1], a[3], b[0], b[1], b[3], weight1=a[4], weight2=b[4])

    t0 = time.perf_counter()
    train = side(pool[:cfg.get("n_train", 1000)])
    k_tr = pair(train)
    t1 = time.perf_counter()
    k_te = pair(side(test), train)
    out = {"ntk": k_tr["ntk"], "nngp": k_tr["nngp"], "ntk_te": k_te["ntk"], "nngp_te": k_te["nngp"],
           "seconds": np.array([t1 - t0, time.perf_counter() - t1])}
    np.savez(path, **out)
    return out


def scores(k, k_te, resid, base_te, y_te, ridges):
    """(CV MAE per ridge, test MAE per ridge) of KRR on the residual."""
    from eqkernels.solvers import solve_ridge_eigh
    from eqkernels.tuning import kfold_ridge_mae

    cv = kfold_ridge_mae(k, resid, ridges)
    test = [float(np.mean(np.abs(base_te + k_te @ solve_ridge_eigh(k, resid, r) - y_te))) for r in ridges]
    return cv, np.array(test)


def main(argv=None) -> int:
    from eqkernels.pipelines.molecules_model import baseline_inputs

    cfg = json.loads((argv or sys.argv[1:])[0])
    cfg.setdefault("variant", "plain")
    mols, pool, test, y, counts = load_split(cfg.get("n_test", 1000))
    d = kernels(cfg, mols, pool, test)
    feats = baseline_inputs(counts, "sum")
    e = len(ELEMENTS)
    weights = {"all": np.ones((e, e)), "same": np.eye(e),
               **{f"cross={w}": (1 - w) * np.eye(e) + w for w in (0.1, 0.3, 0.6)}}
    result = {"cfg": cfg, "kernel_seconds": d["seconds"].tolist(), "rows": []}
    for n in cfg.get("sizes", [100, 1000]):
        tr = pool[:n]
        coef = np.linalg.lstsq(feats[tr], y["U0"][tr], rcond=None)[0]
        resid, base_te = y["U0"][tr] - feats[tr] @ coef, feats[test] @ coef
        cands = {}
        for out in ("ntk", "nngp"):
            if cfg["variant"] == "element_pairs":
                for label, w in weights.items():
                    cands[f"{label},{out}"] = (combine(d[out][:n, :, :n], w), combine(d[out + "_te"][:, :, :n], w))
            else:
                cands[out] = (d[out][:n, :n], d[out + "_te"][:, :n])
        if cfg["variant"] == "plain":
            s_ntk, s_nngp = (float(np.mean(np.diag(d[o][:n, :n]))) for o in ("ntk", "nngp"))
            for a in (0.25, 0.5, 0.75):
                cands[f"mix a={a}"] = (a * d["ntk"][:n, :n] / s_ntk + (1 - a) * d["nngp"][:n, :n] / s_nngp,
                                       a * d["ntk_te"][:, :n] / s_ntk + (1 - a) * d["nngp_te"][:, :n] / s_nngp)
        for label, (k, k_te) in cands.items():
            ridges = list(RIDGES) if cfg["variant"] == "plain" else [r for r in RIDGES if 1e-7 <= r <= 1e-2]
            cv, tst = scores(np.asarray(k, np.float64), np.asarray(k_te, np.float64), resid, base_te, y["U0"][test], ridges)
            i = int(np.argmin(cv))
            row = {"n_train": n, "kernel": label, "ridge": ridges[i], "cv_mae": float(cv[i]), "test_mae": float(tst[i]),
                   "by_ridge": {f"{r:.3g}": [float(c), float(t)] for r, c, t in zip(ridges, cv, tst)}}
            result["rows"].append(row)
            print(f"N={n} {label}: ridge {ridges[i]:.2g} CV {cv[i]:.1f} test {tst[i]:.1f} meV", flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"{cfg['variant']}.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
