"""Reading molecules: QM9 in its original xyz layout, qm9pack CSVs and npz, ASE databases, any ASE file.

Everything returns a `MoleculeSet`: atomic numbers and Cartesian positions (Å) per molecule, a
name per molecule, and the QM9 properties (when the source has them) in QM9's own units
(energies in Hartree). Unit conversion lives in `eqkernels.pipelines.molecules`.

QM9: R. Ramakrishnan, P. O. Dral, M. Rupp, O. A. von Lilienfeld, "Quantum chemistry structures and
properties of 134 kilo molecules", Sci. Data 1, 140022 (2014), doi:10.1038/sdata.2014.22.
The original per-molecule xyz layout (that paper, Tables 2 and 3):
    line 1            number of atoms n
    line 2            "gdb <index>" then 15 properties, tab-separated (A B C mu alpha homo lumo gap
                      r2 zpve U0 U H G Cv)
    lines 3..n+2      element, x, y, z (Å), Mulliken charge (e); numbers may use Mathematica's
                      "*^" exponent (1.5*^-6 = 1.5e-6)
    line n+3          harmonic vibrational frequencies (cm⁻¹)
    line n+4          SMILES from GDB-17 and from the relaxed B3LYP geometry
    line n+5          InChI for GDB-17 and for the relaxed geometry
"""
from __future__ import annotations

import ast
import base64
import csv
import io
import lzma
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eqkernels.errors import InputError

# The 15 QM9 properties in file order: (short name, qm9pack column, ASE-db key (schnetpack), unit).
QM9_PROPERTIES: tuple[tuple[str, str, str, str], ...] = (
    ("A", "RotA_GHz", "rotational_constant_A", "GHz"),
    ("B", "RotB_GHz", "rotational_constant_B", "GHz"),
    ("C", "RotC_GHz", "rotational_constant_C", "GHz"),
    ("mu", "Dipole_debye", "dipole_moment", "D"),
    ("alpha", "Polarizability_bohr3", "isotropic_polarizability", "a0^3"),
    ("homo", "HOMO_au", "homo", "Ha"),
    ("lumo", "LUMO_au", "lumo", "Ha"),
    ("gap", "HOMO_LUMO_gap_au", "gap", "Ha"),
    ("r2", "R2_bohr2", "electronic_spatial_extent", "a0^2"),
    ("zpve", "ZPVE_au", "zpve", "Ha"),
    ("U0", "InternalEnergy_0K_au", "energy_U0", "Ha"),
    ("U", "InternalEnergy_298K_au", "energy_U", "Ha"),
    ("H", "Enthalphy_298K_au", "enthalpy_H", "Ha"),
    ("G", "GibbsFreeEnergy_298K_au", "free_energy", "Ha"),
    ("Cv", "Heatcapacity_Cv_cal_mol_K", "heat_capacity", "cal/mol/K"),
)
PROPERTY_NAMES = tuple(p[0] for p in QM9_PROPERTIES)
NATIVE_UNITS = {p[0]: p[3] for p in QM9_PROPERTIES}
_BY_CSV = {p[1]: p[0] for p in QM9_PROPERTIES}
_BY_DB = {p[2]: p[0] for p in QM9_PROPERTIES}

SYMBOLS = ("X", "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Cl",
           "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As", "Se",
           "Br", "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb",
           "Te", "I", "Xe")
ATOMIC_NUMBERS = {s: z for z, s in enumerate(SYMBOLS) if z}

QM9PACK_CSV_NAMES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
QM9PACK_NPZ_NAME = "qm9_qm9pack_compact.npz"


@dataclass
class MoleculeSet:
    """Molecules as ragged lists; `properties[name]` is (N,) float64 in QM9's native units (NaN = absent)."""

    names: list[str]
    numbers: list[np.ndarray]          # each (n_i,) int
    positions: list[np.ndarray]        # each (n_i, 3) float64, Å
    properties: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = ""
    extras: dict[str, list] = field(default_factory=dict)  # e.g. smiles, mulliken, frequencies

    def __len__(self) -> int:
        return len(self.numbers)

    def subset(self, index) -> "MoleculeSet":
        index = np.asarray(index, dtype=np.int64)
        return MoleculeSet([self.names[i] for i in index], [self.numbers[i] for i in index],
                           [self.positions[i] for i in index],
                           {k: v[index] for k, v in self.properties.items()}, self.source,
                           {k: [v[i] for i in index] for k, v in self.extras.items()})

    @property
    def n_atoms(self) -> np.ndarray:
        return np.array([len(z) for z in self.numbers], dtype=np.int64)

    def element_counts(self, elements: tuple[int, ...]) -> np.ndarray:
        """(N, len(elements)) counts of each atomic number per molecule."""
        out = np.zeros((len(self), len(elements)), dtype=np.float64)
        for i, z in enumerate(self.numbers):
            for k, e in enumerate(elements):
                out[i, k] = np.count_nonzero(z == e)
        return out


