"""Kernel families on top of the relative pooled kernels: readouts, group averages, GCNN twins.

For relative pooled kernels M_g = (K_pool, Θ_pool)(x, g·x') (see `relative`):
- plain CNN:         readout(M_e)
- averaged over G:   1/|G| Σ_g readout(M_g)
- GCNN over G:       readout(1/|G| Σ_g M_g)        (Misof, Kessel & Gerken 2025, Thm 4.1)
With the linear readout (an affine map) the last two coincide exactly.
"""
from __future__ import annotations

import numpy as np

from eqkernels.groups import get_group
from eqkernels.kernels.relative import RelativeKernels
from eqkernels.kernels.spec import ConvNetSpec, KernelSpec


def _relu_moments_np(k, v1, v2):
    """numpy twin of activations.relu_moments in float64, for the small readout arrays."""
    prod = np.sqrt(np.maximum(v1, 0) * np.maximum(v2, 0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(prod > 0, k / np.where(prod > 0, prod, 1), 0.0)
    rho = np.clip(rho, -1, 1)
    theta = np.arccos(rho)
    k_dot = (np.pi - theta) / (2 * np.pi)
    k_tilde = prod * (np.sqrt(1 - rho ** 2) / (2 * np.pi) + k_dot * rho)
    return k_tilde, k_dot


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
                           pick(rel.self1_ntk, conj), rel.self2_nngp, rel.self2_ntk)


def family_kernels(spec: KernelSpec, rel: RelativeKernels) -> dict[str, np.ndarray]:
    """{'nngp', 'ntk'} arrays (N1, N2) of the named kernel family from relative pooled kernels.

    `rel` may hold a larger group than the family needs (e.g. D4 for a C4 family): it is restricted.
    """
    family_group = get_group(spec.group or "C1")
    if rel.group != family_group.name:
        rel = rel.restrict(family_group)
    net = spec.net
    needs_self = net.readout != "linear"
    if spec.kind == "plain":
        g = 0  # identity is the first element of every group
        s1 = rel.self1_nngp[0] if needs_self else None
        s2 = rel.self2_nngp[0] if needs_self else None
        nngp, ntk = readout(net, rel.nngp[g], rel.ntk[g], s1, s2)
    elif spec.kind == "averaged":
        outs = [readout(net, rel.nngp[g], rel.ntk[g],
                        rel.self1_nngp[0] if needs_self else None,
                        rel.self2_nngp[0] if needs_self else None) for g in range(rel.nngp.shape[0])]
        nngp = np.mean([o[0] for o in outs], axis=0)
        ntk = np.mean([o[1] for o in outs], axis=0)
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
