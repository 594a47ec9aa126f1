"""`eqk demo`: the main job on the bundled real data, within a time budget."""
from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from eqkernels.apps._common import atomic_dir, console
from eqkernels.store import write_json


def demo(
    out: Path = typer.Option(Path("eqk-demo"), "--out", "-o", help="Folder for the reports."),
    budget: float = typer.Option(600.0, help="Seconds for the whole demo (2 cores: about 10 minutes)."),
    size: int = typer.Option(16, help="Histology tiles are resized to size×size px (PathMNIST is 28)."),
    molecules: bool = typer.Option(True, help="Also run the molecules part."),
):
    """Train CNN, C4-averaged, C4-GCNN and D4-GCNN kernels on bundled PathMNIST tiles (and molecule
    kernels on bundled QM9 molecules) and compare accuracy, rotation robustness and time."""
    from eqkernels.pipelines import histology_demo

    start = time.perf_counter()
    mol_runner = _molecules_runner() if molecules else None
    histology_share = 0.55 if mol_runner else 0.9
    summary = {"budget_s": budget}
    with atomic_dir(out) as tmp:
        console.rule("[bold]histology: PathMNIST tiles")
        hist = histology_demo.run(tmp / "histology", seconds=budget * histology_share, size=size, progress=None)
        summary["histology"] = hist
        table = Table(title=f"Histology: {hist['n_train']} training / {hist['n_test']} held-out PathMNIST tiles "
                            f"at {hist['size']} px")
        for col in ("kernel", "accuracy", "accuracy on rotated tiles", "orbit-same (of 4)", "seconds"):
            table.add_column(col, justify="left" if col == "kernel" else "right")
        for m in hist["models"]:
            table.add_row(m["kernel"], f"{m['accuracy']:.3f}", f"{m['accuracy_rotated_mean']:.3f}",
                          f"{m['orbit_same_predictions']:.2f}", f"{hist['extra'][m['kernel']]['seconds']:.1f}")
        console.print(table)
        console.print(f"kernel throughput {hist['rate_measured']:,.0f} pairs/s; seconds = this model's own kernel "
                      f"pairs at that rate + solve + predict (the demo shares one D4 computation)")
        if hist.get("map"):
            console.print(_map_line(hist["map"], out))
        if mol_runner is not None:
            console.rule("[bold]molecules: QM9")
            remaining = budget - (time.perf_counter() - start)
            mol = mol_runner(tmp / "molecules", max(remaining * 0.9, 30.0))
            summary["molecules"] = mol
            console.print(_molecule_table(mol))
        summary["seconds_total"] = time.perf_counter() - start
        write_json(tmp / "summary.json", summary)
    console.print(f"demo finished in {time.perf_counter() - start:.0f} s; reports in {out}/ "
                  f"(histology/report.md{', molecules/' if mol_runner else ''})")


def _map_line(m: dict, out: Path) -> str:
    """One line on the demo's slide map: tiles, speed, rotation check, agreement with the layout."""
    rot = m["rotation_check"]
    rate = f"{m['tiles_per_s']:.2f}" if m.get("tiles_per_s") else "n/a"
    return (f"slide map ({m['kernel']}, test slide of bundled NCT tiles): {m['tissue_tiles']} tissue tiles in "
            f"{m['seconds']:.1f} s ({rate} tiles/s, each predicted as is and rotated by 90°); class changes under "
            f"rotation on {rot['tiles_changed']} of {rot['tiles']}; agrees with the layout on "
            f"{m['layout_accuracy']:.0%} of tiles → {out}/histology/map/class_map.png")


def _molecules_runner():
    """The molecules demo, if this installation has the molecules pipeline."""
    try:
        from eqkernels.pipelines import molecules_demo
    except ImportError:
        return None
    return getattr(molecules_demo, "run_demo", None)


def _molecule_table(rows: list[dict]) -> Table:
    """The molecules part's rows (U0 in meV on held-out molecules of the bundled sample) as a table."""
    table = Table(title="Molecules: U0 on held-out molecules of the bundled QM9 sample")
    for col in ("kernel", "training molecules", "held-out", "MAE (meV)", "MAE rotated+permuted (meV)",
                "invariance error", "quadrature (degree, per-atom error)", "seconds"):
        table.add_column(col, justify="left" if col == "kernel" else "right")
    for r in rows:
        degree = r.get("quadrature_degree")
        quad = "—" if degree is None else f"{degree}, {r['quadrature_error']:.1e}" + (
            " speed option" if r.get("quadrature_below_default") else "")
        table.add_row(r["kernel"], str(r["n_train"]), str(r["n_test"]), f"{r['mae_meV']:.0f}",
                      f"{r['mae_rotated_meV']:.0f}", f"{r['invariance_error_rel']:.1e}", quad, f"{r['seconds']:.1f}")
    return table
