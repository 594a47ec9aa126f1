"""Group-convolutional layers for p4 = C4 ⋉ Z² and p4m = D4 ⋉ Z² as neural-tangents layers.

Each public layer returns a triple `(init_fn, apply_fn, kernel_fn)` that composes with
`neural_tangents.stax.serial` and with nt's own pointwise layers (`stax.Relu`, `stax.Erf`,
`stax.Dense`, ...). Any `eqkernels.groups` point group works (C1, C2, C4, D1, D2, D4).

Finite-width layout
-------------------
Features on the group are arrays of shape (N, H, W, |G|, C): position t = (row, col), group
element g (index into `group.elements`), channel c. `g·x` acts on such a feature map by
rotating/reflecting the spatial axes and permuting the group axis, value at (g, t) moving to
(h g, R_h t). Because channels are the last axis, nt's `stax.Dense` placed between group
layers mixes channels with the same weights at every (g, t): a pointwise 1×1 equivariant layer.

    LiftingConv:  f(g, t)  = Σ_{y∈S} w(y) · x(t + R_g y)                         (+ b)
    GroupConv:    f'(g, t) = Σ_{h∈G} Σ_{y∈S} w(h, y) · f(g h, t + R_g y)        (+ b)
    GroupPool:    mean of f over g and both spatial axes → (N, C), invariant.

S is the centred q×q filter support, R_g the 2×2 signed permutation matrix by which g acts
on pixel offsets (derived from `PlanarGroup.act`, so it cannot disagree with the image
action). Weights are N(0, 1) scaled by W_std/√fan_in at apply time ('ntk') or at init
('standard'), fan_in = q²·C_in (lifting) and q²·|G|·C_in (group conv), as in nt's `Conv`.

Infinite-width representation ("virtual batch")
-----------------------------------------------
The layer kernels depend on the pair of group elements only through d = g′g⁻¹:

    K((g,t),(g′,t′)) = F_d(t, t′),   F_d(t, t′) = K((e,t),(d,t′))  (original coordinates),

and each layer maps the d-slice to itself:
    lifting:    F¹_d(t,t′) = σ_w²/q² Σ_z K⁰(t+z, t′+R_d z) + σ_b²
    group conv: F′_d(t,t′) = σ_w²/q² Σ_z F̃_d(t+z, t′+R_d z) + σ_b²     (the Σ over h cancels 1/|G|)
so |G| slices are stored instead of |G|² blocks. In the nt `Kernel`:
- `nngp`, `ntk`: (N1, N2·|G|, H, H′, W, W′); slot n2·|G| + d holds F_d for the pair (x1[n1], x2[n2]);
- `cov1`: (N1, H, H′, W, W′), the d = e slice of x1 with itself;
- `cov2`: (N2·|G|, H, H′, W, W′), the d = e slice of x2 with itself, repeated |G| times (also
  when x2 is None), because the variance at (d, t′) equals the one at (e, t′).
nt's elementwise layers then see an ordinary kernel whose entry (n1, (n2,d), t, t′) pairs the
variances cov1[n1, t, t] and cov2[(n2,d), t′, t′] — exactly what the nonlinearity needs.

Pooled variances. After `GroupPool`, a nonlinear layer needs the pooled variance of each input,
mean_{d,t,t′} F_d for the image *with itself*, which involves every d-slice of x with x, not
only d = e. nt's `cov1`/`cov2` can only carry objects whose spatial diagonal is the variance,
so these slices cannot ride there; they are the block diagonal of `nngp` when x2 is None (or
equal to x1). `GroupPool` takes them from there. A cross call (x2 ≠ x1) has no such
variances, so `GroupPool` refuses it with a ValueError unless it was built with
`linear_head=True` (only affine layers follow, which never read them; they are then NaN).
`cross_kernel_via_union` evaluates networks with a nonlinear head on the union of both inputs.

Between the lifting layer and `GroupPool` the kernel is a `GroupFeatureKernel`: nt's elementwise
layers and `Dense` treat it as an ordinary kernel (correctly), but a layer that removes the
spatial axes (nt's `GlobalAvgPool`, `GlobalSumPool`, `Flatten`) would read the |G| slots as
extra inputs and return an (N1, N2·|G|) kernel, so such a layer raises a ValueError instead.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, random
from neural_tangents import Kernel, stax
from neural_tangents.stax import Bool, Diagonal, layer, requires

from eqkernels.groups import PlanarGroup, get_group
from eqkernels.kernels.engine import check_group_fits_images
from eqkernels.kernels.spec import ConvNetSpec

__all__ = ["LiftingConv", "GroupConv", "GroupPool", "GroupFeatureKernel", "gcnn_stax", "cnn_stax",
           "cross_kernel_via_union", "offset_matrices", "act_on_group_features"]

_PADDINGS = ("VALID", "SAME", "CIRCULAR")
_PARAMETERIZATIONS = ("ntk", "standard")


# --------------------------------------------------------------------------------------------
# Group geometry
# --------------------------------------------------------------------------------------------

def _as_group(group: PlanarGroup | str) -> PlanarGroup:
    return get_group(group) if isinstance(group, str) else group


def offset_matrices(group: PlanarGroup | str) -> np.ndarray:
    """Integer matrices R_g (|G|, 2, 2) acting on (row, col) pixel offsets: (g·x)(R_g p) = x(p).

    Read off `group.act` applied to an image of centred coordinates, so the kernel recursions
    and the finite layers use the same convention as the image action.
    """
    group = _as_group(group)
    probe = np.stack(np.meshgrid(np.arange(3) - 1, np.arange(3) - 1, indexing="ij"), axis=-1)
    mats = []
    for g in group.elements:
        moved = np.asarray(group.act(probe, g))          # moved[p] = R_g⁻¹ p for centred p
        r_inv = np.stack([moved[2, 1], moved[1, 2]], axis=1)  # columns: images of e_row, e_col
        mats.append(np.round(r_inv.T).astype(np.int64))  # R = (R⁻¹)ᵀ: R is orthogonal
    return np.stack(mats)


def act_on_group_features(f, group: PlanarGroup | str, h: int):
    """Apply element index `h` to features f of shape (N, H, W, |G|, C): rotate space, permute G.

    The value at (g, t) moves to (h g, R_h t), which is what transforming the network input by h
    does to the output of an equivariant layer.
    """
    group = _as_group(group)
    n, hh, ww, order, c = f.shape
    spatial = group.act(f.reshape(n, hh, ww, order * c), h).reshape(n, hh, ww, order, c)
    # new[h g] = old[g]  ⇔  new[k] = old[h⁻¹ k]
    src = group.multiplication_table[group.inverse[h]]
    return spatial[:, :, :, src, :]


def _transform_filter(w, group: PlanarGroup, g: int):
    """(g·w) for a filter w (q, q, ...): rotate/reflect its two leading spatial axes by element g."""
    q1, q2 = w.shape[:2]
    rest = w.shape[2:]
    return group.act(w.reshape(q1, q2, -1), g).reshape((q1, q2) + rest)


# --------------------------------------------------------------------------------------------
# Kernel maps on full spatial covariances
# --------------------------------------------------------------------------------------------

def _shifted_pair_sum(x, axis_a: int, axis_b: int, sign: int, q: int):
    """Σ_{z=-h..h} x[..., i+h+z (axis_a), ..., j+h+sign·z (axis_b), ...] for a padded array x.

    Both axes shrink by q−1 (they were padded by h = (q−1)/2 beforehand, or the layer is VALID).
    """
    h = (q - 1) // 2
    n_a, n_b = x.shape[axis_a] - (q - 1), x.shape[axis_b] - (q - 1)
    out = None
    for z in range(-h, h + 1):
        part = lax.slice_in_dim(x, h + z, h + z + n_a, axis=axis_a)
        part = lax.slice_in_dim(part, h + sign * z, h + sign * z + n_b, axis=axis_b)
        out = part if out is None else out + part
    return out


def _pad_spatial(x, q: int, padding: str, s0: int):
    """Pad the four spatial axes (from axis s0) by (q−1)/2: zeros for SAME, wrap for CIRCULAR."""
    h = (q - 1) // 2
    if padding == "VALID" or not h:
        return x
    mode = "wrap" if padding == "CIRCULAR" else "constant"
    return jnp.pad(x, [(0, 0)] * s0 + [(h, h)] * 4, mode=mode)


def _window_padded(x, r: np.ndarray, q: int, s0: int):
    """(1/q²) Σ_{z∈S} x(t + z, t′ + R z) for already padded covariances x (..., H, H′, W, W′).

    `s0` is the index of the first spatial axis (H of the first input). R is a signed
    permutation matrix, so the sum separates into one pass per offset component: z_row moves
    the first input's H axis and the second input's axis j with R[j, 0] ≠ 0, z_col likewise.
    Every spatial axis shrinks by q−1.
    """
    first = (s0, s0 + 2)    # H, W of the first input
    second = (s0 + 1, s0 + 3)  # H′, W′ of the second input
    for k in range(2):
        j = int(np.flatnonzero(r[:, k])[0])
        x = _shifted_pair_sum(x, first[k], second[j], int(r[j, k]), q)
    return x * (1.0 / (q * q))


def _relative_window(x, r: np.ndarray, q: int, padding: str, s0: int):
    """(1/q²) Σ_{z∈S} x(t + z, t′ + R z) with the layer's padding (SAME: zeros, CIRCULAR: wrap)."""
    return _window_padded(_pad_spatial(x, q, padding, s0), r, q, s0)


