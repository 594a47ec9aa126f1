"""Atom environments as signals on the sphere, in real spherical-harmonic coefficients (e3nn-jax).

For atom i, each neighbour j (j ≠ i, |r_ij| < cutoff) puts a bump on the sphere of directions,
centred at r̂_ij = (r_j − r_i)/|r_ij|, into the channel of its element e and each radial channel k:

    s_i^{e,k}(n̂) = Σ_{j≠i, Z_j=e} w_k(i, j) · g(n̂ · r̂_ij),   g(t) = exp(−(t − 1)²/β)

with the angular profile of the ENTK authors (Misof, Kessel & Gerken 2025): β = −(cos θ_w − 1)²/ln 0.05,
so the bump falls to 5 % at θ_w (45° by default). By the Funk–Hecke theorem g(n̂·r̂) = Σ_l λ_l Σ_m
Y_lm(n̂) Y_lm(r̂) with λ_l = 2π ∫₋₁¹ g(t) P_l(t) dt, so the coefficients are exactly
x_{lm} = Σ_j w_k λ_l Y_lm(r̂_ij), truncated at degree L. Radial weights w_k:

- "gaussian": exp(−(r − μ_k)²/(2σ²)) · f_c(r), μ_k evenly spaced in [r_min, cutoff], σ the spacing,
  f_c(r) = ½(cos(π r/r_c) + 1) for r < r_c (smooth cutoff: features are continuous as atoms cross r_c);
- "power": Z_i Z_j / r^p for each p in `powers` (the authors' choice, p ∈ {2, 6}), times f_c when
  a finite cutoff is set.

Optionally (`centre_channels`) one constant signal per centre element (`centre_weight` times a one-hot
of Z_i as the l = 0 coefficient), so one shared per-atom network can tell an H from a C environment.

`element_amplitudes` (one c_e per element, empty: all 1) is not part of the signal: it scales each atom's
term in the molecule kernel, K(A, B) = Σ_{i,j} c_{Z_i} c_{Z_j} k(x_i, x_j) (`atom_amplitudes`,
`eqkernels.molecule_kernel`), i.e. element pairs weighted by W_ab = c_a c_b. On QM9 U0 with mlp-so3avg,
c_H = 0 (only heavy-atom environments summed) lowered 5-fold CV MAE 296 → 249 meV and test MAE 288 → 240
meV at N = 300 (563 → 527 at N = 100); HOMO did not gain (benchmarks/results/element_pairs.json). Atoms
with c = 0 are left out of the kernel computation (about 4× cheaper for c_H = 0 on QM9). The default stays
all 1; `eqk molecules train --sum-atoms heavy` sets c_H = 0.

Everything is built from relative positions and sums over neighbours, so the signals are invariant
to translations and to the order of atoms, and rotate as D(R) x when the molecule is rotated by R.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

from eqkernels._specs import VersionedSpec
from eqkernels.so3 import n_coefficients

SPEC_VERSION = 1


@dataclass(frozen=True)
class EnvironmentSpec(VersionedSpec):
    """How atom environments become sphere signals; see the module docstring (lists from JSON become tuples)."""

    spec_version: ClassVar[int] = SPEC_VERSION
    spec_what: ClassVar[str] = "environment"

    elements: tuple[int, ...] = (1, 6, 7, 8, 9)
    l_max: int = 3
    radial: str = "gaussian"
    cutoff: float = 4.0
    n_radial: int = 12
    r_min: float = 0.8
    powers: tuple[float, ...] = (2.0, 6.0)
    angular_width_deg: float = 45.0
    centre_channels: bool = True
    centre_weight: float = 4.0
    element_amplitudes: tuple[float, ...] = ()

    def __post_init__(self):
        if self.radial not in ("gaussian", "power"):
            raise ValueError(f"radial must be 'gaussian' or 'power', got {self.radial!r}")
        if self.l_max < 0 or self.l_max > 8:
            raise ValueError(f"l_max must be in 0..8, got {self.l_max}")
        if not (self.cutoff > 0):
            raise ValueError(f"cutoff must be positive, got {self.cutoff}")
        object.__setattr__(self, "elements", tuple(int(e) for e in self.elements))
        object.__setattr__(self, "powers", tuple(float(p) for p in self.powers))
        amplitudes = tuple(float(c) for c in self.element_amplitudes)
        if amplitudes and (len(amplitudes) != len(self.elements) or not all(c >= 0 for c in amplitudes)):
            raise ValueError(f"element_amplitudes must be {len(self.elements)} numbers ≥ 0 (one per element "
                             f"{self.elements}) or empty, got {amplitudes}")
        object.__setattr__(self, "element_amplitudes", amplitudes)

    def with_amplitude(self, element: int, amplitude: float) -> "EnvironmentSpec":
        """This spec with element `element`'s molecule-kernel amplitude set (the others kept, 1 by default)."""
        import dataclasses

        c = list(self.element_amplitudes or [1.0] * len(self.elements))
        c[self.elements.index(element)] = float(amplitude)
        return dataclasses.replace(self, element_amplitudes=tuple(c))

    @property
    def n_radial_channels(self) -> int:
        return self.n_radial if self.radial == "gaussian" else len(self.powers)

    @property
    def n_channels(self) -> int:
        return len(self.elements) * self.n_radial_channels + (len(self.elements) if self.centre_channels else 0)

    @property
    def n_coefficients(self) -> int:
        return n_coefficients(self.l_max)

    def angular_coefficients(self) -> np.ndarray:
        """Funk–Hecke eigenvalues λ_l (l = 0..L) of the angular profile g."""
        beta = -(math.cos(math.radians(self.angular_width_deg)) - 1) ** 2 / math.log(0.05)
        t, w = np.polynomial.legendre.leggauss(200)
        g = np.exp(-(t - 1) ** 2 / beta)
        return np.array([2 * np.pi * np.sum(w * g * np.polynomial.legendre.Legendre.basis(l)(t))
                         for l in range(self.l_max + 1)])