# ----------------------------------------------------------------------------------------------------------
# Original QM9 xyz

def _qm9_float(token: str) -> float:
    """A number from a QM9 xyz file: plain, Fortran-style or Mathematica `*^` exponent."""
    return float(token.replace("*^", "e"))


def parse_qm9_xyz(text: str, path: str | Path = "<text>") -> dict:
    """Parse one molecule in the original QM9 xyz layout; returns a dict (see module docstring)."""
    lines = text.splitlines()
    if not lines or not text.strip():
        raise InputError("the file is empty", path)
    try:
        n = int(lines[0].split()[0])
    except (ValueError, IndexError):
        raise InputError(f"line 1: expected the number of atoms, got {lines[0][:40]!r}", path) from None
    if n < 1:
        raise InputError(f"line 1: the number of atoms must be positive, got {n}", path)
    if len(lines) < n + 2:
        raise InputError(f"expected {n} atom lines after the header, the file has {max(len(lines) - 2, 0)}", path)
    head = lines[1].split()
    if len(head) < 17 or head[0] != "gdb":
        raise InputError("line 2: expected 'gdb <index>' and 15 properties (QM9 layout)", path)
    try:
        index = int(head[1])
        props = [_qm9_float(t) for t in head[2:17]]
    except ValueError as e:
        raise InputError(f"line 2: {e}", path) from None
    numbers, positions, charges = [], [], []
    for k in range(n):
        parts = lines[2 + k].split()
        if len(parts) < 4:
            raise InputError(f"line {3 + k}: expected 'element x y z [charge]'", path)
        if parts[0] not in ATOMIC_NUMBERS:
            raise InputError(f"line {3 + k}: unknown element {parts[0]!r}", path)
        numbers.append(ATOMIC_NUMBERS[parts[0]])
        try:
            positions.append([_qm9_float(t) for t in parts[1:4]])
            charges.append(_qm9_float(parts[4]) if len(parts) > 4 else math.nan)
        except ValueError as e:
            raise InputError(f"line {3 + k}: {e}", path) from None
    tail = lines[n + 2:n + 5] + [""] * 3
    try:
        freqs = [_qm9_float(t) for t in tail[0].split()]
    except ValueError as e:
        raise InputError(f"line {n + 3}: {e}", path) from None
    return {"name": f"gdb {index}", "index": index, "numbers": np.array(numbers, dtype=np.int64),
            "positions": np.array(positions, dtype=np.float64), "properties": dict(zip(PROPERTY_NAMES, props)),
            "mulliken": np.array(charges), "frequencies": np.array(freqs),
            "smiles": tail[1].split(), "inchi": tail[2].split()}


def _format_qm9_number(value: float) -> str:
    """Shortest exact text of a float, exponents in Mathematica's `*^` form as in QM9's files."""
    text = repr(float(value))
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}*^{int(exponent)}"
    return text


def format_qm9_xyz(index: int, numbers, positions, properties: dict[str, float], *, mulliken=None,
                   frequencies=(), smiles: str = "", inchi: str = "") -> str:
    """Serialise one molecule in the original QM9 xyz layout (inverse of `parse_qm9_xyz`).

    qm9pack keeps one SMILES and one InChI per molecule; they are written in both columns
    (GDB-17 and relaxed geometry) because the split between the two is not in that source.
    """
    numbers = np.asarray(numbers)
    positions = np.asarray(positions, dtype=np.float64)
    charges = np.zeros(len(numbers)) if mulliken is None else np.asarray(mulliken, dtype=np.float64)
    fmt = _format_qm9_number
    out = [str(len(numbers)), "\t".join([f"gdb {int(index)}"] + [fmt(properties[p]) for p in PROPERTY_NAMES]) + "\t"]
    for z, (x, y, w), q in zip(numbers, positions, charges):
        out.append("\t".join([SYMBOLS[int(z)], fmt(x), fmt(y), fmt(w), fmt(q)]))
    out.append("\t".join(fmt(f) for f in frequencies))
    out.append(f"{smiles}\t{smiles}")
    out.append(f"{inchi}\t{inchi}")
    return "\n".join(out) + "\n"