def _per_slot(x, mats, q: int, padding: str, broadcast: bool):
    """Apply slot d's relative window to nngp/ntk arrays of the virtual batch.

    x: (N1, N2·|G|, H, H′, W, W′), or (N1, N2, H, H′, W, W′) with `broadcast` (the lifting layer,
    whose input has no group axis yet). Returns (N1, N2·|G|, H_out, H_out′, W_out, W_out′).
    """
    order = len(mats)
    n1 = x.shape[0]
    x = _pad_spatial(x, q, padding, 2)  # once for all slots
    if broadcast:
        slots = [_window_padded(x, np.asarray(mats[d]), q, 2) for d in range(order)]
    else:
        xs = x.reshape((n1, x.shape[1] // order, order) + x.shape[2:])
        slots = [_window_padded(xs[:, :, d], np.asarray(mats[d]), q, 2) for d in range(order)]
    out = jnp.stack(slots, axis=2)
    return out.reshape((n1, -1) + out.shape[3:])


def _identity_window(x, q: int, padding: str, batch_ndim: int):
    return _relative_window(x, np.eye(2, dtype=np.int64), q, padding, batch_ndim)


@partial(jax.jit, static_argnames=("mats", "q", "padding", "lifting"))
def _unscaled_maps(nngp, ntk, cov1, cov2, *, mats: tuple, q: int, padding: str, lifting: bool):
    """A(·) of one group layer for (nngp, ntk, cov1, cov2); one compiled unit per layer and shape.

    nt's kernel_fn is often called without jit; evaluated op by op, every shifted slice of the
    window sums would be materialised at full size. Compiled as a unit they fuse (and the unit is
    simply inlined when the caller jits the whole kernel_fn). `mats` is a tuple of R_d
    (hashable, static). `ntk` may be None or the scalar Θ⁰ = 0, which passes through unchanged.
    `cov2` is the e-slice of x2, shape (N2, ...); the result is repeated over the |G| slots.
    """
    order = len(mats)
    nngp_u = _per_slot(nngp, mats, q, padding, broadcast=lifting)
    ntk_u = ntk if ntk is None or ntk.ndim == 0 else _per_slot(ntk, mats, q, padding, broadcast=lifting)
    cov1_u = _identity_window(cov1, q, padding, 1)
    # The variance at (d, t′) equals the one at (e, t′): repeat the e-slice for every slot.
    cov2_u = jnp.repeat(_identity_window(cov2, q, padding, 1), order, axis=0)
    return nngp_u, ntk_u, cov1_u, cov2_u


def _check_kernel(k, name: str):
    if not k.diagonal_batch:
        raise NotImplementedError(f"{name}: only diagonal_batch=True kernels are supported")
    if k.diagonal_spatial:
        raise ValueError(f"{name} needs full spatial covariances (diagonal_spatial=False)")
    if k.mask1 is not None or k.mask2 is not None:
        raise NotImplementedError(f"{name}: masked inputs are not supported")
    if k.is_reversed:  # e.g. after nt's own Conv, which flips spatial axes lazily
        k = k.reverse()
    if k.nngp.ndim != 6:
        raise ValueError(f"{name} expects kernels of 2D feature maps (N1, N2, H, H', W, W'), "
                         f"got nngp of shape {k.nngp.shape}")
    return k


@dataclasses.dataclass(frozen=True)
class GroupFeatureKernel(Kernel):
    """An nt `Kernel` in the virtual-batch layout of features on the group (module docstring).

    Only elementwise layers, `Dense` and the layers of this module may act on it: `replace` refuses
    a result whose nngp lost the four spatial axes, which is what nt's `GlobalAvgPool`,
    `GlobalSumPool` and `Flatten` would return — an (N1, N2·|G|) kernel over the group slots.
    """

    def replace(self, **changes) -> "GroupFeatureKernel":
        nngp = changes.get("nngp", self.nngp)
        if nngp is not None and nngp.ndim != 6:
            raise ValueError(f"features on the group must be pooled with eqkernels.layers.GroupPool (mean over "
                             f"the group and space); this layer would give a kernel of shape {nngp.shape} "
                             f"instead of (N1, N2) (nt's GlobalAvgPool/Flatten see the |G| slots as inputs)")
        return dataclasses.replace(self, **changes)


_KERNEL_DATA = tuple(f.name for f in dataclasses.fields(Kernel) if f.metadata.get("pytree_node", True))
_KERNEL_META = tuple(f.name for f in dataclasses.fields(Kernel) if not f.metadata.get("pytree_node", True))
# A pytree like nt's Kernel (nt registers the class itself, not its subclasses), so it passes jit.
jax.tree_util.register_pytree_node(
    GroupFeatureKernel,
    lambda k: (tuple(getattr(k, n) for n in _KERNEL_DATA), tuple(getattr(k, n) for n in _KERNEL_META)),
    lambda meta, data: GroupFeatureKernel(**dict(zip(_KERNEL_META, meta)), **dict(zip(_KERNEL_DATA, data))))


def _kernel_fields(k) -> dict:
    return {f.name: getattr(k, f.name) for f in dataclasses.fields(Kernel)}


def _linear_update(k, nngp_u, ntk_u, cov1_u, cov2_u, *, w_std, b_std, parameterization, fan_in):
    """nt's Conv update given the unscaled maps (1/q² Σ_z …) of nngp, ntk, cov1 and cov2.

    'ntk':      K = σ_w² A(K) + σ_b²,  Θ = K + σ_w² A(Θ)
    'standard': K = σ_w² A(K) + σ_b²,  Θ = fan_in·A(K) + σ_w² A(Θ) + [1 if bias]
    A scalar Θ (nt's input kernel carries Θ⁰ = 0 as a scalar) stays a scalar, so Θ¹ = K¹ for a
    first layer: the first-layer term is counted once.
    """
    b2 = 0.0 if b_std is None else b_std ** 2
    affine = lambda a: w_std ** 2 * a + b2  # noqa: E731
    nngp = affine(nngp_u)
    cov1 = affine(cov1_u)
    cov2 = affine(cov2_u)
    ntk = None
    if ntk_u is not None:
        if parameterization == "ntk":
            ntk = nngp + w_std ** 2 * ntk_u
        else:
            ntk = fan_in * nngp_u + w_std ** 2 * ntk_u + (1.0 if b_std is not None else 0.0)
    return GroupFeatureKernel(**{**_kernel_fields(k), **dict(
        nngp=nngp, ntk=ntk, cov1=cov1, cov2=cov2, is_gaussian=True, is_reversed=False, is_input=False,
        batch_axis=0, channel_axis=4)})


def _check_args(filter_shape, padding, parameterization):
    q1, q2 = filter_shape
    if q1 != q2 or q1 % 2 == 0:
        raise ValueError(f"filters must be odd and square (they must rotate onto themselves), got {filter_shape}")
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
    if parameterization not in _PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {_PARAMETERIZATIONS}, got {parameterization!r}")
    return q1


def _out_size(size: int, q: int, padding: str) -> int:
    return size - q + 1 if padding == "VALID" else size


def _conv_nhwc(x, filters, q: int, padding: str):
    """Cross-correlation of (N, H, W, Cin) with (q, q, Cin, Cout); CIRCULAR by wrap-padding."""
    if padding == "CIRCULAR":
        h = (q - 1) // 2
        x = jnp.pad(x, ((0, 0), (h, h), (h, h), (0, 0)), mode="wrap")
        padding = "VALID"
    return lax.conv_general_dilated(x, filters, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _scale_and_shift(out, b, W_std: float, b_std, fan_in: int, parameterization: str):
    """A convolution's output with its bias: σ_w/√fan_in · out + σ_b · b (NTK) or out + b (standard)."""
    if parameterization == "ntk":
        out = out * (W_std / math.sqrt(fan_in))
        return out if b is None else out + b_std * b
    return out if b is None else out + b


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

@layer
def LiftingConv(out_chan: int, filter_shape=(3, 3), group: PlanarGroup | str = "C4", padding: str = "VALID",
                W_std: float = 1.0, b_std: float | None = None, parameterization: str = "ntk"):
    """Lifting convolution: images (N, H, W, C_in) → features on the group (N, H′, W′, |G|, out_chan).

    f(g, t) = W_std/√(q²C_in) Σ_{y, c} w_c(y) x_c(t + R_g y) + b_std·b   ('ntk'), computed as one
    convolution with the |G| transformed filters g·w stacked along the output channels.
    Kernel: slot d of the virtual batch gets W_std²/q² Σ_z K⁰(t+z, t′+R_d z) + b_std².
    """
    group = _as_group(group)
    q = _check_args(filter_shape, padding, parameterization)
    order = group.order
    mats = tuple(tuple(map(tuple, m)) for m in offset_matrices(group).tolist())  # hashable: static for jit

    def init_fn(rng, input_shape):
        n, hh, ww, c_in = input_shape
        check_group_fits_images(group, hh, ww)
        k1, k2 = random.split(rng)
        w = random.normal(k1, (q, q, c_in, out_chan))
        b = None if b_std is None else random.normal(k2, (out_chan,))
        if parameterization == "standard":
            w = w * (W_std / math.sqrt(q * q * c_in))
            b = None if b is None else b * b_std
        return (n, _out_size(hh, q, padding), _out_size(ww, q, padding), order, out_chan), (w, b)

    def apply_fn(params, inputs, **kwargs):
        w, b = params
        n, hh, ww, c_in = inputs.shape
        check_group_fits_images(group, hh, ww)
        # Output channel (g, c) uses the filter g·w: f(g, t) = Σ_z (g·w)(z) x(t + z).
        filters = jnp.stack([_transform_filter(w, group, g) for g in range(order)], axis=-2)
        out = _conv_nhwc(inputs, filters.reshape(q, q, c_in, order * out_chan), q, padding)
        out = out.reshape(out.shape[:3] + (order, out_chan))
        return _scale_and_shift(out, b, W_std, b_std, q * q * c_in, parameterization)

    @requires(batch_axis=0, channel_axis=-1, diagonal_spatial=Diagonal(input=Bool.NO, output=Bool.NO))
    def kernel_fn(k, **kwargs):
        k = _check_kernel(k, "LiftingConv")
        # The |G|-slot representation needs a grid that G maps onto itself (square for 90° turns).
        check_group_fits_images(group, k.nngp.shape[2], k.nngp.shape[4])  # (N1, N2, H, H′, W, W′)
        cov2_e = k.cov1 if k.cov2 is None else k.cov2
        nngp_u, ntk_u, cov1_u, cov2_u = _unscaled_maps(k.nngp, k.ntk, k.cov1, cov2_e, mats=mats, q=q,
                                                       padding=padding, lifting=True)
        fan_in = q * q * k.shape1[k.channel_axis]
        return _linear_update(k, nngp_u, ntk_u, cov1_u, cov2_u, w_std=W_std, b_std=b_std,
                              parameterization=parameterization, fan_in=fan_in)

    return init_fn, apply_fn, kernel_fn


@layer
def GroupConv(out_chan: int, filter_shape=(3, 3), group: PlanarGroup | str = "C4", padding: str = "VALID",
              W_std: float = 1.0, b_std: float | None = None, parameterization: str = "ntk"):
    """Group convolution: (N, H, W, |G|, C_in) → (N, H′, W′, |G|, out_chan), filter on S × G.

    f′(g, t) = W_std/√(q²|G|C_in) Σ_{h, y, c} w_c(h, y) f_c(g h, t + R_g y) + b_std·b  ('ntk'),
    computed as one convolution over |G|·C_in input channels: output slot g uses the filter
    spatially transformed by g with its group axis permuted, (h′ ↦ w(g⁻¹h′)).
    Kernel: slot d ↦ W_std²/q² Σ_z F_d(t+z, t′+R_d z) + b_std² (slots do not mix).
    """
    group = _as_group(group)
    q = _check_args(filter_shape, padding, parameterization)
    order = group.order
    mats = tuple(tuple(map(tuple, m)) for m in offset_matrices(group).tolist())  # hashable: static for jit
    table, inverse = group.multiplication_table, group.inverse
    # perm[g][h′] = index of g⁻¹h′: the filter slice that output slot g applies to input slot h′.
    perms = [np.asarray(table[inverse[g]]) for g in range(order)]

    def init_fn(rng, input_shape):
        n, hh, ww, g_in, c_in = input_shape
        if g_in != order:
            raise ValueError(f"GroupConv over {group.name} expects a group axis of size {order}, got {g_in}")
        k1, k2 = random.split(rng)
        w = random.normal(k1, (q, q, order, c_in, out_chan))
        b = None if b_std is None else random.normal(k2, (out_chan,))
        if parameterization == "standard":
            w = w * (W_std / math.sqrt(q * q * order * c_in))
            b = None if b is None else b * b_std
        return (n, _out_size(hh, q, padding), _out_size(ww, q, padding), order, out_chan), (w, b)

    def apply_fn(params, inputs, **kwargs):
        w, b = params
        n, hh, ww, g_in, c_in = inputs.shape
        filters = jnp.stack([_transform_filter(w[:, :, perms[g]], group, g) for g in range(order)], axis=-2)
        # (q, q, |G| in, C_in, |G| out, C_out) → (q, q, |G|·C_in, |G|·C_out)
        filters = filters.reshape(q, q, order * c_in, order * out_chan)
        out = _conv_nhwc(inputs.reshape(n, hh, ww, order * c_in), filters, q, padding)
        out = out.reshape(out.shape[:3] + (order, out_chan))
        return _scale_and_shift(out, b, W_std, b_std, q * q * order * c_in, parameterization)

    @requires(batch_axis=0, channel_axis=-1, diagonal_spatial=Diagonal(input=Bool.NO, output=Bool.NO))
    def kernel_fn(k, **kwargs):
        k = _check_kernel(k, "GroupConv")
        n1, m = k.nngp.shape[:2]
        if m % order or k.cov2 is None or k.cov2.shape[0] != m:
            raise ValueError("GroupConv's input kernel must come from a LiftingConv over the same group "
                             f"(second batch axis N2·{order}); got nngp {k.nngp.shape}")
        # cov2's slots are identical copies of the e-slice: map one, repeat.
        cov2_e = k.cov2.reshape((m // order, order) + k.cov2.shape[1:])[:, 0]
        nngp_u, ntk_u, cov1_u, cov2_u = _unscaled_maps(k.nngp, k.ntk, k.cov1, cov2_e, mats=mats, q=q,
                                                       padding=padding, lifting=False)
        fan_in = q * q * order * k.shape1[k.channel_axis]
        return _linear_update(k, nngp_u, ntk_u, cov1_u, cov2_u, w_std=W_std, b_std=b_std,
                              parameterization=parameterization, fan_in=fan_in)

    return init_fn, apply_fn, kernel_fn


@layer
def GroupPool(linear_head: bool = False):
    """Invariant pooling: (N, H, W, |G|, C) → (N, C), the mean over the group and both spatial axes.

    Kernel: nngp/ntk (N1, N2·|G|, H, H′, W, W′) → mean over space and the |G| slots → (N1, N2).
    The pooled variances (`cov1` (N1,), `cov2` (N2,)) are mean_{d,t,t′} of the slices of each
    image with itself; they are read off the block diagonal of nngp when x1 is x2 (x2=None, or
    x2 equal to x1 outside jit). A cross call has none, and a nonlinear layer after the pooling
    would turn that into NaN, so it raises a ValueError — unless `linear_head=True` says that only
    affine layers (stax.Dense) follow, which never read them (they are then NaN). For a nonlinear
    head use `cross_kernel_via_union`.
    """

    def init_fn(rng, input_shape):
        n, hh, ww, order, c = input_shape
        return (n, c), ()

    def apply_fn(params, inputs, **kwargs):
        return jnp.mean(inputs, axis=(1, 2, 3))

    @requires(batch_axis=0, channel_axis=-1, diagonal_spatial=Diagonal(input=Bool.NO, output=Bool.YES))
    def kernel_fn(k, **kwargs):
        k = _check_kernel(k, "GroupPool")
        order = k.shape1[3]
        n1, m = k.nngp.shape[:2]
        if m % order or k.cov2 is None or k.cov2.shape[0] != m:
            raise ValueError(f"GroupPool expects a kernel from group layers (second batch axis N2·{order}), "
                             f"got nngp {k.nngp.shape}")
        n2 = m // order

        def pool(x):
            if x is None or x.ndim == 0:
                return x
            return jnp.mean(x, axis=(2, 3, 4, 5)).reshape(n1, n2, order).mean(-1)

        slots = jnp.mean(k.nngp, axis=(2, 3, 4, 5)).reshape(n1, n2, order)
        cov1, cov2 = _pooled_variances(slots, k.x1_is_x2, linear_head)
        # A plain nt Kernel again: what follows sees an ordinary (N1, N2) kernel.
        return Kernel(**{**_kernel_fields(k), **dict(
            nngp=slots.mean(-1), ntk=pool(k.ntk), cov1=cov1, cov2=cov2, is_reversed=False, batch_axis=0,
            channel_axis=1)})

    return init_fn, apply_fn, kernel_fn


def _concrete_bool(flag) -> bool | None:
    """`flag` as a Python bool, or None when it is only known at run time (traced under jit / nt.batch)."""
    try:
        return bool(flag)
    except jax.errors.ConcretizationTypeError:
        return None


def _pooled_variances(slots, x1_is_x2, linear_head: bool):
    """Pooled self variances (cov1 (N1,), cov2 (N2,)) from the pooled slots (N1, N2, |G|) of a call.

    Symmetric calls read them off the diagonal; other calls raise unless `linear_head` (then NaN).
    """
    n1, n2, _ = slots.shape
    same = _concrete_bool(x1_is_x2) if n1 == n2 else False
    if same is None and linear_head:  # decided at run time; only affine layers follow, NaN is harmless
        own = slots[jnp.arange(n1), jnp.arange(n1)].mean(-1)
        var = jnp.where(jnp.asarray(x1_is_x2), own, jnp.nan)
        return var, var
    if same:
        own = slots[jnp.arange(n1), jnp.arange(n1)].mean(-1)  # x_n with itself, averaged over d
        return own, own
    if linear_head:
        return jnp.full((n1,), jnp.nan, slots.dtype), jnp.full((n2,), jnp.nan, slots.dtype)
    why = ("x2 is not x1" if same is False else
           "under jit (or nt.batch) GroupPool cannot tell whether x2 is x1; pass x2=None for K(x, x)")
    raise ValueError(f"GroupPool: a cross kernel ({why}) lacks the pooled variances a nonlinear layer after "
                     "the pooling needs; wrap the network's kernel_fn in eqkernels.layers.cross_kernel_via_union, "
                     "or build GroupPool(linear_head=True) if only linear layers (stax.Dense) follow")


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

def _bias(std: float) -> float | None:
    # ConvNetSpec says "no bias" with 0.0; nt's None means the same for the 'ntk' kernel and
    # keeps finite networks free of dead parameters.
    return None if std == 0 else std


def _readout(net: ConvNetSpec, readout_width: int):
    if net.readout == "linear":
        return [stax.Dense(readout_width, W_std=net.readout_weight_std, b_std=_bias(net.readout_bias_std))]
    return [stax.Dense(net.readout_hidden, W_std=net.weight_std, b_std=_bias(net.bias_std)), stax.Relu(),
            stax.Dense(readout_width, W_std=net.readout_weight_std, b_std=_bias(net.readout_bias_std))]


def cnn_stax(net: ConvNetSpec, readout_width: int = 1):
    """nt's plain CNN for `net`: (Conv → Relu)×depth → GlobalAvgPool → readout (NTK parametrisation)."""
    q = (net.filter_size, net.filter_size)
    layers = []
    for _ in range(net.depth):
        layers += [stax.Conv(net.channels, q, padding=net.padding, W_std=net.weight_std, b_std=_bias(net.bias_std)),
                   stax.Relu()]
    return stax.serial(*layers, stax.GlobalAvgPool(), *_readout(net, readout_width))


def gcnn_stax(net: ConvNetSpec, group: PlanarGroup | str = "C4", readout_width: int = 1):
    """The GCNN twin of `net` over `group`: LiftingConv → Relu → (GroupConv → Relu)×(depth−1) → GroupPool → readout.

    `readout_width` is the number of network outputs (the last Dense layer); conv layers have
    `net.channels` channels per group element. With `net.readout == "mlp"` the nonlinear head
    needs the pooled variances of both inputs, so the returned `kernel_fn` evaluates cross
    kernels on the union of the inputs (`cross_kernel_via_union`).
    """
    group = _as_group(group)
    q = (net.filter_size, net.filter_size)
    common = dict(group=group, padding=net.padding, W_std=net.weight_std, b_std=_bias(net.bias_std))
    layers = [LiftingConv(net.channels, q, **common), stax.Relu()]
    for _ in range(net.depth - 1):
        layers += [GroupConv(net.channels, q, **common), stax.Relu()]
    linear = net.readout == "linear"
    init_fn, apply_fn, kernel_fn = stax.serial(*layers, GroupPool(linear_head=linear), *_readout(net, readout_width))
    if not linear:
        kernel_fn = cross_kernel_via_union(kernel_fn)
    return init_fn, apply_fn, kernel_fn


def cross_kernel_via_union(kernel_fn):
    """Wrap a GCNN `kernel_fn` so cross calls are exact with nonlinear layers after `GroupPool`.

    kernel_fn(x1, x2) is evaluated as kernel_fn(concat(x1, x2)) and the (x1, x2) block is
    returned: the symmetric call carries the pooled variances of every image. Costs
    ((N1+N2)²/(N1·N2))× a cross call; only `get` in {'nngp', 'ntk'} (or a tuple of them) is
    supported for cross calls. Calls with x2=None pass straight through.
    """

    def wrapped(x1, x2=None, get=None, **kwargs):
        if x2 is None:
            return kernel_fn(x1, None, get, **kwargs)
        names = (get,) if isinstance(get, str) else tuple(get or ())
        if not names or not set(names) <= {"nngp", "ntk"}:
            raise ValueError("cross calls through the union support get='nngp', 'ntk' or a tuple of them")
        n1 = x1.shape[0]
        out = kernel_fn(jnp.concatenate([x1, x2]), None, names, **kwargs)
        blocks = tuple(getattr(out, name)[:n1, n1:] for name in names)
        return blocks[0] if isinstance(get, str) else type(out)(*blocks)

    return wrapped
