"""SO(3)-equivariant NTKs: matrix-valued kernels for vector and tensor outputs, one block per degree λ.

For an output of degree λ the kernel is the Haar average of the scalar kernel weighted by the
Wigner matrix (symmetry-adapted GPR: Grisafi, Wilkins, Csányi & Ceriotti, PRL 120, 036002, 2018):

    Θ_λ(x, x') = ∫ dG Θ(x, D(G) x') D^λ(G)          ((2λ+1) × (2λ+1))

It satisfies Θ_λ(D(A) x, D(B) x') = D^λ(A) Θ_λ(x, x') D^λ(B)ᵀ (substitute G = A S Bᵀ) and is the NTK
of the equivariant network F(x) = ∫ dR D^λ(R) f(D(R)ᵀ x) built from the per-atom MLP f (`mlp-so3avg`),
or of the SO(3)-GCNN whose readout takes the degree-λ Fourier coefficient of the last layer
instead of its average (`so3gcnn`). λ = 0 is the invariant kernel of `eqkernels.so3`.

The integral runs on the quadrature of `eqkernels.so3` (the scalar recursion on the grid, then a
contraction with the pooling matrix w_q D^λ(G_q)). The quadrature integrates Wigner entries up to
its degree exactly, so Σ_q w_q D^λ(G_q) = δ_λ0 for λ ≤ degree: biases reach only λ = 0.

Blocks are stored flat, degree-major then row m then column n: (..., Σ_λ (2λ+1)²). Real spherical
harmonics as in e3nn-jax; for λ = 1 e3nn's basis is (x, y, z), so D¹(R) = R. Symmetric Cartesian
tensors map to 0e ⊕ 2e coefficients with e3nn's orthonormal reduced basis (`symmetric_tensor_basis`).
"""
from __future__ import annotations

from functools import lru_cache

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np

from eqkernels.so3 import (AtomKernel, AtomKernelSpec, mlp_so3avg_kernels, n_fourier, so3gcnn_kernels)

EQUIVARIANT_KERNELS = ("mlp-so3avg", "so3gcnn")


def degree_columns(degree: int) -> slice:
    """Columns of degree λ in the flattened Wigner layout of `SO3Quadrature.wigner_flat`."""
    return slice(n_fourier(degree - 1) if degree > 0 else 0, n_fourier(degree))


def block_offsets(degrees: tuple[int, ...]) -> dict[int, slice]:
    """Where each degree's flat (2λ+1)² block lies in the concatenated block axis."""
    out, start = {}, 0
    for lam in degrees:
        size = (2 * lam + 1) ** 2
        out[lam] = slice(start, start + size)
        start += size
    return out


def block_transpose(degrees: tuple[int, ...]) -> np.ndarray:
    """Index permutation of the flat block axis that transposes every (2λ+1)² block (K(x', x) = K(x, x')ᵀ)."""
    perm = []
    for lam, sl in block_offsets(degrees).items():
        d = 2 * lam + 1
        perm.append(sl.start + np.arange(d * d).reshape(d, d).T.ravel())
    return np.concatenate(perm)


def pooling_matrix(quadrature, degrees: tuple[int, ...]) -> np.ndarray:
    """(Q, Σ(2λ+1)²) float64: w_q D^λ(G_q) for each λ, the degree-λ Haar projection on the grid."""
    wigner = quadrature.wigner_flat(max(degrees))
    cols = np.concatenate([wigner[:, degree_columns(lam)] for lam in degrees], axis=1)
    return quadrature.weights[:, None] * cols


class EquivariantAtomKernel(AtomKernel):
    """Per-atom matrix-valued kernel: (nngp, ntk), each (n1, n2, Σ_λ (2λ+1)²), for the output degrees.

    An `AtomKernel` (same grid, weights, prepared self variances, `prepare`/`pair`/call) whose
    readout contracts the grid with w_q D^λ(G_q) instead of w_q, so the molecule kernel sums its
    blocks over atom pairs unchanged.
    """

    def __init__(self, spec: AtomKernelSpec, l_max: int, degrees: tuple[int, ...], dtype=jnp.float32):
        if spec.name not in EQUIVARIANT_KERNELS:
            raise ValueError(f"kernel {spec.name!r} has no equivariant form; choose one of "
                             f"{', '.join(EQUIVARIANT_KERNELS)}")
        if not degrees or min(degrees) < 0 or max(degrees) > spec.quadrature_degree:
            raise ValueError(f"output degrees {degrees} must lie in 0..{spec.quadrature_degree} "
                             "(the quadrature degree, so that Σ w D^λ is exact)")
        self.degrees = tuple(degrees)
        self.pool = jnp.asarray(pooling_matrix(spec.quadrature, self.degrees), dtype)
        self.block_size = self.pool.shape[1]
        super().__init__(spec, l_max, dtype=dtype)

    def _pair_impl(self, p1, p2):
        (x1, v1), (x2, v2) = p1, p2
        if self.spec.name == "mlp-so3avg":
            # the scalar head on the grid contracted with w_q D^λ(G_q) instead of w_q
            return mlp_so3avg_kernels(self.spec, x1, x2, self.wigner, self.pool)
        return so3gcnn_kernels(self.spec, x1, x2, v1, v2, self.wigner, self.weights, self.filter_band_limit,
                               pool=self.pool)


