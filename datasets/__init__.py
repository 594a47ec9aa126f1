"""Bundled real sample data (installed as `eqkernels.datasets`); see README.md and each CARD.md.

Folder names contain hyphens on purpose: they are data, not importable packages.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent

PATHMNIST_SAMPLE = ROOT / "pathmnist-test-subset718" / "pathmnist.npz"
NCT_CRC_SAMPLE = ROOT / "nct-crc-he-100k-sample"
KATHER2016_8X8 = ROOT / "kather2016-chmnist-8x8" / "hmnist_8_8_RGB.csv"
QM9_SAMPLE = ROOT / "qm9-sample" / "qm9pack_sample2000.csv.xz"
QM9_ASE_DB_SAMPLE = ROOT / "qm9-sample" / "test_qm9_20mols_allprops.db"
QM9_POLARIZABILITY_SAMPLE = ROOT / "qm9-sample" / "qm9_polarizability_sample2000.csv.xz"
IHC_SAMPLE = ROOT / "skimage-ihc" / "ihc.png"


def verify() -> dict[str, bool]:
    """Check every bundled file against SHA256SUMS: {relative path: matches}."""
    out = {}
    for line in (ROOT / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = ROOT / name
        out[name] = path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == digest
    return out
