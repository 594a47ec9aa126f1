"""Exploration (issue 16): invariant heads after the SO(3) pooling of the heavy-atom `mlp-so3avg` kernel, on U0.

    python benchmarks/u0_heads.py '{"spec": {"quadrature_degree": 7}, "sizes": [100, 1000]}'

`mlp-so3avg`'s NNGP is the kernel of ReLU layers whose last features are averaged over SO(3) before a linear
readout: k̄(x, x') = ∫ E[φ(z(x)) φ(z(D(G) x'))] dG. Here more layers act on those pooled (invariant) features
before the readout, so every atom-pair entry goes through their kernel map (a function of k̄(x, x'), k̄(x, x),
k̄(x', x')). The atom-level training and test kernels (heavy atoms × heavy atoms) are computed once and cached
in $EQK_EXPLORE_CACHE; each head is then a cheap elementwise map, summed to molecules, scored by 5-fold CV
and on the test set (split, targets and test set of benchmarks/molecules_peers.py; meV). Heads:
- relu depth h, bias variance b: h × (Dense(√2, b), ReLU), readout 1 (NNGP and NTK);
- gauss s: exp(−|φ̄(x) − φ̄(x')|² / (2 s² m)) of the pooled NNGP features, m the median squared distance;
- amplitudes c: per-element amplitudes (C, N, O, F) of the heavy atoms on the plain NNGP, Σ c_Zi c_Zj k̄ (the
  config's "amplitudes": a list of 4-lists; the heads are skipped when it is given).
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
from molecules import BENCH_ENV  # noqa: E402
from molecules_peers import RIDGES, featuriser, load_split  # noqa: E402
from u0_variants import CACHE, RESULTS  # noqa: E402  (the exploration's shared cache and log folder)


def atom_kernels(cfg, mols, pool, test):
    """Heavy-atom kernels {nngp, ntk (A, A), nngp_te, ntk_te (A_te, A), diag_te (A_te,)} and the heavy atoms'
    molecules of both sides; cached per config."""
    from eqkernels.environments import EnvironmentSpec
    from eqkernels.molecule_kernel import MoleculeKernel
    from eqkernels.so3 import AtomKernel, AtomKernelSpec

    CACHE.mkdir(parents=True, exist_ok=True)
    key = {k: cfg.get(k) for k in ("spec", "env", "n_train", "n_test")}
    path = CACHE / ("atoms-" + hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12] + ".npz")
    if path.exists():
        return dict(np.load(path))
    env = EnvironmentSpec(**{**BENCH_ENV, **cfg.get("env", {})})
    spec = AtomKernelSpec(**{"name": "mlp-so3avg", "quadrature_degree": 7, **cfg.get("spec", {})})
    feats = featuriser(mols, env, pool[:100])
    mk = MoleculeKernel(spec, env.l_max, progress=False)

    def heavy(idx):
        x, m = feats(idx)
        keep = np.concatenate([mols.numbers[i] for i in idx]) != 1
        return x[keep], m[keep]
    t0 = time.perf_counter()
    x_tr, m_tr = heavy(pool[:cfg.get("n_train", 1000)])
    a = np.arange(len(x_tr))
    k_tr = mk(x_tr, a, len(a))                      # every atom its own "molecule": the atom-level kernel
    t1 = time.perf_counter()
    x_te, m_te = heavy(test)
    b = np.arange(len(x_te))
    k_te = mk(x_te, b, len(b), x_tr, a, len(a))
    ak = AtomKernel(spec, env.l_max)
    diag_te = np.concatenate([np.diagonal(ak(x_te[s:s + 32])["nngp"]) for s in range(0, len(x_te), 32)])
    out = {"nngp": k_tr["nngp"].astype(np.float32), "ntk": k_tr["ntk"].astype(np.float32),
           "nngp_te": k_te["nngp"].astype(np.float32), "ntk_te": k_te["ntk"].astype(np.float32),
           "diag_te": diag_te, "mol_tr": m_tr, "mol_te": m_te,
           "seconds": np.array([t1 - t0, time.perf_counter() - t1])}
    np.savez(path, **out)
    return out


def heavy_numbers(mols, idx):
    """Atomic numbers of the heavy atoms of molecules idx, in the atom-kernel order."""
    z = np.concatenate([mols.numbers[i] for i in idx])
    return z[z != 1]


def relu_head(k, theta, v1, v2, depth, bias_var, weight_var=2.0):
    """Pooled features' (NNGP k, NTK θ) with variances v1, v2 → after `depth` × (Dense, ReLU) and a readout of
    variance 1. k, θ are the trunk's readout-1 kernels: θ − k is the pooled features' own tangent kernel."""
    feat_ntk = theta - k
    for _ in range(depth):
        q, q1, q2 = weight_var * k + bias_var, weight_var * v1 + bias_var, weight_var * v2 + bias_var
        q_ntk = q + weight_var * feat_ntk
        s = np.sqrt(q1 * q2)
        rho = np.clip(q / s, -1, 1)
        t = np.arccos(rho)
        k_dot = (np.pi - t) / (2 * np.pi)
        k = s * (np.sqrt(1 - rho ** 2) / (2 * np.pi) + k_dot * rho)
        feat_ntk = k_dot * q_ntk                           # the next layer's pooled-feature tangent kernel
        v1, v2 = q1 / 2, q2 / 2
    return k, k + feat_ntk


def molecule_sum(k_atoms, mol1, n1, mol2, n2, w1=None, w2=None):
    """Σ over atom pairs of each molecule pair, with optional per-atom amplitudes w: (n1, n2)."""
    import scipy.sparse

    w1 = np.ones(len(mol1)) if w1 is None else w1
    w2 = np.ones(len(mol2)) if w2 is None else w2
    e1 = scipy.sparse.csr_matrix((w1, (mol1, np.arange(len(mol1)))), shape=(n1, len(mol1)))
    e2 = scipy.sparse.csr_matrix((w2, (mol2, np.arange(len(mol2)))), shape=(n2, len(mol2)))
    return np.asarray((e1 @ (e2 @ np.asarray(k_atoms).T).T), np.float64)


def heads(cfg, d, reduce):
    """Yields (label, molecule kernel train, test) for every head of the config; `reduce` sums an atom kernel
    (train or test side) to molecules right away, so only one head's atom kernels are held at a time."""
    k, th, k_te, th_te = (d[n] for n in ("nngp", "ntk", "nngp_te", "ntk_te"))
    dg, dg_te = np.diagonal(k).astype(np.float64), np.asarray(d["diag_te"], np.float64)
    yield "none,nngp", reduce(k, "tr"), reduce(k_te, "te")
    if "amplitudes" in cfg:
        for c in cfg["amplitudes"]:
            yield f"amplitudes {c},nngp", reduce(k, "tr", c), reduce(k_te, "te", c)
        return
    yield "none,ntk", reduce(th, "tr"), reduce(th_te, "te")
    for depth in cfg.get("depths", [1, 2]):
        for b in cfg.get("bias_vars", [0.0, 0.01, 0.1]):
            tr = relu_head(k, th, dg[:, None], dg[None, :], depth, b)
            tr = reduce(tr[0], "tr"), reduce(tr[1], "tr")
            te = relu_head(k_te, th_te, dg_te[:, None], dg[None, :], depth, b)
            te = reduce(te[0], "te"), reduce(te[1], "te")
            yield f"relu h={depth} b={b},nngp", tr[0], te[0]
            yield f"relu h={depth} b={b},ntk", tr[1], te[1]
    sq = dg[:, None] + dg[None, :] - 2 * k
    med = float(np.median(sq[np.triu_indices(len(k), 1)][::97]))
    sq_te = dg_te[:, None] + dg[None, :] - 2 * k_te
    for s in cfg.get("gauss", [0.5, 1.0, 2.0, 4.0]):
        yield (f"gauss s={s},nngp", reduce(np.exp(-sq / (2 * s * s * med)), "tr"),
               reduce(np.exp(-sq_te / (2 * s * s * med)), "te"))


