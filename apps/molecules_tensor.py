"""`eqk molecules train/predict/report` for vector (λ = 1) and symmetric tensor (λ = 0 ⊕ 2) targets;
wired in apps/molecules.py."""
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


def _load_with_target(path: str, target: str, target_file: str | None):
    """The molecules, with the target's columns from `target_file` attached (matched by QM9 index)."""
    from eqkernels.pipelines.molecules import load_molecules
    from eqkernels.pipelines.qm9io import attach_target_csv

    mols = load_molecules(path)
    if target_file:
        attach_target_csv(mols, target_file, target)
    return mols


def _native_unit(model) -> str:
    return model.meta.get("native_unit", _pipeline().NATIVE_UNITS.get(model.target, "as in the data"))


def train_tensor(out: Path, path: str, target: str, kernel: str, n_train: int, seed: int, unit: str | None,
                 env, spec, ridge: float | None, max_atoms: int | None, target_file: str | None = None) -> None:
    """Fit and save a vector/tensor model on the fixed split's training molecules; prints one summary line."""
    from eqkernels.pipelines.molecules import split_indices

    tp = _pipeline()
    mols = _load_with_target(path, target, target_file)
    form, _ = tp.target_values(mols, target, path=target_file or path)   # refuse data without it before any work
    train_idx, _ = split_indices(len(mols), n_train, None, seed)
    meta = {"split_seed": seed, "data": str(path), **({"target_file": str(target_file)} if target_file else {})}
    model = tp.fit_tensor_model(mols.subset(train_idx), target, kernel, unit=unit, env_spec=env, kernel_spec=spec,
                                ridge=ridge, max_atoms=max_atoms, progress=None, meta=meta)
    model.save(out)
    q = model.meta["quadrature_error_per_degree"]
    ridges = " / ".join(f"λ={lam} {r:g}" for lam, r in zip(model.degrees, model.ridges))
    errors = " / ".join(f"λ={lam} {q[str(lam)]:.1e}" for lam in model.degrees)
    console.print(f"{out}: {kernel} model of the {target} {form.name} ({model.unit}) on {model.n_train} molecules, "
                  f"ridges {ridges}, per-atom quadrature error (vs degree "
                  f"{model.meta['quadrature_reference_degree']}) {errors}, kernel {model.meta['kernel_seconds']:.1f} s")


def predict_tensor(model_path: Path, files, as_json: bool, unit: str | None) -> None:
    """Print each molecule's vector and its norm, or tensor (xx xy xz / yx yy yz / zx zy zz), isotropic part
    and anisotropy."""
    from eqkernels.pipelines.molecules import check_molecules, load_molecules

    tp = _pipeline()
    model = tp.load_tensor_model(model_path)
    out_unit = unit or model.unit
    tp.convert_target_unit(0.0, _native_unit(model), model.unit, out_unit)
    loaded = []
    for f in files:                                      # check every file first: no partial output
        mols = load_molecules(f)
        check_molecules(mols, model.env_spec.elements, max_atoms=model.max_atoms, path=f)
        loaded.append((f, mols))
    rows = []
    for f, mols in loaded:
        values = tp.convert_target_unit(model.predict(mols, check=False), _native_unit(model), model.unit, out_unit)
        for k, name in enumerate(mols.names):
            row = {"name": str(f) if len(mols) == 1 else f"{f}:{name}", "target": model.target, "unit": out_unit}
            if model.form is tp.VECTOR:
                row.update(vector=values[k], norm=float(np.linalg.norm(values[k])))
            else:
                summary = tp.tensor_summary(values[k:k + 1])
                row.update(tensor=values[k], isotropic=summary["isotropic"][0], anisotropy=summary["anisotropy"][0])
            rows.append(row)
    if as_json:
        typer.echo(json.dumps(to_jsonable(rows), indent=2))
        return
    for r in rows:
        if "vector" in r:
            vec = " ".join(f"{v:.4f}" for v in r["vector"])
            typer.echo(f"{r['name']}\tnorm {r['norm']:.4f}\t{r['unit']}\t[{vec}]")
            continue
        matrix = " / ".join(" ".join(f"{v:.4f}" for v in row) for row in r["tensor"])
        typer.echo(f"{r['name']}\tisotropic {r['isotropic']:.4f}\tanisotropy {r['anisotropy']:.4f}\t{r['unit']}"
                   f"\t[{matrix}]")


def _predictions_csv(tp, form, names, targets, predictions) -> str:
    if form is tp.VECTOR:
        comps, t, p = ("x", "y", "z"), targets, predictions
    else:
        comps = ("xx", "xy", "yy", "xz", "yz", "zz")
        t, p = (tp.tensor_summary(a)["components"] for a in (targets, predictions))
    lines = ["name," + ",".join(f"{w}_{c}" for w in ("target", "predicted") for c in comps)]
    lines += [name + "," + ",".join(f"{v:.4f}" for v in (*a, *b)) for name, a, b in zip(names, t, p)]
    return "\n".join(lines) + "\n"


def report_tensor(model_path: Path, out: Path, data: str | None, n_test: int, seed: int,
                  target_file: str | None = None) -> None:
    """Held-out MAE per component (and of the norm, or of the isotropic part and the anisotropy) and the
    equivariance error on rotated copies."""
    from eqkernels.pipelines.molecules import default_data_path

    tp = _pipeline()
    model = tp.load_tensor_model(model_path)
    path = data or model.meta.get("data") or str(default_data_path())
    target_file = target_file or model.meta.get("target_file")
    mols = _load_with_target(path, model.target, target_file)
    tp.target_values(mols, model.target, path=target_file or path)
    trained = set(model.meta.get("train_names", []))
    held = np.array([i for i, n in enumerate(mols.names) if n not in trained])
    if len(held) == 0:
        raise InputError("every molecule in the data was used for training; nothing to evaluate", path)
    test = mols.subset(np.sort(np.random.default_rng(seed).permutation(held)[:n_test]))
    result = tp.evaluate_tensor(model, test, seed=seed, progress=None)
    arrays = ("predictions", "targets", "predictions_rotated", "rotations")
    summary = {"model": str(model_path), "target": model.target, "form": model.form.name, "unit": model.unit,
               "kernel": model.kernel_spec.name, "n_train": model.n_train, "data": str(path),
               "quadrature_degree": model.kernel_spec.quadrature_degree,
               "quadrature_error_per_degree": model.meta.get("quadrature_error_per_degree"),
               "ridges": list(model.ridges), **{k: v for k, v in result.items() if k not in arrays}}
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(to_jsonable(summary), indent=2) + "\n")
        (tmp / "predictions.csv").write_text(_predictions_csv(tp, model.form, test.names, result["targets"],
                                                              result["predictions"]))
    per = " ".join(f"{c} {v:.3g}" for c, v in result["mae_components"].items())
    if model.form is tp.VECTOR:
        parts = f"norm {result['mae_norm']:.3g}"
    else:
        parts = f"isotropic {result['mae_isotropic']:.3g}, anisotropy {result['mae_anisotropy']:.3g}"
    console.print(f"{model.kernel_spec.name} {model.target}: MAE per component ({model.unit}) {per}; {parts}; "
                  f"equivariance error on rotated copies {result['equivariance_error_abs']:.3g} {model.unit} max "
                  f"({result['equivariance_error_rel']:.1e} of the RMS prediction) on {len(test)} molecules → {out}")
