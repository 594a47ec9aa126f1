"""`eqk molecules train/predict/report` for symmetric tensor targets (the polarizability); wired in apps/molecules.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from eqkernels.apps._common import atomic_dir, console, to_jsonable
from eqkernels.errors import InputError


def _pipeline():
    from eqkernels.pipelines import molecules_tensor

    return molecules_tensor


def train_tensor(out: Path, path: str, target: str, kernel: str, n_train: int, seed: int, unit: str | None,
                 env, spec, ridge: float | None, max_atoms: int | None) -> None:
    """Fit and save a tensor model on the fixed split's training molecules; prints one summary line."""
    from eqkernels.pipelines.molecules import load_molecules, split_indices

    tp = _pipeline()
    mols = load_molecules(path)
    tp.target_tensors(mols, target, path=path)          # refuse data without the tensor before any work
    train_idx, _ = split_indices(len(mols), n_train, None, seed)
    model = tp.fit_tensor_model(mols.subset(train_idx), target, kernel, unit=unit, env_spec=env, kernel_spec=spec,
                                ridge=ridge, max_atoms=max_atoms, progress=None,
                                meta={"split_seed": seed, "data": str(path)})
    model.save(out)
    q = model.meta["quadrature_error_per_degree"]
    console.print(f"{out}: {kernel} model of the {target} tensor ({model.unit}) on {model.n_train} molecules, "
                  f"ridges λ=0 {model.ridges[0]:g} / λ=2 {model.ridges[1]:g}, per-atom quadrature error (vs degree "
                  f"{model.meta['quadrature_reference_degree']}) "
                  f"λ=0 {q['0']:.1e} / λ=2 {q['2']:.1e}, kernel {model.meta['kernel_seconds']:.1f} s")


def predict_tensor(model_path: Path, files, as_json: bool, unit: str | None) -> None:
    """Print each molecule's tensor (xx xy xz / yx yy yz / zx zy zz), isotropic part and anisotropy."""
    from eqkernels.pipelines.molecules import check_molecules, load_molecules

    tp = _pipeline()
    model = tp.load_tensor_model(model_path)
    out_unit = unit or model.unit
    tp.convert_volume(0.0, model.unit, out_unit)
    loaded = []
    for f in files:                                      # check every file first: no partial output
        mols = load_molecules(f)
        check_molecules(mols, model.env_spec.elements, max_atoms=model.max_atoms, path=f)
        loaded.append((f, mols))
    rows = []
    for f, mols in loaded:
        tensors = tp.convert_volume(model.predict(mols, check=False), model.unit, out_unit)
        summary = tp.tensor_summary(tensors)
        for k, name in enumerate(mols.names):
            rows.append({"name": str(f) if len(mols) == 1 else f"{f}:{name}", "target": model.target,
                         "unit": out_unit, "tensor": tensors[k], "isotropic": summary["isotropic"][k],
                         "anisotropy": summary["anisotropy"][k]})
    if as_json:
        typer.echo(json.dumps(to_jsonable(rows), indent=2))
        return
    for r in rows:
        t = r["tensor"]
        matrix = " / ".join(" ".join(f"{v:.4f}" for v in row) for row in t)
        typer.echo(f"{r['name']}\tisotropic {r['isotropic']:.4f}\tanisotropy {r['anisotropy']:.4f}\t{r['unit']}"
                   f"\t[{matrix}]")


def report_tensor(model_path: Path, out: Path, data: str | None, n_test: int, seed: int) -> None:
    """Held-out MAE per component, of the isotropic part and the anisotropy, and the equivariance error."""
    from eqkernels.pipelines.molecules import default_data_path, load_molecules

    tp = _pipeline()
    model = tp.load_tensor_model(model_path)
    path = data or model.meta.get("data") or str(default_data_path())
    mols = load_molecules(path)
    tp.target_tensors(mols, model.target, path=path)
    trained = set(model.meta.get("train_names", []))
    held = np.array([i for i, n in enumerate(mols.names) if n not in trained])
    if len(held) == 0:
        raise InputError("every molecule in the data was used for training; nothing to evaluate", path)
    test = mols.subset(np.sort(np.random.default_rng(seed).permutation(held)[:n_test]))
    result = tp.evaluate_tensor(model, test, seed=seed, progress=None)
    arrays = ("predictions", "targets", "predictions_rotated", "rotations")
    summary = {"model": str(model_path), "target": model.target, "unit": model.unit,
               "kernel": model.kernel_spec.name, "n_train": model.n_train, "data": str(path),
               "quadrature_degree": model.kernel_spec.quadrature_degree,
               "quadrature_error_per_degree": model.meta.get("quadrature_error_per_degree"),
               "ridges": list(model.ridges), **{k: v for k, v in result.items() if k not in arrays}}
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(to_jsonable(summary), indent=2) + "\n")
        comps = ("xx", "xy", "yy", "xz", "yz", "zz")
        lines = ["name," + ",".join(f"{w}_{c}" for w in ("target", "predicted") for c in comps)]
        six_t = tp.tensor_summary(result["targets"])["components"]
        six_p = tp.tensor_summary(result["predictions"])["components"]
        for name, t, p in zip(test.names, six_t, six_p):
            lines.append(name + "," + ",".join(f"{v:.4f}" for v in (*t, *p)))
        (tmp / "predictions.csv").write_text("\n".join(lines) + "\n")
    per = " ".join(f"{c} {v:.3g}" for c, v in result["mae_components"].items())
    console.print(f"{model.kernel_spec.name} {model.target}: MAE per component ({model.unit}) {per}; isotropic "
                  f"{result['mae_isotropic']:.3g}, anisotropy {result['mae_anisotropy']:.3g}; equivariance error "
                  f"on rotated copies {result['equivariance_error_abs']:.3g} {model.unit} max "
                  f"({result['equivariance_error_rel']:.1e} of the RMS prediction) on {len(test)} molecules → {out}")