def _is_qm9_xyz(text: str) -> bool:
    lines = text.splitlines()
    return len(lines) > 1 and lines[1].split()[:1] == ["gdb"]


def _from_qm9_records(records: list[dict], source: str) -> MoleculeSet:
    props = {p: np.array([r["properties"][p] for r in records], dtype=np.float64) for p in PROPERTY_NAMES}
    extras = {"smiles": [r["smiles"][-1] if r["smiles"] else "" for r in records],
              "mulliken": [r["mulliken"] for r in records], "frequencies": [r["frequencies"] for r in records],
              "gdb_index": [r["index"] for r in records]}
    return MoleculeSet([r["name"] for r in records], [r["numbers"] for r in records],
                       [r["positions"] for r in records], props, source, extras)


def read_qm9_xyz_files(paths) -> MoleculeSet:
    """Molecules from original QM9 xyz files (one molecule per file)."""
    records = [parse_qm9_xyz(_read_text(p), p) for p in paths]
    return _from_qm9_records(records, ",".join(map(str, paths[:3])) + ("…" if len(paths) > 3 else ""))


def read_qm9_tar(path: str | Path, limit: int | None = None) -> MoleculeSet:
    """Molecules from a tar archive of QM9 xyz files (the figshare `dsgdb9nsd.xyz.tar.bz2`)."""
    records = []
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xyz"):
                    continue
                text = tar.extractfile(member).read().decode()
                records.append(parse_qm9_xyz(text, f"{path}:{member.name}"))
                if limit and len(records) >= limit:
                    break
    except tarfile.TarError as e:
        raise InputError(f"not a readable tar archive ({e})", path) from None
    if not records:
        raise InputError("the archive holds no .xyz files", path)
    records.sort(key=lambda r: r["index"])
    return _from_qm9_records(records, str(path))


# ----------------------------------------------------------------------------------------------------------
# qm9pack CSV and npz

def _read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError("no such file", path) from None
    except IsADirectoryError:
        raise InputError("is a folder, not a file", path) from None
    except OSError as e:
        raise InputError(f"cannot read ({e.strerror})", path) from None
    if path.name.endswith(".xz"):
        try:
            raw = lzma.decompress(raw)
        except lzma.LZMAError:
            raise InputError("not a valid xz file", path) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("not a text file (not UTF-8)", path) from None