def main(argv=None) -> int:
    from eqkernels.pipelines.molecules_model import baseline_inputs
    from eqkernels.solvers import solve_ridge_eigh
    from eqkernels.tuning import kfold_ridge_mae

    cfg = json.loads((argv or sys.argv[1:])[0])
    cfg.setdefault("n_test", 1000)
    cfg.setdefault("n_train", max(cfg.get("sizes", [100, 1000])))
    mols, pool, test, y, counts = load_split(cfg["n_test"])
    d = atom_kernels(cfg, mols, pool, test)
    print(f"atom kernels: {d['nngp'].shape} train, {d['nngp_te'].shape} test, seconds {d['seconds']}", flush=True)
    feats = baseline_inputs(counts, "sum")
    ridges = [r for r in RIDGES if cfg.get("min_ridge", 1e-7) <= r <= 1e-1]
    result = {"cfg": cfg, "kernel_seconds": d["seconds"].tolist(), "rows": []}
    n_all = cfg["n_train"]
    sides = {"tr": (d["mol_tr"], n_all), "te": (d["mol_te"], len(test))}
    z = {"tr": heavy_numbers(mols, pool[:n_all]), "te": heavy_numbers(mols, test)}
    heavy_elements = np.array([6, 7, 8, 9])

    def reduce(k_atoms, side, amplitudes=None):
        if amplitudes is None:
            return molecule_sum(k_atoms, *sides[side], d["mol_tr"], n_all)
        amp = dict(zip(heavy_elements, amplitudes))
        w1, w2 = (np.array([amp[e] for e in z[s]], np.float64) for s in (side, "tr"))
        return molecule_sum(k_atoms, *sides[side], d["mol_tr"], n_all, w1, w2)
    for label, k_mol, k_mol_te in heads(cfg, d, reduce):
        for n in cfg.get("sizes", [100, 1000]):
            tr = pool[:n]
            coef = np.linalg.lstsq(feats[tr], y["U0"][tr], rcond=None)[0]
            resid, base_te = y["U0"][tr] - feats[tr] @ coef, feats[test] @ coef
            kk, kt = k_mol[:n, :n], k_mol_te[:, :n]
            scale = float(np.mean(np.diag(kk)))                 # ridges relative to the kernel's scale
            cv = kfold_ridge_mae(kk / scale, resid, ridges)
            i = int(np.argmin(cv))
            alpha = solve_ridge_eigh(kk / scale, resid, ridges[i])
            test_mae = float(np.mean(np.abs(base_te + (kt / scale) @ alpha - y["U0"][test])))
            row = {"n_train": n, "kernel": label, "ridge": ridges[i], "cv_mae": float(cv[i]), "test_mae": test_mae}
            result["rows"].append(row)
            print(f"N={n} {label}: ridge {ridges[i]:.2g} CV {cv[i]:.1f} test {test_mae:.1f} meV", flush=True)
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "heads.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
