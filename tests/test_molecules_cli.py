"""`eqk molecules` end to end on a small split, and every kind of bad input through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eqkernels.apps.cli import main
from eqkernels.datasets import QM9_SAMPLE
from eqkernels.pipelines import molecules as mp
from eqkernels.pipelines.molecules_model import load_model

N_TRAIN = 24


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mol")
    path = folder / "model.h5"
    code = main(["molecules", "train", "--kernel", "so3gcnn", "--n-train", str(N_TRAIN), "--quadrature", "5",
                 "--out", str(path)])
    assert code == 0 and path.exists()
    return path


@pytest.fixture(scope="module")
def xyz_files(tmp_path_factory):
    """Two held-out QM9 molecules written in the original QM9 xyz layout, plus their U0 in eV."""
    folder = tmp_path_factory.mktemp("xyz")
    rows = mp.qm9pack_rows(QM9_SAMPLE)
    train_idx, _ = mp.split_indices(len(rows), N_TRAIN, None, 0)
    held = [i for i in range(len(rows)) if i not in set(train_idx)][:2]
    files, u0 = [], []
    for i in held:
        f = folder / f"dsgdb9nsd_{int(rows[i]['Index']):06d}.xyz"
        f.write_text(mp.qm9pack_row_to_xyz(rows[i]))
        files.append(f)
        u0.append(float(rows[i]["InternalEnergy_0K_au"]) * 27.211386245988)
    return files, np.array(u0)


def _run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_model_file_holds_what_prediction_needs(model_file):
    from eqkernels import store

    meta, arrays = store.load(model_file, "molecule-model")
    assert meta["target"] == "U0" and meta["unit"] == "eV" and meta["kernel_spec"]["name"] == "so3gcnn"
    assert meta["env_spec"]["l_max"] == 3 and meta["atomrefs"]["6"] == pytest.approx(-37.846772 * 27.211386, rel=1e-6)
    assert {"x_train", "mol_train", "alpha", "y_train", "channel_scale", "l0_mean", "element_coef"} <= set(arrays)
    assert arrays["alpha"].shape == (N_TRAIN,) and "jax" in meta["versions"]
    assert meta["quadrature_error"] < 0.05
    # degree 5 is a speed option: flagged, and its error measured where it is largest (self pairs, rotated copies)
    assert meta["quadrature_degree"] == 5 and meta["quadrature_below_default"] is True
    assert meta["quadrature_error"] == max(meta["quadrature_error_self_pair"], meta["quadrature_error_rotation"])
    assert meta["quadrature_error"] > 1e-3 and meta["invariance_error_rel_train"] > 0


def test_predict_lines_and_json(model_file, xyz_files, capsys):
    files, u0 = xyz_files
    code, out, err = _run(["molecules", "predict", str(model_file), *map(str, files)], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2
    for line, f, ref in zip(lines, files, u0):
        name, value, unit = line.split("\t")
        assert name == str(f) and unit == "eV"
        # 24 training molecules: the atom references and per-element fit get within a few eV of U0 (~−10⁴ eV)
        assert abs(float(value) - ref) < 5.0
    code, out, _ = _run(["molecules", "predict", str(model_file), str(files[0]), "--json", "--unit", "kcal/mol"],
                        capsys)
    assert code == 0
    rows = json.loads(out)
    assert rows[0]["unit"] == "kcal/mol" and rows[0]["target"] == "U0"
    assert rows[0]["value"] == pytest.approx(float(lines[0].split("\t")[1]) * 23.0605, rel=1e-4)


def test_predict_is_invariant_to_rotation_translation_and_atom_order(model_file, tmp_path, capsys):
    from ase import Atoms
    from ase.io import write

    mols = mp.load_molecules(QM9_SAMPLE, limit=1200).subset([1100])
    moved = mp.transformed_copies(mols, seed=7)
    for m, name in ((mols, "a.xyz"), (moved, "b.xyz")):
        write(str(tmp_path / name), Atoms(numbers=m.numbers[0], positions=m.positions[0]))
    code, out, _ = _run(["molecules", "predict", str(model_file), str(tmp_path / "a.xyz"), str(tmp_path / "b.xyz")],
                        capsys)
    assert code == 0
    a, b = (float(line.split("\t")[1]) for line in out.strip().splitlines())
    assert abs(a - b) < 0.05  # eV; the quadrature-limited part only (degree 5 here)


def test_report_writes_metrics_and_learning_curve(model_file, tmp_path, capsys):
    out_dir = tmp_path / "report"
    code, out, err = _run(["molecules", "report", str(model_file), "--out", str(out_dir), "--n-test", "30"], capsys)
    assert code == 0, err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["n_test"] == 30 and report["kernel"] == "so3gcnn"
    assert 0 < report["mae"] < 3.0 and report["rmse"] >= report["mae"]          # eV
    assert abs(report["mae_transformed"] - report["mae"]) < 0.05
    assert [r["n_train"] for r in report["learning_curve"]][-1] == N_TRAIN
    assert report["quadrature_below_default"] is True and "speed option" in out
    png = (out_dir / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert len((out_dir / "predictions.csv").read_text().splitlines()) == 31


def test_model_from_a_newer_version_is_refused(model_file, tmp_path, capsys):
    from eqkernels import store

    meta, arrays = store.load(model_file, "molecule-model")
    newer = dict(meta, model_version=99)
    store.save(tmp_path / "newer.h5", "molecule-model", newer, arrays)
    code, out, err = _run(["molecules", "predict", str(tmp_path / "newer.h5"), str(QM9_SAMPLE)], capsys)
    assert code == 2 and out == ""
    assert "newer.h5" in err and "molecule model version 99" in err and "Traceback" not in err
    odd = dict(meta, kernel_spec=dict(meta["kernel_spec"], spec_version=7))
    store.save(tmp_path / "odd.h5", "molecule-model", odd, arrays)
    code, _, err = _run(["molecules", "predict", str(tmp_path / "odd.h5"), str(QM9_SAMPLE)], capsys)
    assert code == 2 and "kernel spec version 7" in err
    (tmp_path / "not-a-model.h5").write_text("hello")
    code, _, err = _run(["molecules", "predict", str(tmp_path / "not-a-model.h5"), str(QM9_SAMPLE)], capsys)
    assert code == 2 and "not-a-model.h5" in err and len(err.strip().splitlines()) == 1


BAD_FILES = {
    "unknown_element.xyz": ("3\n\nC 0 0 0\nCl 1.8 0 0\nH -1.0 0 0\n", "element Cl"),
    "nan_coordinates.xyz": ("2\n\nC 0 0 0\nH nan 0 0\n", "NaN or infinity"),
    "inf_coordinates.xyz": ("2\n\nC 0 0 0\nH inf 0 0\n", "NaN or infinity"),
    "overlapping.xyz": ("3\n\nC 0 0 0\nH 0.01 0 0\nH 1.1 0 0\n", "overlap"),
    "empty.xyz": ("", "empty"),
    "malformed.xyz": ("3\n\nC 0 0 0\nH one two three\n", "cannot read"),
    "malformed_qm9.xyz": ("2\ngdb 1\t1\t2\nC 0 0 0 0\nH 1 0 0 0\n", "line 2"),
    "truncated_qm9.xyz": ("5\ngdb 1" + "\t1.0" * 15 + "\nC 0 0 0 0\n", "expected 5 atom lines"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_input_files_give_one_line_naming_file_and_problem(model_file, xyz_files, tmp_path, capsys, name):
    text, problem = BAD_FILES[name]
    bad = tmp_path / name
    bad.write_text(text)
    good = xyz_files[0][0]
    code, out, err = _run(["molecules", "predict", str(model_file), str(good), str(bad)], capsys)
    assert code == 2
    assert out == ""  # no partial output: the good file before it is not printed either
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eqk: error: ")
    assert str(bad) in lines[0] and problem in lines[0], lines[0]


def test_more_atoms_than_the_model_supports(model_file, tmp_path, capsys):
    from ase import Atoms
    from ase.io import write

    meta_max = load_model(model_file).max_atoms
    n = meta_max + 1
    chain = Atoms("C" * n, positions=[[1.5 * i, 0, 0] for i in range(n)])
    write(str(tmp_path / "long.xyz"), chain)
    code, out, err = _run(["molecules", "predict", str(model_file), str(tmp_path / "long.xyz")], capsys)
    assert code == 2 and out == ""
    assert f"{n} atoms, more than the {meta_max}" in err and "long.xyz" in err


def test_missing_file_and_bad_options(model_file, tmp_path, capsys):
    code, out, err = _run(["molecules", "predict", str(model_file), str(tmp_path / "nope.xyz")], capsys)
    assert code == 2 and "nope.xyz: no such file" in err
    out_model = tmp_path / "x.h5"
    code, _, err = _run(["molecules", "train", "--kernel", "transformer", "--out", str(out_model)], capsys)
    assert code == 2 and "unknown kernel 'transformer'" in err and not out_model.exists()
    code, _, err = _run(["molecules", "train", "--target", "U7", "--n-train", "5", "--out", str(out_model)], capsys)
    assert code == 2 and "unknown target 'U7'" in err and not out_model.exists()
    code, _, err = _run(["molecules", "train", "--n-train", "5000", "--out", str(out_model)], capsys)
    assert code == 2 and "--n-train" in err and not out_model.exists()
    code, _, err = _run(["molecules", "train", "--data", str(tmp_path / "empty.csv"), "--out", str(out_model)],
                        capsys) if (tmp_path / "empty.csv").write_text("") is not None else (None, None, None)
    assert code == 2 and "empty" in err and not out_model.exists()
    code, _, err = _run(["molecules", "report", str(model_file), "--out", str(tmp_path / "r"), "--data",
                         str(tmp_path / "nope.db")], capsys)
    assert code == 2 and "nope.db: no such file" in err and not (tmp_path / "r").exists()


def test_kernel_seconds_is_the_training_kernels_time_not_the_invariance_checks(monkeypatch):
    """`kernel_seconds` in the model meta is the time of the N×N training kernel: the stats of the
    first kernel call, recorded here by wrapping `MoleculeKernel.compute`; the invariance check that
    follows on the same kernel object (8 molecules × N) must not overwrite it (it did before)."""
    from eqkernels.molecule_kernel import MoleculeKernel
    from eqkernels.pipelines.molecules_model import fit_model
    from eqkernels.so3 import AtomKernelSpec

    calls, compute = [], MoleculeKernel.compute

    def recording(self, *args, **kwargs):
        out = compute(self, *args, **kwargs)
        calls.append((kwargs.get("description") or "", out.stats.seconds))
        return out

    monkeypatch.setattr(MoleculeKernel, "compute", recording)
    mols = mp.load_molecules(QM9_SAMPLE).subset(np.arange(30))
    model = fit_model(mols, "U0", "mlp", kernel_spec=AtomKernelSpec("mlp"), progress=False)
    assert calls[0][0].startswith("training kernel") and len(calls) >= 2
    assert model.meta["kernel_seconds"] == calls[0][1] != calls[-1][1]