def _cutoff_function(r: np.ndarray, cutoff: float) -> np.ndarray:
    if not np.isfinite(cutoff):
        return np.ones_like(r)
    return np.where(r < cutoff, 0.5 * (np.cos(np.pi * r / cutoff) + 1), 0.0)


def _radial_weights(spec: EnvironmentSpec, r: np.ndarray, z_centre: np.ndarray, z_neigh: np.ndarray) -> np.ndarray:
    """(P, K) radial channel weights of neighbour pairs at distances r (P,)."""
    fc = _cutoff_function(r, spec.cutoff)
    if spec.radial == "gaussian":
        mu = np.linspace(spec.r_min, spec.cutoff, spec.n_radial)
        sigma = (spec.cutoff - spec.r_min) / max(spec.n_radial - 1, 1)
        return np.exp(-((r[:, None] - mu[None]) ** 2) / (2 * sigma ** 2)) * fc[:, None]
    zz = (z_centre * z_neigh).astype(np.float64)
    return np.stack([zz / r ** p for p in spec.powers], axis=1) * fc[:, None]


def _spherical_harmonics(l_max: int, vectors: np.ndarray) -> np.ndarray:
    irreps = e3nn.Irreps.spherical_harmonics(l_max)
    with jax.experimental.enable_x64():
        y = e3nn.spherical_harmonics(irreps, jnp.asarray(vectors, dtype=jnp.float64), normalize=True,
                                     normalization="integral")
        return np.asarray(y.array)


def _element_lookup(element_index: dict[int, int], z_all: np.ndarray) -> np.ndarray:
    """Table atomic number → channel block (−1 for elements the spec does not know)."""
    lookup = np.full(max(int(z_all.max()) + 1, max(element_index) + 1), -1, dtype=np.int64)
    for e, k in element_index.items():
        lookup[e] = k
    if np.any(lookup[z_all] < 0):
        raise ValueError(f"atomic numbers {sorted(set(z_all[lookup[z_all] < 0].tolist()))} are not in the spec")
    return lookup