def read_qm9pack_csv(paths, limit: int | None = None) -> MoleculeSet:
    """Molecules from qm9pack CSV files (optionally .xz), in the order given."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    names, numbers, positions, extras = [], [], [], {"smiles": [], "gdb_index": [], "mulliken": []}
    props: dict[str, list] = {p: [] for p in PROPERTY_NAMES}
    for path in paths:
        text = _read_text(path)
        if not text.strip():
            raise InputError("the file is empty", path)
        reader = csv.DictReader(io.StringIO(text))
        missing = {"Index", "Elements", "XYZ_Ang", *(_BY_CSV)} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"not a qm9pack CSV: missing columns {', '.join(sorted(missing)[:4])}", path)
        for row_no, row in enumerate(reader, start=2):
            try:
                elements = ast.literal_eval(row["Elements"])
                xyz = np.array(ast.literal_eval(row["XYZ_Ang"]), dtype=np.float64)
                z = np.array([ATOMIC_NUMBERS[e] for e in elements], dtype=np.int64)
                values = {_BY_CSV[c]: float(row[c]) for c in _BY_CSV}
                index = int(row["Index"])
                mulliken = np.array(ast.literal_eval(row["Mulliken_pop"]), float) if row.get("Mulliken_pop") else None
            except (ValueError, SyntaxError, KeyError, TypeError) as e:
                raise InputError(f"line {row_no}: malformed qm9pack row ({type(e).__name__})", path) from None
            if xyz.shape != (len(z), 3):
                raise InputError(f"line {row_no}: {len(z)} elements but coordinates of shape {xyz.shape}", path)
            names.append(f"gdb {index}")
            numbers.append(z)
            positions.append(xyz)
            for k, v in values.items():
                props[k].append(v)
            extras["smiles"].append(row.get("SMILES", ""))
            extras["gdb_index"].append(index)
            extras["mulliken"].append(mulliken)
            if limit and len(names) >= limit:
                break
        if limit and len(names) >= limit:
            break
    return MoleculeSet(names, numbers, positions, {k: np.array(v) for k, v in props.items()},
                       ",".join(map(str, paths)), extras)


def qm9pack_rows(path: str | Path) -> list[dict]:
    """The raw rows (column → text) of a qm9pack CSV, e.g. to write them out as QM9 xyz files."""
    return list(csv.DictReader(io.StringIO(_read_text(path))))


def qm9pack_row_to_xyz(row: dict) -> str:
    """One qm9pack CSV row in the original QM9 xyz layout."""
    elements = ast.literal_eval(row["Elements"])
    return format_qm9_xyz(int(row["Index"]), [ATOMIC_NUMBERS[e] for e in elements], ast.literal_eval(row["XYZ_Ang"]),
                          {_BY_CSV[c]: float(row[c]) for c in _BY_CSV},
                          mulliken=ast.literal_eval(row["Mulliken_pop"]),
                          frequencies=ast.literal_eval(row["Harmonic_Freq_cmi"]),
                          smiles=row["SMILES"], inchi=row["InChi"])


def read_qm9pack_npz(path: str | Path, limit: int | None = None) -> MoleculeSet:
    """Molecules from the compact npz repack of qm9pack (see shared/data PROVENANCE, 1b)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            offsets = f["offsets"]
            n = len(offsets) - 1 if not limit else min(limit, len(offsets) - 1)
            z_all, r_all = f["Z"][:offsets[n]].astype(np.int64), f["R"][:offsets[n]].astype(np.float64)
            props = f["properties"][:n]
            prop_names = [str(s) for s in f["property_names"]]
            gdb = f["gdb_index"][:n]
            smiles = [str(s) for s in f["smiles"][:n]] if "smiles" in f.files else [""] * n
    except FileNotFoundError:
        raise InputError("no such file", path) from None
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"not a qm9pack npz ({type(e).__name__}: {str(e).splitlines()[0][:80]})", path) from None
    numbers = [z_all[offsets[i]:offsets[i + 1]] for i in range(n)]
    positions = [r_all[offsets[i]:offsets[i + 1]] for i in range(n)]
    properties = {_BY_CSV[c]: props[:, k].astype(np.float64) for k, c in enumerate(prop_names) if c in _BY_CSV}
    return MoleculeSet([f"gdb {int(g)}" for g in gdb], numbers, positions, properties, str(path),
                       {"smiles": smiles, "gdb_index": [int(g) for g in gdb]})


def installed_qm9pack_files() -> list[Path]:
    """The CSVs inside an installed `qm9pack` package (pip install qm9pack), or [] if it is absent."""
    import importlib.util

    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        return []
    for root in spec.submodule_search_locations:
        data = Path(root) / "data"
        files = [data / n for n in QM9PACK_CSV_NAMES if (data / n).exists()]
        if files:
            return files
    return []


# ----------------------------------------------------------------------------------------------------------
# Tensor properties: the QM9 polarizability tensor (qm9pack's qm9_polarizability.csv)

TENSOR_COMPONENTS = ("xx", "xy", "yy", "xz", "yz", "zz")     # the six of a symmetric tensor, qm9pack's order
_LOWER_COMPONENTS = {"yx": "xy", "zx": "xz", "zy": "yz"}     # accepted, must equal their mirror
TENSOR_NATIVE_UNITS = {"polarizability": "a0^3"}             # bohr³
POLARIZABILITY_GLOB = "qm9_polarizability*.csv*"
# qm9pack's tensors are not in the frame of QM9's coordinates but in Gaussian's standard orientation:
# `principal_axes` (benchmarks/polarizability_frame.py measures it). The axis order is fixed by the data;
# the axis signs are not in the file, and the third-moment rule is the one that agreed best with a
# bond-additivity fit (74 % of the molecules where the sign matters, 25 % by chance).
QM9PACK_TENSOR_FRAME = "principal-axes"


def tensor_property_names(name: str) -> tuple[str, ...]:
    """The six property keys of a symmetric tensor target, e.g. polarizability_xx … polarizability_zz."""
    return tuple(f"{name}_{c}" for c in TENSOR_COMPONENTS)


