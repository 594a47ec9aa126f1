"""Reports on molecule models: held-out errors and invariance of the predictions, learning curves, plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from eqkernels.pipelines.molecules import MoleculeSet, check_molecules, transformed_copies
from eqkernels.pipelines.molecules_model import MoleculeModel, molecule_kernel_values
from eqkernels.solvers import solve_ridge_eigh


def evaluate(model: MoleculeModel, test: MoleculeSet, *, seed: int = 1, progress: bool | None = None) -> dict:
    """MAE / RMSE on `test`, MAE on transformed copies, and the invariance error of the predictions."""
    y = model.target_values(test)
    check_molecules(test, model.env_spec.elements, max_atoms=model.max_atoms)
    k_test = model.test_kernel(test, progress)
    base, learned = model.predict_parts(test, check=False, k_test=k_test)
    pred = base + learned
    moved = transformed_copies(test, seed)
    base_m, learned_m = model.predict_parts(moved, progress=progress)
    pred_m = base_m + learned_m
    scale = float(np.sqrt(np.mean(learned ** 2))) or 1.0
    return {"n_test": len(test), "mae": float(np.mean(np.abs(pred - y))),
            "rmse": float(np.sqrt(np.mean((pred - y) ** 2))),
            "mae_transformed": float(np.mean(np.abs(pred_m - y))),
            "invariance_error_abs": float(np.max(np.abs(pred_m - pred))),
            "invariance_error_rel": float(np.max(np.abs(learned_m - learned)) / scale),
            "predictions": pred, "predictions_transformed": pred_m, "targets": y, "k_test": k_test}


def learning_curve(model: MoleculeModel, test: MoleculeSet, k_test: np.ndarray | None = None, *,
                   sizes: list[int] | None = None, seed: int = 0, progress: bool | None = None) -> list[dict]:
    """Test MAE when the model is refitted on nested subsets of its own training set (same kernel, ridge).

    The atom references and the per-element linear fit of the full model are kept; only the kernel part
    is refitted. Uses one training kernel and the test kernel: one extra training-kernel evaluation.
    """
    n = model.n_train
    if sizes is None:
        sizes = sorted({max(2, n >> k) for k in range(5)} | {n})
    k_train = model.kernel(progress)(model.x_train, model.mol_train, n, description="training kernel",
                                     weight1=model.w_train)
    n_atoms = np.bincount(model.mol_train, minlength=n)
    k_train = molecule_kernel_values(k_train, model.meta, n_atoms, n_atoms)
    if k_test is None:
        k_test = model.test_kernel(test, progress)
    y = model.target_values(test) - model.baseline(test)
    order = np.random.default_rng(seed).permutation(n)
    rows = []
    for size in sizes:
        idx = np.sort(order[:size]) if size < n else np.arange(n)
        alpha = solve_ridge_eigh(k_train[np.ix_(idx, idx)], model.y_train[idx], model.ridge)
        err = k_test[:, idx] @ alpha - y
        rows.append({"n_train": int(size), "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2)))})
    return rows


def plot_learning_curve(curve: list[dict], path: str | Path, *, title: str = "", unit: str = "") -> None:
    """Log-log plot of test MAE against the number of training molecules (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    from matplotlib.ticker import FormatStrFormatter, NullFormatter, ScalarFormatter

    ax.loglog([r["n_train"] for r in curve], [r["mae"] for r in curve], "o-")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, no 10^x mantissa labels on the minor ticks
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.set_xticks([r["n_train"] for r in curve])
    ax.set_xlabel("training molecules")
    ax.set_ylabel(f"test MAE ({unit})")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)

