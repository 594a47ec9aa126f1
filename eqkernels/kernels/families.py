"""Kernel families on top of the relative pooled kernels: readouts, group averages, GCNN twins.

For relative pooled kernels M_g = (K_pool, Θ_pool)(x, g·x') (see `relative`):
- plain CNN:         readout(M_e)
- averaged over G:   1/|G| Σ_g readout(M_g)
- GCNN over G:       readout(1/|G| Σ_g M_g)        (Misof, Kessel & Gerken 2025, Thm 4.1)
With the linear readout (an affine map) the last two coincide exactly.

Interpolated groups G = H·{P_φ} (C8, C16, D8, D16; see `eqkernels.groups.RotationGroup`): the
relative kernels are over H between stacks [P_φ x]_φ (`fine_angles`), and the family is the
double average K_G(x, x') = 1/m² Σ_{φ,ψ} 1/|H| Σ_h readout(K(P_φ x, h·P_ψ x')), m = |G|/|H|,
which by the joint H-invariance of the CNN kernel equals 1/|G|² Σ_{g,g'} readout(K(P_g x, P_g' x')).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eqkernels.groups import RotationGroup, get_group, resolve_group
from eqkernels.kernels.activations import relu_moments
from eqkernels.kernels.relative import RelativeKernels
from eqkernels.kernels.spec import ConvNetSpec, KernelSpec


def _relu_moments_np(k, v1, v2):
    """`activations.relu_moments` in float64 NumPy for the small readout arrays, from variances v1, v2."""
    # √(v1·v2) as one factor: on the diagonal ρ = 1 sits on ReLU's square-root cusp, where the rounding
    # of √v1·√v2 instead would move K̃ by ~1e-8 (relative) and with it every stored figure.
    prod = np.sqrt(np.maximum(v1, 0) * np.maximum(v2, 0))
    with jax.experimental.enable_x64():
        k_tilde, k_dot = relu_moments(jnp.asarray(k, jnp.float64), jnp.asarray(prod, jnp.float64), 1.0)
        return np.asarray(k_tilde), np.asarray(k_dot)


def readout(net: ConvNetSpec, k_pool, t_pool, self1=None, self2=None, *, diagonal: bool = False):
    """Final (NNGP, NTK) from pooled kernels (N1,N2); `self1` (N1,) / `self2` (N2,) pooled self K.

    With `diagonal=True` all arguments are (N,) values of pairs (x_n, x'_n) instead of matrices.
    """
    wo, bo = net.readout_weight_std ** 2, net.readout_bias_std ** 2
    if net.readout == "linear":
        nngp = wo * k_pool + bo
        return nngp, nngp + wo * t_pool
    if self1 is None or self2 is None:
        raise ValueError("the mlp readout needs the pooled self kernels")
    wh, bh = net.weight_std ** 2, net.bias_std ** 2
    hidden = wh * k_pool + bh
    hidden_ntk = hidden + wh * t_pool
    v1, v2 = wh * np.asarray(self1) + bh, wh * np.asarray(self2) + bh
    if not diagonal:
        v1, v2 = v1[:, None], v2[None, :]
    k_tilde, k_dot = _relu_moments_np(hidden, v1, v2)
    nngp = wo * k_tilde + bo
    return nngp, nngp + wo * k_dot * hidden_ntk


def left_translate(rel: RelativeKernels, element: int) -> RelativeKernels:
    """Relative kernels of (a·x, x') from those of (x, x'), a = the group's element number `element`.

    Uses the joint invariance of the CNN kernel, K(a·x, y) = K(x, a⁻¹·y) (the filters' support and
    weight distribution are invariant under the grid's point group), so M'_g = M_{a⁻¹g} and the
    self terms become K(a·x, g·a·x) = K(x, a⁻¹ga·x).
    """
    group = get_group(rel.group)
    mul, inv = group.multiplication_table, group.inverse
    a_inv = inv[element]
    cross = [mul[a_inv, g] for g in range(group.order)]
    conj = [mul[mul[a_inv, g], element] for g in range(group.order)]
    pick = lambda arr, idx: None if arr is None else arr[idx]  # noqa: E731
    return RelativeKernels(rel.group, rel.nngp[cross], rel.ntk[cross], pick(rel.self1_nngp, conj),
                           pick(rel.self1_ntk, conj), rel.self2_nngp, rel.self2_ntk, fine_angles=rel.fine_angles,
                           pair_self_nngp=pick(rel.pair_self_nngp, conj), pair_self_ntk=pick(rel.pair_self_ntk, conj))


def first_block(rel: RelativeKernels) -> RelativeKernels:
    """The φ = ψ = 0 block of stacked relative kernels: those of the disk-masked tiles themselves."""
    if rel.fine == 1:
        return rel
    n1, n2 = rel.nngp.shape[1] // rel.fine, rel.nngp.shape[2] // rel.fine
    cut = lambda a, n: None if a is None else a[:, :n]  # noqa: E731
    return RelativeKernels(rel.group, rel.nngp[:, :n1, :n2], rel.ntk[:, :n1, :n2], cut(rel.self1_nngp, n1),
                           cut(rel.self1_ntk, n1), cut(rel.self2_nngp, n2), cut(rel.self2_ntk, n2))


def _family_group(spec: KernelSpec, rel: RelativeKernels):
    """(exact group of the family, its fine angles), checked against what `rel` holds."""
    group = resolve_group(spec.group or "C1")
    if isinstance(group, RotationGroup):
        if tuple(rel.fine_angles) != tuple(group.fine_angles):
            raise ValueError(f"{spec.name} needs relative kernels of inputs stacked at the angles "
                             f"{group.fine_angles}, got {rel.fine_angles}")
        return group.exact, group.fine_angles
    return group, (0.0,)


def _averaged_readout(net: ConvNetSpec, rel: RelativeKernels, needs_self: bool):
    """1/|H| Σ_h readout(M_h) with the identity self terms: (nngp, ntk) (N1, N2)."""
    outs = [readout(net, rel.nngp[g], rel.ntk[g], rel.self1_nngp[0] if needs_self else None,
                    rel.self2_nngp[0] if needs_self else None) for g in range(rel.nngp.shape[0])]
    return np.mean([o[0] for o in outs], axis=0), np.mean([o[1] for o in outs], axis=0)


def _block_mean(a: np.ndarray, m: int) -> np.ndarray:
    """(m·N1, m·N2) → (N1, N2): the mean over the m × m blocks of stacked angles."""
    return a.reshape(m, a.shape[0] // m, m, a.shape[1] // m).mean(axis=(0, 2))


def family_kernels(spec: KernelSpec, rel: RelativeKernels) -> dict[str, np.ndarray]:
    """{'nngp', 'ntk'} arrays (N1, N2) of the named kernel family from relative pooled kernels.

    `rel` may hold a larger group than the family needs (e.g. D4 for a C4 family): it is restricted.
    Stacked `rel` (interpolated groups) gives a grid family the kernels of the masked tiles.
    """
    if rel.fine > 1 and not spec.interpolated:
        rel = first_block(rel)
    family_group, fine = _family_group(spec, rel)
    if rel.group != family_group.name:
        rel = rel.restrict(family_group)
    net = spec.net
    needs_self = net.readout != "linear"
    if len(fine) > 1:
        nngp, ntk = _averaged_readout(net, rel, needs_self)
        return {"nngp": _block_mean(nngp, len(fine)), "ntk": _block_mean(ntk, len(fine))}
    if spec.kind == "plain":
        g = 0  # identity is the first element of every group
        s1 = rel.self1_nngp[0] if needs_self else None
        s2 = rel.self2_nngp[0] if needs_self else None
        nngp, ntk = readout(net, rel.nngp[g], rel.ntk[g], s1, s2)
    elif spec.kind == "averaged":
        nngp, ntk = _averaged_readout(net, rel, needs_self)
    elif spec.kind == "gcnn":
        s1 = rel.self1_nngp.mean(0) if needs_self else None
        s2 = rel.self2_nngp.mean(0) if needs_self else None
        nngp, ntk = readout(net, rel.nngp.mean(0), rel.ntk.mean(0), s1, s2)
    else:  # pragma: no cover - KernelSpec validates names
        raise ValueError(spec.kind)
    return {"nngp": nngp, "ntk": ntk}


def family_self_kernels(spec: KernelSpec, self_nngp: np.ndarray, self_ntk: np.ndarray) -> dict[str, np.ndarray]:
    """Family kernels K(x, x) (N,) from pooled relative self terms K_pool(x, g·x), arrays (|G|, N).

    The self terms must cover the family's group, identity first (as `RelativeKernels.self1_*`).
    """
    net = spec.net
    identity = self_nngp[0]
    if spec.kind == "plain":
        nngp, ntk = readout(net, identity, self_ntk[0], identity, identity, diagonal=True)
    elif spec.kind == "averaged":
        outs = [readout(net, self_nngp[g], self_ntk[g], identity, identity, diagonal=True)
                for g in range(self_nngp.shape[0])]
        nngp, ntk = np.mean([o[0] for o in outs], axis=0), np.mean([o[1] for o in outs], axis=0)
    else:
        mean_k = self_nngp.mean(0)
        nngp, ntk = readout(net, mean_k, self_ntk.mean(0), mean_k, mean_k, diagonal=True)
    return {"nngp": nngp, "ntk": ntk}


def family_diagonal(spec: KernelSpec, rel: RelativeKernels) -> dict[str, np.ndarray]:
    """Family kernels K(x1_i, x1_i) (N1,) from relative kernels with self terms (any group)."""
    if rel.fine > 1 and not spec.interpolated:
        rel = first_block(rel)
    family_group, fine = _family_group(spec, rel)
    if rel.group != family_group.name:
        rel = rel.restrict(family_group)
    if len(fine) == 1:
        return family_self_kernels(spec, rel.self1_nngp, rel.self1_ntk)
    k, t = rel.pair_self_nngp, rel.pair_self_ntk          # (|H|, m, m, N)
    own = np.einsum("ppn->pn", k[0])                       # K(P_φ x, P_φ x): (m, N)
    nngp, ntk = readout(spec.net, k, t, own[None, :, None], own[None, None, :], diagonal=True)
    return {"nngp": nngp.mean(axis=(0, 1, 2)), "ntk": ntk.mean(axis=(0, 1, 2))}


def feature_distance(k_aa: np.ndarray, k_bb: np.ndarray, k_ab: np.ndarray) -> np.ndarray:
    """‖φ(a) − φ(b)‖ in a kernel's feature space from K(a,a), K(b,b), K(a,b) (any equal shapes).

    By Cauchy–Schwarz |f(a) − f(b)| ≤ ‖φ(a) − φ(b)‖·‖f‖ for every f = Σ_j α_j K(·, x_j) (‖f‖² =
    αᵀK(X,X)α), so with a = P_θ x, b = x it bounds every score's change under a rotation.
    """
    return np.sqrt(np.maximum(np.asarray(k_aa) + np.asarray(k_bb) - 2 * np.asarray(k_ab), 0.0))