def tensor_values(mols: MoleculeSet, name: str) -> np.ndarray | None:
    """(N, 3, 3) symmetric tensors of a tensor property (NaN where absent), or None if the data lacks it."""
    keys = tensor_property_names(name)
    if not all(k in mols.properties for k in keys):
        return None
    xx, xy, yy, xz, yz, zz = (np.asarray(mols.properties[k], np.float64) for k in keys)
    return np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1), np.stack([xz, yz, zz], -1)], -2)


def _gdb_index_of(row: dict, row_no: int, path) -> int:
    """The QM9 index of a row: the Index column, else the number in XYZ_file (dsgdb9nsd_000025.xyz → 25)."""
    try:
        if row.get("Index"):
            return int(row["Index"])
        return int(Path(row["XYZ_file"].strip('"')).stem.split("_")[-1])
    except (KeyError, ValueError, AttributeError):
        raise InputError(f"line {row_no}: no molecule index (Index or XYZ_file dsgdb9nsd_NNNNNN.xyz)", path) from None


def read_tensor_csv(path: str | Path, prefix: str = "A") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric tensors per QM9 molecule from a CSV with columns XYZ_file (or Index) and {prefix}_xx … _zz.

    Returns (gdb indices (n,), tensors (n, 3, 3) float64). If lower-triangle columns (A_yx, A_zx, A_zy)
    are present as well, each must equal its mirror (to 1e-6 relative); a non-symmetric tensor is refused.
    """
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text))
    fields = set(reader.fieldnames or [])
    missing = [f"{prefix}_{c}" for c in TENSOR_COMPONENTS if f"{prefix}_{c}" not in fields]
    if missing:
        raise InputError(f"not a tensor CSV: missing columns {', '.join(missing)}", path)
    lower = {lo: up for lo, up in _LOWER_COMPONENTS.items() if f"{prefix}_{lo}" in fields}
    indices, tensors = [], []
    for row_no, row in enumerate(reader, start=2):
        try:
            v = {c: float(row[f"{prefix}_{c}"]) for c in (*TENSOR_COMPONENTS, *lower)}
        except (TypeError, ValueError):
            raise InputError(f"line {row_no}: tensor components must be numbers", path) from None
        for lo, up in lower.items():
            if abs(v[lo] - v[up]) > 1e-6 * max(1.0, abs(v[up]), abs(v[lo])):
                raise InputError(f"line {row_no}: the tensor is not symmetric ({prefix}_{up} = {v[up]:g}, "
                                 f"{prefix}_{lo} = {v[lo]:g}); a symmetric tensor is expected", path)
        indices.append(_gdb_index_of(row, row_no, path))
        tensors.append([[v["xx"], v["xy"], v["xz"]], [v["xy"], v["yy"], v["yz"]], [v["xz"], v["yz"], v["zz"]]])
    if not indices:
        raise InputError("the tensor CSV holds no rows", path)
    return np.array(indices, dtype=np.int64), np.array(tensors, dtype=np.float64).reshape(-1, 3, 3)


def principal_axes(numbers, positions) -> np.ndarray:
    """(3, 3) rotation whose rows are the molecule's principal axes in its coordinates, Gaussian-style.

    Axes of the nuclear-charge-weighted inertia tensor about the centre of nuclear charge, by increasing
    moment (x: smallest). y and z point where the charge-weighted third moment along them is positive;
    x = y × z, so the rows form a proper rotation.
    """
    w = np.asarray(numbers, np.float64)
    r = np.asarray(positions, np.float64)
    c = r - (w[:, None] * r).sum(0) / w.sum()
    inertia = np.eye(3) * np.sum(w * np.sum(c * c, 1)) - np.einsum("a,ai,aj->ij", w, c, c)
    axes = np.linalg.eigh(inertia)[1].T.copy()
    for k in (1, 2):
        if np.sum(w * (c @ axes[k]) ** 3) < 0:
            axes[k] = -axes[k]
    axes[0] = np.cross(axes[1], axes[2])
    return axes


def principal_frame_to_coordinates(numbers, positions, tensors) -> np.ndarray:
    """(N, 3, 3) tensors given in each molecule's `principal_axes` frame, expressed in its coordinates: Fᵀ A F."""
    out = np.empty_like(np.asarray(tensors, np.float64))
    for k, (z, r, a) in enumerate(zip(numbers, positions, tensors)):
        f = principal_axes(z, r)
        out[k] = f.T @ a @ f
    return out


