"""Loading QM9 and other molecule files, units, atom references and splits (bundled real data)."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from eqkernels.datasets import QM9_ASE_DB_SAMPLE, QM9_SAMPLE
from eqkernels.errors import InputError
from eqkernels.pipelines import molecules as mp

SHARED_QM9 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "qm9"

# Hand-written from the documented QM9 layout (Ramakrishnan et al. 2014, Table 2): methane, gdb 1,
# with the published values; one coordinate and one charge use Mathematica's "*^" exponent.
METHANE_XYZ = """5
gdb 1\t157.7118\t157.70997\t157.70699\t0.\t13.21\t-0.3877\t0.1171\t0.5048\t35.3641\t0.044749\t-40.47893\t-40.476062\t-40.475117\t-40.498597\t6.469\t
C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689
H\t 0.002150416\t-0.0060313176\t 0.0019761204\t 0.133921
H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.1339
H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923
H\t-0.5238136345\t 1.4379326443\t 0.9063972942\t 1.5*^-2
1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078
C\tC
InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4
"""


@pytest.fixture(scope="module")
def sample():
    return mp.load_molecules(QM9_SAMPLE)


def test_hand_written_qm9_xyz_parses_with_mathematica_exponents(tmp_path):
    f = tmp_path / "dsgdb9nsd_000001.xyz"
    f.write_text(METHANE_XYZ)
    mols = mp.load_molecules(f)
    assert mols.names == ["gdb 1"]
    assert mols.numbers[0].tolist() == [6, 1, 1, 1, 1]
    assert mols.properties["U0"][0] == pytest.approx(-40.47893, abs=1e-9)
    assert mols.properties["mu"][0] == 0.0
    assert mols.positions[0][1, 0] == pytest.approx(0.002150416, abs=1e-12)
    assert mols.extras["mulliken"][0][4] == pytest.approx(0.015, abs=1e-12)
    assert mols.extras["smiles"][0] == "C"
    assert len(mols.extras["frequencies"][0]) == 9


def test_qm9pack_rows_round_trip_through_original_xyz_format(tmp_path, sample):
    rows = mp.qm9pack_rows(QM9_SAMPLE)[:60]
    for row in rows:
        (tmp_path / f"dsgdb9nsd_{int(row['Index']):06d}.xyz").write_text(mp.qm9pack_row_to_xyz(row))
    # A value below 1e-4 must be written with the "*^" exponent, as QM9's own files do.
    text = mp.format_qm9_xyz(1, [6], [[1.5e-6, 0.0, -2.25e-5]], {p: 0.0 for p in mp.PROPERTY_NAMES})
    assert "1.5*^-6" in text and "-2.25*^-5" in text
    back = mp.load_molecules(tmp_path)  # a folder of QM9 xyz files
    ref = sample.subset(range(60))
    assert back.names == ref.names
    for a, b in zip(back.positions, ref.positions):
        np.testing.assert_array_equal(a, b)  # exact: the writer uses the shortest exact decimal
    for a, b in zip(back.numbers, ref.numbers):
        np.testing.assert_array_equal(a, b)
    for p in mp.PROPERTY_NAMES:
        np.testing.assert_array_equal(back.properties[p], ref.properties[p])


def test_qm9_tar_archive(tmp_path):
    import tarfile

    rows = mp.qm9pack_rows(QM9_SAMPLE)[:5]
    arc = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    with tarfile.open(arc, "w:bz2") as tar:
        for row in rows:
            f = tmp_path / f"dsgdb9nsd_{int(row['Index']):06d}.xyz"
            f.write_text(mp.qm9pack_row_to_xyz(row))
            tar.add(f, arcname=f.name)
    mols = mp.load_molecules(arc)
    assert mols.names == [f"gdb {int(r['Index'])}" for r in rows]


def test_bundled_qm9pack_sample(sample):
    assert len(sample) == 2000
    assert sample.n_atoms.min() >= 3 and sample.n_atoms.max() <= 29
    assert set(np.concatenate(sample.numbers).tolist()) <= {1, 6, 7, 8, 9}
    # first row: gdb 25, N#CC#N (cyanogen), U0 = −185.648533 Ha
    assert sample.names[0] == "gdb 25"
    assert sample.numbers[0].tolist() == [7, 6, 6, 7]
    assert sample.properties["U0"][0] == pytest.approx(-185.648533, abs=1e-9)
    counts = sample.element_counts((1, 6, 7, 8, 9))
    assert counts[0].tolist() == [0, 2, 2, 0, 0]
    np.testing.assert_array_equal(counts.sum(1), sample.n_atoms)


def test_ase_db_new_format_and_atomrefs():
    mols = mp.load_molecules(QM9_ASE_DB_SAMPLE)
    assert len(mols) == 20
    assert mols.numbers[0].tolist() == [6, 1, 1, 1, 1]          # gdb 1 methane
    assert mols.properties["U0"][0] == pytest.approx(-40.47893, abs=1e-9)
    assert mols.properties["homo"][0] == pytest.approx(-0.3877, abs=1e-9)
    refs = mp.atom_references()["U0"]
    assert refs[1] == pytest.approx(-0.500273) and refs[6] == pytest.approx(-37.846772)
    assert refs[7] == pytest.approx(-54.583861) and refs[8] == pytest.approx(-75.064579)
    assert refs[9] == pytest.approx(-99.71873)
    # methane atomization energy U0 − Σ refs = −0.631066 Ha ≈ −17.172 eV (≈ 396 kcal/mol)
    atomization = mols.properties["U0"][0] - refs[6] - 4 * refs[1]
    assert mp.convert_units(atomization, "Ha", "eV") == pytest.approx(-17.1722, abs=1e-3)


def test_ase_db_old_base64_format(tmp_path):
    import ase.db
    from ase import Atoms

    path = tmp_path / "old.db"
    value_ev = -1101.48779  # gdb 1 in eV, stored as schnetpack ≤ 0.3 did
    with ase.db.connect(str(path)) as db:
        db.write(Atoms("CH4", positions=np.random.default_rng(0).normal(size=(5, 3)) * 2),
                 data={"energy_U0": base64.b64encode(np.array([value_ev]).tobytes()).decode(),
                       "_shape_energy_U0": [1], "_dtype_energy_U0": "float64"})
    mols = mp.load_molecules(path)
    assert mols.properties["U0"][0] == pytest.approx(-40.47893, abs=1e-5)


@pytest.mark.skipif(not (SHARED_QM9 / "schnetpack_fixtures" / "qm9_first500_U0eV.db").exists(),
                    reason="shared/data/qm9 is not beside the repository")
def test_shared_old_schnetpack_db_agrees_with_qm9pack():
    old = mp.load_molecules(SHARED_QM9 / "schnetpack_fixtures" / "qm9_first500_U0eV.db")
    assert len(old) == 500
    assert old.properties["U0"][0] == pytest.approx(-40.47893, abs=1e-5)


@pytest.mark.skipif(not (SHARED_QM9 / "qm9_qm9pack_compact.npz").exists(),
                    reason="shared/data/qm9 is not beside the repository")
def test_full_qm9_npz():
    full = mp.load_molecules(SHARED_QM9)
    assert len(full) == 130831
    assert full.names[0] == "gdb 1" and full.properties["U0"][0] == pytest.approx(-40.47893, abs=1e-9)
    assert full.names[-1] == "gdb 133885" and full.properties["U0"][-1] == pytest.approx(-400.633052, abs=1e-9)


def test_any_ase_file_formats(tmp_path):
    from ase import Atoms
    from ase.io import write

    atoms = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    for suffix in ("xyz", "extxyz", "pdb", "sdf"):
        f = tmp_path / f"water.{suffix}"
        if suffix == "sdf":
            f.write_text("water\n  test\n\n  3  2  0  0  0  0  0  0  0  0999 V2000\n"
                         "    0.0000    0.0000    0.0000 O   0  0\n    0.9600    0.0000    0.0000 H   0  0\n"
                         "   -0.2400    0.9300    0.0000 H   0  0\n  1  2  1  0\n  1  3  1  0\nM  END\n$$$$\n")
        else:
            write(str(f), atoms)
        mols = mp.load_molecules(f)
        assert sorted(mols.numbers[0].tolist()) == [1, 1, 8], suffix
        assert np.allclose(sorted(np.linalg.norm(mols.positions[0] - mols.positions[0][mols.numbers[0] == 8], axis=1)),
                           [0, 0.9600, 0.9605], atol=2e-3), suffix


def test_units():
    assert mp.convert_units(1.0, "Ha", "eV") == pytest.approx(27.211386, rel=1e-6)
    assert mp.convert_units(1.0, "Ha", "kcal/mol") == pytest.approx(627.5095, rel=1e-5)
    assert mp.convert_units(1.0, "eV", "meV") == pytest.approx(1000.0)
    assert mp.convert_units(2.0, "kcal/mol", "kcal/mol") == 2.0
    with pytest.raises(InputError):
        mp.convert_units(1.0, "Ha", "furlong")


def test_splits_are_deterministic_and_disjoint():
    a_train, a_test = mp.split_indices(2000, 100, 300, seed=3)
    b_train, b_test = mp.split_indices(2000, 100, 300, seed=3)
    c_train, _ = mp.split_indices(2000, 100, 300, seed=4)
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_test, b_test)
    assert not np.array_equal(a_train, c_train)
    assert len(a_train) == 100 and len(a_test) == 300 and not set(a_train) & set(a_test)
    # the first 100 of a larger split are the same molecules: learning curves are nested
    big, _ = mp.split_indices(2000, 200, 300, seed=3)
    perm = np.random.default_rng(3).permutation(2000)
    np.testing.assert_array_equal(np.sort(perm[:100]), a_train)
    assert set(a_train) <= set(big)


def test_installed_qm9pack_package_is_found(tmp_path, monkeypatch):
    import importlib
    import lzma
    import sys

    package = tmp_path / "site" / "qm9pack"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    lines = lzma.decompress(QM9_SAMPLE.read_bytes()).decode().splitlines(keepends=True)
    (package / "data" / "qm9_part1.csv").write_text("".join(lines[:11]))   # header + 10 rows, as in the wheel
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    sys.modules.pop("qm9pack", None)
    assert mp.installed_qm9pack_files() == [package / "data" / "qm9_part1.csv"]
    mols = mp.load_molecules("qm9pack")
    assert len(mols) == 10 and mols.names[0] == "gdb 25"
    sys.modules.pop("qm9pack", None)


def test_qm9pack_missing_gives_one_line_error(monkeypatch):
    monkeypatch.setattr(mp, "installed_qm9pack_files", lambda: [])
    from eqkernels.pipelines import qm9io

    monkeypatch.setattr(qm9io, "installed_qm9pack_files", lambda: [])
    with pytest.raises(InputError, match="qm9pack package is not installed"):
        mp.load_molecules("qm9pack")
