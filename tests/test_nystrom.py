"""Nyström-preconditioned CG (`eqkernels.nystrom`) against exact kernel ridge regression, numpy and the CLI.

The reference for the mean is the exact solver (`solvers.dual_coefficients`: Cholesky of the N×N
kernel); residuals and the DTC variance are recomputed here with plain numpy from the kernels.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from eqkernels.datasets import NCT_CRC_SAMPLE, PATHMNIST_SAMPLE
from eqkernels.nystrom import (NystromPosterior, falkon_solve, parse_inducing, plan_solver, row_blocks,
                               uniform_inducing)
from eqkernels.errors import InputError
from eqkernels.solvers import GaussianPosterior, centred_one_hot, dual_coefficients
from tests.conftest import one_line_error as _one_line_error

N_TRAIN, RIDGE = 60, 1e-3


@pytest.fixture(scope="module")
def problem():
    """The `cnn` NTK and NNGP of 80 real PathMNIST tiles at 8 px: 60 training, 20 test tiles, 9 classes."""
    from eqkernels.kernels import ImageKernel
    from eqkernels.pipelines.histology import Preprocessing, load_tiles

    tiles = load_tiles(PATHMNIST_SAMPLE)
    x = Preprocessing.fit(tiles.images[:80], 8)(tiles.images[:80])
    k = ImageKernel("cnn", progress=False)(x)
    n = N_TRAIN
    return {"k": k["ntk"][:n, :n], "k_test": k["ntk"][n:, :n], "g": k["nngp"][:n, :n], "g_test": k["nngp"][n:, :n],
            "g_test_diag": np.diag(k["nngp"])[n:], "y": centred_one_hot(tiles.labels[:n], 9)}


def test_predictions_approach_exact_krr_as_m_grows(problem):
    """Max error of the test scores against exact KRR falls with M (nested uniform sets) and vanishes at M = N.

    At M = N the normal equations are H = K(K + λ(K + js I)/K·…) — exactly K(K + λI) up to the jitter j — so
    by the perturbation bound for linear systems the score error is at most
    ‖K_xN‖₂ · (‖r‖ + λ·j·s·‖α‖) / λ_min(H_j), r the recomputed residual of the normal equations, s the mean
    diagonal (measured: bound 1.1e-4 against an error of 1.2e-9, so the bound is the tolerance itself).
    Smaller M: measured errors 1.47, 1.28, 0.69, 0.35 (scores up to 1.59) for M = 10, 20, 30, 45.
    """
    k, k_test, y = problem["k"], problem["k_test"], problem["y"]
    exact = k_test @ dual_coefficients(k, y, ridge=RIDGE)
    errors = []
    for m in (10, 20, 30, 45, N_TRAIN):
        idx = uniform_inducing(N_TRAIN, m, seed=0)
        sol = falkon_solve(k[:, idx], k[np.ix_(idx, idx)], y, ridge=RIDGE)
        assert sol.converged
        errors.append(np.max(np.abs(k_test[:, idx] @ sol.coef - exact)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.3 * np.max(np.abs(exact))          # M = 10 is a coarse approximation …
    scale = float(np.mean(np.diag(k)))
    lam = RIDGE * scale
    k_j = 0.5 * (k + k.T) + sol.jitter * scale * np.eye(N_TRAIN)
    h = k.T @ k + lam * k_j
    lam_min = np.linalg.eigvalsh(0.5 * (h + h.T))[0]
    assert lam_min > 0
    residual = np.linalg.norm(k.T @ y - h @ sol.coef)
    alpha = dual_coefficients(k, y, ridge=RIDGE)
    bound = np.linalg.norm(k_test, 2) * (residual + lam * sol.jitter * scale * np.linalg.norm(alpha)) / lam_min
    assert errors[-1] <= bound                               # … and M = N is exact within the derived bound
    assert errors[-1] < 1e-6 * np.max(np.abs(exact))


def test_cg_reaches_the_residual_it_reports(problem):
    """Every column's relative residual, recomputed with numpy, is ≤ tol and equals the reported maximum;
    a CG cut short says it did not converge and reports its (larger) residual truthfully."""
    k, y = problem["k"], problem["y"]
    idx = uniform_inducing(N_TRAIN, 30, seed=1)
    k_nm, k_mm = k[:, idx], k[np.ix_(idx, idx)]
    scale = float(np.mean(np.diag(k_mm)))

    def residuals(sol):
        h = k_nm.T @ k_nm + sol.reg * (0.5 * (k_mm + k_mm.T) + sol.jitter * scale * np.eye(30))
        b = k_nm.T @ y
        return np.linalg.norm(b - h @ sol.coef, axis=0) / np.linalg.norm(b, axis=0)

    for tol in (1e-6, 1e-10):
        sol = falkon_solve(k_nm, k_mm, y, ridge=RIDGE, tol=tol)
        r = residuals(sol)
        assert sol.converged and np.all(r <= tol) and sol.coef.shape == (30, 9)
        assert sol.residual == pytest.approx(r.max(), rel=1e-6)
        assert sol.reg == pytest.approx(RIDGE * scale)
    short = falkon_solve(k_nm, k_mm, y, ridge=RIDGE, tol=1e-12, max_iter=2)
    assert short.iterations == 2 and not short.converged
    assert short.residual == pytest.approx(residuals(short).max(), rel=1e-6) and short.residual > 1e-12


def test_cg_restarts_when_its_recursive_residual_drifts():
    """Gaussian kernel on 300 random points, M = 130, ridge 1e-6, tol 1e-10: the recursively updated residual
    fell below tol after 139 steps while the recomputed one was 1.03e-10 (the first version stopped there,
    not converged); restarting CG from β reaches it (recomputed here with numpy)."""
    rng = np.random.default_rng(0)
    m, d, width = int(rng.integers(20, 150)), int(rng.integers(2, 8)), float(rng.uniform(1, 30))
    x = rng.standard_normal((300, d))
    k = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / width)
    idx, y = uniform_inducing(300, m, 0), rng.standard_normal((300, 3))
    k_nm, k_mm = k[:, idx], k[np.ix_(idx, idx)]
    sol = falkon_solve(k_nm, k_mm, y, ridge=1e-6, tol=1e-10)
    scale = float(np.mean(np.diag(k_mm)))
    h = k_nm.T @ k_nm + sol.reg * (k_mm + sol.jitter * scale * np.eye(m))
    b = k_nm.T @ y
    assert sol.converged and np.max(np.linalg.norm(b - h @ sol.coef, axis=0) / np.linalg.norm(b, axis=0)) <= 1e-10


def test_dtc_variance_matches_its_closed_form_and_the_exact_posterior(problem):
    """DTC σ²(x) = K_xx − K_xM K_MM⁻¹ K_Mx + λ K_xM (K_MN K_NM + λ K_MM)⁻¹ K_Mx by np.linalg.solve (same jitter),
    ≥ 0; at M = N it is the exact NNGP posterior variance (`GaussianPosterior`, N×N Cholesky).

    Tolerances: the two routes differ by rounding of M×M solves with condition numbers up to ~1e6
    (measured differences ≤ 1e-9 of K_xx ≈ 1); 1e-6 relative leaves three orders of margin.
    """
    g, g_test, diag = problem["g"], problem["g_test"], problem["g_test_diag"]
    idx = uniform_inducing(N_TRAIN, 25, seed=2)
    k_nm, k_mm, k_xm = g[:, idx], g[np.ix_(idx, idx)], g_test[:, idx]
    post = NystromPosterior.fit(k_nm, k_mm, ridge=RIDGE)
    var = post.variance(diag, k_xm)
    scale = float(np.mean(np.diag(k_mm)))
    k_mm_j = 0.5 * (k_mm + k_mm.T) + post.jitter * scale * np.eye(25)
    lam = RIDGE * scale
    closed = (diag - np.einsum("tm,mt->t", k_xm, np.linalg.solve(k_mm_j, k_xm.T))
              + lam * np.einsum("tm,mt->t", k_xm, np.linalg.solve(k_nm.T @ k_nm + lam * k_mm_j, k_xm.T)))
    assert np.all(var > 0)
    assert np.allclose(var, closed, rtol=1e-6, atol=1e-9 * np.max(diag))
    full = NystromPosterior.fit(g, g, ridge=RIDGE).variance(diag, g_test)
    exact = GaussianPosterior.fit(g, ridge=RIDGE).variance(diag, g_test)
    assert np.allclose(full, exact, rtol=1e-6, atol=1e-9 * np.max(diag))


def test_row_blocks_and_the_solver_choice():
    calls = []

    def cross(a, b):
        calls.append((a, b))
        return {"k": np.arange(a, b, dtype=float)[:, None] * np.ones((1, 3))}

    out = row_blocks(cross, 10, block=4)["k"]
    assert calls == [(0, 4), (4, 8), (8, 10)] and np.array_equal(out[:, 0], np.arange(10))
    small = plan_solver(1000, "auto", stored_kernels=3, budget_bytes=2 ** 30)
    assert small["solver"] == "exact" and "fit the memory budget" in small["reason"]
    big = plan_solver(20000, "auto", stored_kernels=3, budget_bytes=2 ** 30)
    assert big["solver"] == "nystrom" and big["inducing"] == 2000 and "exceed" in big["reason"]
    assert plan_solver(20000, "exact", stored_kernels=3)["solver"] == "exact"
    assert plan_solver(50, 50, stored_kernels=2)["inducing"] == 50
    assert parse_inducing(" Auto ") == "auto" and parse_inducing("17") == 17
    for bad, text in (("0", "positive"), ("-3", "positive"), ("many", "'auto', 'exact'")):
        with pytest.raises(InputError, match=text):
            parse_inducing(bad)
    with pytest.raises(InputError, match="exceeds the 40 training"):
        plan_solver(40, 41, stored_kernels=2)
    assert np.array_equal(uniform_inducing(100, 10, 3), np.sort(uniform_inducing(100, 20, 3)[
        np.isin(uniform_inducing(100, 20, 3), uniform_inducing(100, 10, 3))]))   # nested as M grows


# ---------------------------------------------------------------------------------------------------- CLI


def test_histology_cli_stores_the_choice_and_predicts(cli, tmp_path):
    from eqkernels.pipelines.histology_model import HistologyModel

    small = ["--size", "8", "--n-train", "40"]
    nys, exact = tmp_path / "nys.h5", tmp_path / "exact.h5"
    result = cli("histology", "train", *small, "--inducing", "16", "--out", nys)
    assert result.code == 0, result
    assert "Nyström-CG with M = 16" in result.out and "converged" in result.out
    model = HistologyModel.load(nys)
    solver = model.options["solver"]
    assert solver["solver"] == "nystrom" and solver["inducing"] == 16 and solver["reason"] == "--inducing 16"
    assert solver["cg_converged"] and solver["cg_residual"] <= solver["cg_tolerance"] and solver["cg_iterations"] > 0
    assert model.train_inputs.shape == (16, 8, 8, 3) and model.dual_coef.shape == (16, 9)
    assert len(model.train_fingerprints) == 40 and model.posterior_system.shape == (16, 16)
    tile = NCT_CRC_SAMPLE / "ADI" / "ADI-AAQEFMRI.tif"
    pred = cli("histology", "predict", nys, tile, "--json")
    assert pred.code == 0, pred
    assert json.loads(pred.out.strip().splitlines()[0])["nngp_std"] > 0
    assert cli("histology", "train", *small, "--out", exact).code == 0
    chosen = HistologyModel.load(exact).options["solver"]
    assert chosen["solver"] == "exact" and chosen["reason"].startswith("auto: the exact training kernels")
    _one_line_error(cli("histology", "train", *small, "--inducing", "0", "--out", tmp_path / "x.h5"), "--inducing")
    _one_line_error(cli("histology", "train", *small, "--inducing", "41", "--out", tmp_path / "y.h5"),
                    "--inducing 41 exceeds the 40")
    _one_line_error(cli("histology", "train", *small, "--inducing", "16", "--time", "5", "--out", tmp_path / "z.h5"),
                    "kernel ridge regression only")
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()


def test_old_histology_model_without_solver_meta_loads_as_exact(cli, tmp_path):
    """A model written before this option (no 'solver' option, no posterior_system) predicts as before."""
    from eqkernels import store
    from eqkernels.pipelines.histology_model import HistologyModel

    path = tmp_path / "m.h5"
    assert cli("histology", "train", "--size", "8", "--n-train", "30", "--inducing", "exact", "--out", path).code == 0
    meta, arrays = store.load(path, "histology-model")
    meta["options"].pop("solver")
    store.save(path, "histology-model", meta, arrays)
    model = HistologyModel.load(path)
    assert model.posterior_system is None and "solver" not in model.options
    assert isinstance(model.posterior(), GaussianPosterior)


def test_molecules_cli_stores_the_choice_and_predicts(cli, tmp_path):
    from eqkernels.datasets import QM9_SAMPLE
    from eqkernels.pipelines import molecules as mp

    path = tmp_path / "mol.h5"
    result = cli("molecules", "train", "--kernel", "mlp", "--n-train", "40", "--inducing", "12", "--out", path)
    assert result.code == 0, result
    assert "on 40 molecules" in result.out and "M = 12" in result.out
    from eqkernels.pipelines.molecules_model import load_model

    model = load_model(path)
    solver = model.meta["solver"]
    assert solver["solver"] == "nystrom" and solver["inducing"] == 12 and solver["cg_converged"]
    assert solver["ridge_rule"] == "leave-one-out on the inducing subproblem"
    assert len(model.alpha) == 12 and int(model.mol_train.max()) == 11 and model.meta["n_train"] == 40
    rows = mp.qm9pack_rows(QM9_SAMPLE)
    xyz = tmp_path / "m.xyz"
    xyz.write_text(mp.qm9pack_row_to_xyz(rows[-1]))
    pred = cli("molecules", "predict", path, xyz)
    assert pred.code == 0 and np.isfinite(float(pred.out.split("\t")[1])), pred
    _one_line_error(cli("molecules", "train", "--kernel", "mlp", "--n-train", "40", "--inducing", "0",
                        "--out", tmp_path / "a.h5"), "--inducing")
    _one_line_error(cli("molecules", "train", "--kernel", "mlp", "--n-train", "40", "--inducing", "50",
                        "--out", tmp_path / "b.h5"), "--inducing 50 exceeds the 40")
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()