def atom_environments(spec: EnvironmentSpec, numbers: list[np.ndarray], positions: list[np.ndarray],
                      chunk_pairs: int = 400_000) -> tuple[np.ndarray, np.ndarray]:
    """Signals of every atom of every molecule.

    Returns (x, molecule) with x (n_atoms_total, C, (L+1)²) float32, atoms in molecule order, and
    molecule (n_atoms_total,) the index of each atom's molecule. Channels: element-major then radial
    channel, then the centre-element channels. Elements outside `spec.elements` must be refused
    before calling (see `eqkernels.pipelines.molecules.check_molecules`).
    """
    element_index = {e: k for k, e in enumerate(spec.elements)}
    n_per = np.array([len(z) for z in numbers], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_per)])
    n_total = int(offsets[-1])
    n_rad, n_el = spec.n_radial_channels, len(spec.elements)
    x = np.zeros((n_total, spec.n_channels, spec.n_coefficients), dtype=np.float64)
    molecule = np.repeat(np.arange(len(numbers)), n_per)
    lam = spec.angular_coefficients()
    lam_per_coeff = np.concatenate([np.full(2 * l + 1, lam[l]) for l in range(spec.l_max + 1)])

    # Gather all neighbour pairs (centre, neighbour) over molecules, then expand in chunks.
    centres, neighbours = [], []
    for m, z in enumerate(numbers):
        n = len(z)
        if n < 2:
            continue
        i, j = np.nonzero(~np.eye(n, dtype=bool))
        centres.append(i + offsets[m])
        neighbours.append(j + offsets[m])
    z_all = np.concatenate([np.asarray(z, dtype=np.int64) for z in numbers]) if numbers else np.zeros(0, np.int64)
    r_all = np.concatenate([np.asarray(r, dtype=np.float64) for r in positions]) if positions else np.zeros((0, 3))
    if centres:
        centres, neighbours = np.concatenate(centres), np.concatenate(neighbours)
        d = r_all[neighbours] - r_all[centres]
        dist = np.linalg.norm(d, axis=1)
        keep = dist < spec.cutoff
        centres, neighbours, d, dist = centres[keep], neighbours[keep], d[keep], dist[keep]
        el = _element_lookup(element_index, z_all)[z_all[neighbours]]
        for start in range(0, len(centres), chunk_pairs):
            sl = slice(start, start + chunk_pairs)
            y = _spherical_harmonics(spec.l_max, d[sl]) * lam_per_coeff[None]             # (P, M)
            w = _radial_weights(spec, dist[sl], z_all[centres[sl]], z_all[neighbours[sl]])  # (P, K)
            channel = el[sl][:, None] * n_rad + np.arange(n_rad)[None]                    # (P, K)
            np.add.at(x, (np.repeat(centres[sl], n_rad), channel.ravel()),
                      (w[:, :, None] * y[:, None, :]).reshape(-1, y.shape[1]))
    if spec.centre_channels and n_total:
        lookup = _element_lookup(element_index, z_all)
        x[np.arange(n_total), n_el * n_rad + lookup[z_all], 0] = spec.centre_weight
    return x.astype(np.float32), molecule


def atom_amplitudes(spec: EnvironmentSpec, numbers: list[np.ndarray]) -> np.ndarray | None:
    """(n_atoms_total,) molecule-kernel amplitude c_{Z_i} of every atom in molecule order (as
    `atom_environments`), or None when the spec has none (all 1)."""
    if not spec.element_amplitudes:
        return None
    z_all = np.concatenate([np.asarray(z, dtype=np.int64) for z in numbers]) if numbers else np.zeros(0, np.int64)
    lookup = _element_lookup({e: k for k, e in enumerate(spec.elements)}, z_all) if len(z_all) else np.zeros(0, int)
    return np.asarray(spec.element_amplitudes)[lookup[z_all]] if len(z_all) else np.zeros(0)


def channel_scales(spec: EnvironmentSpec, x: np.ndarray) -> np.ndarray:
    """(C,) factors that give every radial channel (shared over elements) unit mean power per coefficient.

    Radial channels differ by orders of magnitude (r⁻² vs r⁻⁶); one factor per radial channel, shared
    by all elements, keeps the relative weight of elements as in the data. Centre channels keep 1
    (their size is set by `centre_weight`).
    """
    n_rad, n_el = spec.n_radial_channels, len(spec.elements)
    power = np.mean(np.sum(np.asarray(x, np.float64) ** 2, axis=2), axis=0)       # (C,)
    scales = np.ones(spec.n_channels)
    for k in range(n_rad):
        idx = np.arange(n_el) * n_rad + k
        p = power[idx].sum() / spec.n_coefficients
        scales[idx] = 1.0 / math.sqrt(p) if p > 0 else 1.0
    return scales