def attach_tensor(mols: MoleculeSet, path: str | Path, name: str = "polarizability", prefix: str = "A",
                  frame: str = "coordinates") -> MoleculeSet:
    """Add a tensor property to QM9 molecules (matched by gdb index; NaN for molecules without a row), in place.

    frame: "coordinates" when the file's tensors are in the frame of the molecules' positions;
    "principal-axes" when they are in each molecule's `principal_axes` frame (qm9pack's polarizability,
    see `QM9PACK_TENSOR_FRAME`): they are rotated into the coordinates.
    """
    if frame not in ("coordinates", "principal-axes"):
        raise ValueError(f"frame must be 'coordinates' or 'principal-axes', not {frame!r}")
    indices, tensors = read_tensor_csv(path, prefix)
    rows = _rows_by_gdb_index(mols, indices, path)
    t = np.where((rows >= 0)[:, None, None], tensors[np.maximum(rows, 0)], np.nan) if len(rows) else np.zeros((0, 3, 3))
    if frame == "principal-axes":
        t = principal_frame_to_coordinates(mols.numbers, mols.positions, t)
    for key, (i, j) in zip(tensor_property_names(name), ((0, 0), (0, 1), (1, 1), (0, 2), (1, 2), (2, 2))):
        mols.properties[key] = t[:, i, j].copy()
    return mols


# ----------------------------------------------------------------------------------------------------------
# Vector properties: the Mulliken charge dipole, or any NAME_x, NAME_y, NAME_z given per molecule

VECTOR_COMPONENTS = ("x", "y", "z")
MULLIKEN_DIPOLE = "mulliken_dipole"


def vector_property_names(name: str) -> tuple[str, ...]:
    """The three property keys of a vector target, e.g. dipole_x, dipole_y, dipole_z."""
    return tuple(f"{name}_{c}" for c in VECTOR_COMPONENTS)


def mulliken_dipoles(mols: MoleculeSet) -> np.ndarray | None:
    """(N, 3) charge dipoles μ_M = Σ_i q_i (r_i − r̄) (e·Å) from the Mulliken charges (NaN where a molecule
    has none), or None if the data carries no charges at all.

    Taken about the centre of geometry r̄: QM9's charges sum to zero only to print precision (5e-6 e on
    the bundled sample), and this makes μ_M exactly translation-invariant; it rotates as R μ_M.
    """
    charges = mols.extras.get("mulliken")
    if charges is None or all(q is None for q in charges):
        return None
    out = np.full((len(mols), 3), np.nan)
    for k, (q, r) in enumerate(zip(charges, mols.positions)):
        if q is not None and len(q) == len(r):
            out[k] = np.asarray(q, np.float64) @ (r - r.mean(0))
    return out


def vector_values(mols: MoleculeSet, name: str) -> np.ndarray | None:
    """(N, 3) vectors of a vector property (NaN where absent), or None if the data lacks it."""
    if name == MULLIKEN_DIPOLE:
        return mulliken_dipoles(mols)
    keys = vector_property_names(name)
    if not all(k in mols.properties for k in keys):
        return None
    return np.stack([np.asarray(mols.properties[k], np.float64) for k in keys], axis=1)


def csv_target_kind(path: str | Path, name: str) -> str:
    """'vector' if the CSV has columns NAME_x, NAME_y, NAME_z, 'tensor' if NAME_xx … NAME_zz; else one line."""
    fields = set(csv.DictReader(io.StringIO(_read_text(path))).fieldnames or [])
    if all(k in fields for k in vector_property_names(name)):
        return "vector"
    if all(k in fields for k in tensor_property_names(name)):
        return "tensor"
    raise InputError(f"no columns {', '.join(vector_property_names(name))} (a vector) or "
                     f"{name}_xx … {name}_zz (a symmetric tensor)", path)


