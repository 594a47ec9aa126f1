"""Intensive targets (kernel mean over atom pairs) in a fitted model, `eqk molecules train --tune`, and its bad input."""
from __future__ import annotations

import numpy as np
import pytest

from eqkernels.datasets import QM9_SAMPLE
from eqkernels.pipelines import molecules as mp
from eqkernels.pipelines import molecules_model as mm
from eqkernels.so3 import AtomKernel
from eqkernels.tuning import kfold_indices

N_TRAIN = 14


@pytest.fixture(scope="module")
def sample():
    return mp.load_molecules(QM9_SAMPLE)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A model of the intensive HOMO tuned through the CLI on N_TRAIN molecules (mlp: cheap kernels)."""
    from eqkernels.apps.cli import main

    path = tmp_path_factory.mktemp("tune") / "homo.h5"
    code = main(["molecules", "train", "--kernel", "mlp", "--target", "homo", "--n-train", str(N_TRAIN),
                 "--tune", "--budget", "600", "--out", str(path)])
    assert code == 0
    return mm.load_model(path)


def test_mean_reduction_is_the_per_pair_average_of_the_atom_kernel(tuned, sample):
    """The model's test kernel against an explicit mean over every atom pair of the per-atom kernel
    (AtomKernel on all atoms at once, no molecule tiling). Tolerance: both float32 atom kernels summed in
    float64; measured relative difference ~1e-7, so 1e-5."""
    test = sample.subset(np.arange(1990, 1995))
    got = tuned.test_kernel(test, progress=False)
    x, _ = tuned.features(test)
    atom = AtomKernel(tuned.kernel_spec, tuned.env_spec.l_max)(x, tuned.x_train)[tuned.meta["kernel_output"]]
    o1 = np.concatenate([[0], np.cumsum(test.n_atoms)])
    o2 = np.concatenate([[0], np.cumsum(np.bincount(tuned.mol_train))])
    want = np.array([[atom[o1[a]:o1[a + 1], o2[b]:o2[b + 1]].mean() for b in range(len(o2) - 1)]
                     for a in range(len(o1) - 1)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_tune_stores_its_choice_and_its_cv_score(tuned):
    """The stored CV MAE is recomputed by explicit per-fold solves on the model's own training kernel."""
    meta = tuned.meta
    assert meta["atom_reduction"] == "mean" and tuned.reduction == "mean"  # homo is intensive by default
    tune = meta["tune"]
    assert tune["kernel_output"] == meta["kernel_output"] in ("ntk", "nngp")
    assert tune["chosen_kernel_spec"] == tuned.kernel_spec.to_dict() and tune["chosen_env"] == tuned.env_spec.to_dict()
    assert tuned.ridge == tune["ridge"]
    run = [t for t in tune["trials"] if "cv_mae" in t]
    assert run[0]["label"] == "defaults" and len(run) >= 2
    assert tune["cv_mae"] == min(t["cv_mae"] for t in run)
    k = tuned.kernel(False)(tuned.x_train, tuned.mol_train, tuned.n_train)[tune["kernel_output"]]
    n = np.bincount(tuned.mol_train)
    k = k / np.outer(n, n)
    errors = []
    for fit, val in kfold_indices(tuned.n_train, tune["n_folds"], 0):
        block = k[np.ix_(fit, fit)]
        alpha = np.linalg.solve(block + tune["ridge"] * np.mean(np.diag(block)) * np.eye(len(fit)), tuned.y_train[fit])
        errors.append(np.abs(k[np.ix_(val, fit)] @ alpha - tuned.y_train[val]))
    # float32 kernel entries (~1e-7 relative) through a ridge-regularised solve: measured ~1e-6, margin 10×
    assert tune["cv_mae"] == pytest.approx(float(np.mean(np.concatenate(errors))), rel=1e-5)


def test_budget_too_small_for_one_fit(cli, tmp_path):
    out = tmp_path / "m.h5"
    r = cli("molecules", "train", "--kernel", "mlp", "--n-train", "20", "--tune", "--budget", "0.001", "--out", out)
    assert r.code != 0 and not out.exists()
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "--budget" in lines[0] and "too small" in lines[0] and "Traceback" not in r.err


@pytest.mark.parametrize("tune", [False, True])
def test_target_the_file_lacks(cli, tmp_path, sample, tune):
    """An extxyz file has positions but no QM9 properties: asking for HOMO names the file and the target."""
    import ase
    import ase.io

    f = tmp_path / "mols.extxyz"
    ase.io.write(f, [ase.Atoms(numbers=z, positions=r) for z, r in zip(sample.numbers[:30], sample.positions[:30])])
    out = tmp_path / "m.h5"
    r = cli("molecules", "train", "--kernel", "mlp", "--data", f, "--target", "homo", "--n-train", "10",
            *(["--tune", "--budget", "60"] if tune else []), "--out", out)
    assert r.code != 0 and not out.exists()
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "homo" in lines[0] and "mols.extxyz" in lines[0] and "Traceback" not in r.err