def degree_block(flat: np.ndarray, degrees: tuple[int, ...], degree: int) -> np.ndarray:
    """(N1, N2, Σ(2λ+1)²) → the degree-λ block as a (N1 (2λ+1), N2 (2λ+1)) matrix, molecule-major.

    Row a·(2λ+1) + m, column b·(2λ+1) + n holds K(x_a, x_b)[m, n], so a flattened (N, 2λ+1) target
    regresses on it directly.
    """
    d = 2 * degree + 1
    block = np.asarray(flat)[..., block_offsets(degrees)[degree]]
    n1, n2 = block.shape[:2]
    return block.reshape(n1, n2, d, d).transpose(0, 2, 1, 3).reshape(n1 * d, n2 * d)


# --------------------------------------------------------------------------------------------------------
# Symmetric Cartesian tensors ↔ 0e ⊕ 2e

@lru_cache(maxsize=1)
def symmetric_tensor_basis() -> np.ndarray:
    """(3, 3, 6) orthonormal basis Q of symmetric 3×3 tensors: c = Σ_ij A_ij Q_ij, irreps 0e + 2e (e3nn).

    c_0 = tr(A)/√3 and c(R A Rᵀ) = D^{0⊕2}(R) c.
    """
    with jax.experimental.enable_x64():
        q = e3nn.reduced_symmetric_tensor_product_basis(e3nn.Irreps("1o"), 2)
        assert str(q.irreps) == "1x0e+1x2e"
        return np.asarray(q.array, dtype=np.float64)


def cartesian_to_irreps(tensors: np.ndarray) -> e3nn.IrrepsArray:
    """Symmetric tensors (..., 3, 3) → IrrepsArray '0e + 2e' (..., 6) (float64)."""
    c = np.einsum("...ij,ijk->...k", np.asarray(tensors, np.float64), symmetric_tensor_basis())
    return e3nn.IrrepsArray("0e + 2e", c)


def irreps_to_cartesian(coefficients) -> np.ndarray:
    """IrrepsArray or array '0e + 2e' (..., 6) → symmetric tensors (..., 3, 3) (float64)."""
    c = np.asarray(coefficients.array if isinstance(coefficients, e3nn.IrrepsArray) else coefficients, np.float64)
    return np.einsum("...k,ijk->...ij", c, symmetric_tensor_basis())


def isotropic_part(tensors: np.ndarray) -> np.ndarray:
    """tr(A)/3 of tensors (..., 3, 3)."""
    return np.trace(np.asarray(tensors), axis1=-2, axis2=-1) / 3


def anisotropy(tensors: np.ndarray) -> np.ndarray:
    """Δα = √(3/2 ‖A − tr(A)/3 I‖²_F) of symmetric tensors (..., 3, 3) (= √(½ Σ (a_i − a_j)²) over eigenvalues)."""
    a = np.asarray(tensors, np.float64)
    dev = a - isotropic_part(a)[..., None, None] * np.eye(3)
    return np.sqrt(1.5 * np.sum(dev * dev, axis=(-2, -1)))


def block_quadrature_error(spec: AtomKernelSpec, degrees: tuple[int, ...], x1, x2, *,
                           reference_degree: int | None = None, block: int = 8) -> dict[int, float]:
    """Per output degree λ, the relative quadrature error of the per-atom NTK block:
    max |Θ_λ,B − Θ_λ,ref| / max |Θ_λ,ref| (float64; x1, x2 (n, C, M)), the reference at
    `reference_degree` (default `eqkernels.so3.reference_degree_for(B)`: at least 39, as for the
    invariant kernels). Pass the same atoms twice to include the self pairs, where ReLU's cusp makes
    the quadrature least accurate. Rows are taken `block` atoms at a time (memory ∝ block · n₂ · Q).

    The λ ≥ 1 blocks are smaller than λ = 0 and their integrand carries D^λ, so at a given B their
    relative error is larger than the invariant kernel's (`eqkernels.so3.quadrature_error`).
    """
    from dataclasses import replace

    from eqkernels.so3 import reference_degree_for

    x1, x2 = np.asarray(x1, np.float64), np.asarray(x2, np.float64)
    l_max = int(round(np.sqrt(x1.shape[-1]))) - 1
    ref = replace(spec, quadrature_degree=reference_degree or reference_degree_for(spec.quadrature_degree))
    with jax.experimental.enable_x64():
        kernels = [EquivariantAtomKernel(s, l_max, degrees, jnp.float64) for s in (spec, ref)]
        a, b = (np.concatenate([np.asarray(k(x1[i:i + block], x2)["ntk"]) for i in range(0, len(x1), block)])
                for k in kernels)
    return {lam: float(np.max(np.abs(a[..., sl] - b[..., sl])) / np.max(np.abs(b[..., sl])))
            for lam, sl in block_offsets(degrees).items()}