def read_vector_csv(path: str | Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Vectors per QM9 molecule from a CSV with columns XYZ_file (or Index) and NAME_x, NAME_y, NAME_z.

    Returns (gdb indices (n,), vectors (n, 3) float64).
    """
    reader = csv.DictReader(io.StringIO(_read_text(path)))
    keys = vector_property_names(name)
    missing = [k for k in keys if k not in (reader.fieldnames or [])]
    if missing:
        raise InputError(f"not a vector CSV: missing columns {', '.join(missing)}", path)
    indices, vectors = [], []
    for row_no, row in enumerate(reader, start=2):
        try:
            vectors.append([float(row[k]) for k in keys])
        except (TypeError, ValueError):
            raise InputError(f"line {row_no}: vector components must be numbers", path) from None
        indices.append(_gdb_index_of(row, row_no, path))
    if not indices:
        raise InputError("the vector CSV holds no rows", path)
    return np.array(indices, dtype=np.int64), np.array(vectors, dtype=np.float64).reshape(-1, 3)


def _rows_by_gdb_index(mols: MoleculeSet, indices: np.ndarray, path) -> np.ndarray:
    """For each molecule, the row of `indices` with its QM9 index (−1: none)."""
    if "gdb_index" not in mols.extras:
        raise InputError("these molecules carry no QM9 index to match the file's rows to", mols.source or path)
    where = {int(i): k for k, i in enumerate(indices)}
    return np.array([where.get(int(g), -1) for g in mols.extras["gdb_index"]], dtype=np.int64)


def attach_vector(mols: MoleculeSet, path: str | Path, name: str) -> MoleculeSet:
    """Add a vector property NAME_x, NAME_y, NAME_z (in the frame of the coordinates) to QM9 molecules,
    matched by gdb index (NaN for molecules without a row), in place."""
    indices, vectors = read_vector_csv(path, name)
    rows = _rows_by_gdb_index(mols, indices, path)
    v = np.where((rows >= 0)[:, None], vectors[np.maximum(rows, 0)], np.nan) if len(rows) else np.zeros((0, 3))
    for key, column in zip(vector_property_names(name), v.T):
        mols.properties[key] = column.copy()
    return mols


def attach_target_csv(mols: MoleculeSet, path: str | Path, name: str) -> str:
    """Attach the vector or symmetric-tensor target NAME of a CSV (coordinates' frame); returns its kind."""
    kind = csv_target_kind(path, name)
    if kind == "vector":
        attach_vector(mols, path, name)
    else:
        attach_tensor(mols, path, name, prefix=name, frame="coordinates")
    return kind


def polarizability_file_beside(path: str | Path) -> Path | None:
    """qm9pack's polarizability CSV next to QM9 data (the data's folder or its qm9pack_v1.0.3/), if any."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder, folder / "qm9pack_v1.0.3"):
        found = sorted(candidate.glob(POLARIZABILITY_GLOB)) if candidate.is_dir() else []
        if found:
            return found[0]
    return None


# ----------------------------------------------------------------------------------------------------------
# ASE databases and other ASE files

def _decode_db_value(value) -> float:
    """A property from an ASE db row: a number, an array, or schnetpack's old base64 float64 string."""
    if isinstance(value, (str, bytes)):
        return float(np.frombuffer(base64.b64decode(value), dtype=np.float64)[0])
    return float(np.asarray(value, dtype=np.float64).reshape(-1)[0])


def read_ase_db(path: str | Path, limit: int | None = None) -> MoleculeSet:
    """Molecules from an ASE SQLite database in schnetpack's QM9 layout (old or new data format).

    New format (schema 9): `row.data[key]` arrays, units in metadata['_property_unit_dict'] (QM9 units).
    Old format: base64 float64 strings in `row.data`, no unit dictionary; schnetpack ≤ 0.3 stored
    QM9 energies in eV, which is converted back to Hartree here.
    """
    import ase.db
    from ase.units import Hartree

    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    try:
        db = ase.db.connect(str(path), type="db")
        metadata = db.metadata
        rows = list(db.select(limit=limit) if limit else db.select())
    except Exception as e:  # ase raises sqlite3 errors of several kinds for a non-database file
        raise InputError(f"not a readable ASE database ({type(e).__name__})", path) from None
    if not rows:
        raise InputError("the database holds no molecules", path)
    units = metadata.get("_property_unit_dict")
    props: dict[str, list] = {}
    names, numbers, positions = [], [], []
    for k, row in enumerate(rows):
        names.append(row.get("name", f"{path.stem}#{row.id}"))
        numbers.append(np.asarray(row.numbers, dtype=np.int64))
        positions.append(np.asarray(row.positions, dtype=np.float64))
        data = dict(row.data) if row.get("data") is not None else {}
        data.update(row.key_value_pairs)
        for key, value in data.items():
            if key.startswith("_") or key not in _BY_DB:
                continue
            v = _decode_db_value(value)
            if units is None and isinstance(value, (str, bytes)) and NATIVE_UNITS[_BY_DB[key]] == "Ha":
                v = v / Hartree
            props.setdefault(_BY_DB[key], [math.nan] * len(rows))[k] = v
    return MoleculeSet(names, numbers, positions, {k: np.array(v) for k, v in props.items()}, str(path),
                       {"atomrefs": [metadata.get("atomrefs")]})


def read_ase_file(path: str | Path) -> MoleculeSet:
    """Every structure in a file ASE can read (xyz, extxyz, sdf, pdb, cif, …); properties are not read."""
    import ase.io

    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    if path.is_dir():
        raise InputError("is a folder, not a molecule file", path)
    if path.stat().st_size == 0 or not path.read_bytes().strip():
        raise InputError("the file is empty", path)
    try:
        frames = ase.io.read(str(path), index=":")
    except Exception as e:  # ASE's readers raise many types for malformed text
        msg = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise InputError(f"cannot read as a molecule file ({msg})", path) from None
    if not isinstance(frames, list):
        frames = [frames]
    if not frames or all(len(a) == 0 for a in frames):
        raise InputError("no atoms found in the file", path)
    stem = path.name
    names = [stem if len(frames) == 1 else f"{stem}#{i + 1}" for i in range(len(frames))]
    return MoleculeSet(names, [np.asarray(a.numbers, dtype=np.int64) for a in frames],
                       [np.asarray(a.positions, dtype=np.float64) for a in frames], {}, str(path))


# ----------------------------------------------------------------------------------------------------------
# One entry point

def load_molecules(path: str | Path, limit: int | None = None) -> MoleculeSet:
    """Read molecules from any supported source, chosen by what `path` is.

    - "qm9pack": the CSVs of an installed qm9pack package;
    - a folder: its qm9pack npz, else its qm9pack CSVs (optionally .xz), else its QM9 xyz files;
    - *.csv / *.csv.xz: qm9pack CSV; *.npz: qm9pack compact npz; *.db: ASE database;
    - *.tar, *.tar.bz2, *.tgz…: archive of QM9 xyz files;
    - *.xyz in the QM9 layout ("gdb" on line 2); anything else ASE reads.

    QM9 molecules (qm9pack CSV/npz, xyz) also get the polarizability tensor (properties
    polarizability_xx … _zz, bohr³, rotated into the frame of the coordinates) when qm9pack's
    qm9_polarizability CSV lies beside them.
    """
    mols = _load_molecules(path, limit)
    beside = None if str(path) == "qm9pack" or "gdb_index" not in mols.extras else polarizability_file_beside(path)
    if beside is not None:
        attach_tensor(mols, beside, "polarizability", "A", frame=QM9PACK_TENSOR_FRAME)
    return mols


def _load_molecules(path: str | Path, limit: int | None = None) -> MoleculeSet:
    """`load_molecules` without the tensor properties that may lie beside the data."""
    if str(path) == "qm9pack":
        files = installed_qm9pack_files()
        if not files:
            raise InputError("the qm9pack package is not installed (pip install qm9pack)", "qm9pack")
        return read_qm9pack_csv(files, limit)
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        if (path / QM9PACK_NPZ_NAME).exists():
            return read_qm9pack_npz(path / QM9PACK_NPZ_NAME, limit)
        for folder in (path, path / "qm9pack_v1.0.3"):
            csvs = [c for n in QM9PACK_CSV_NAMES for c in (folder / n, folder / f"{n}.xz") if c.exists()]
            if csvs:
                return read_qm9pack_csv(csvs, limit)
        xyz = sorted(path.glob("*.xyz"))[:limit] if limit else sorted(path.glob("*.xyz"))
        if xyz:
            return read_qm9_xyz_files(xyz)
        raise InputError("folder holds no qm9pack npz/CSV and no .xyz files", path)
    if not path.exists():
        raise InputError("no such file", path)
    if name.endswith((".csv", ".csv.xz")):
        return read_qm9pack_csv([path], limit)
    if name.endswith(".npz"):
        return read_qm9pack_npz(path, limit)
    if name.endswith(".db"):
        return read_ase_db(path, limit)
    if name.endswith((".tar", ".tar.bz2", ".tbz2", ".tar.gz", ".tgz", ".tar.xz")):
        return read_qm9_tar(path, limit)
    if name.endswith(".xyz"):
        text = _read_text(path)
        if not text.strip():
            raise InputError("the file is empty", path)
        if _is_qm9_xyz(text):
            return _from_qm9_records([parse_qm9_xyz(text, path)], str(path))
    return read_ase_file(path)
