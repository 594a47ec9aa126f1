"""Tests of the C4/D4 group-convolutional NTK layers (eqkernels.layers.planar).

What is checked, and against what:
- invariance of the GCNN kernels under transforming either input;
- the identity Θ_GCNN(x, x′) = 1/|G| Σ_g Θ_CNN(x, g·x′) against nt's own CNN (float32 and float64);
- agreement with the independent fast engine (`ImageKernel("p4cnn" / "d4cnn")`), linear and mlp heads;
- exact equivariance / invariance of the finite networks (`apply_fn`);
- Monte Carlo: empirical NTKs of finite GCNNs approach the analytic kernel, and are far from the
  kernel with a doubled first-layer NTK (the bug of a public implementation).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import neural_tangents as nt
import numpy as np
import pytest
from jax.experimental import enable_x64
from neural_tangents import stax

from eqkernels.datasets import PATHMNIST_SAMPLE
from eqkernels.groups import get_group
from eqkernels.kernels import ConvNetSpec, ImageKernel, KernelSpec
from eqkernels.layers import (GroupConv, GroupPool, LiftingConv, act_on_group_features, cnn_stax, gcnn_stax,
                              offset_matrices)

GROUPS = ["C4", "D4"]
PADDINGS = ["VALID", "SAME", "CIRCULAR"]
FAMILY = {"C4": "p4cnn", "D4": "d4cnn"}
W_STD, B_STD, W_OUT, B_OUT = 1.4, 0.3, 1.1, 0.2


def _images(n, size=8, channels=2, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, size, size, channels)), dtype)


def _rel(a, b) -> float:
    """max |a − b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _gcnn(group, *, depth=2, padding="VALID", b_std=B_STD, param="ntk", channels=4, pointwise=False):
    """LiftingConv → Relu → [Dense → Relu] → (GroupConv → Relu)×(depth−1) → GroupPool → Dense."""
    conv = dict(group=group, padding=padding, W_std=W_STD, b_std=b_std, parameterization=param)
    layers = [LiftingConv(channels, (3, 3), **conv), stax.Relu()]
    if pointwise:
        layers += [stax.Dense(3, W_std=1.3, b_std=0.1), stax.Erf()]
    for _ in range(depth - 1):
        layers += [GroupConv(channels, (3, 3), **conv), stax.Relu()]
    return stax.serial(*layers, GroupPool(linear_head=True),
                       stax.Dense(1, W_std=W_OUT, b_std=b_std, parameterization=param))


def _cnn_twin(group, *, depth=2, padding="VALID", b_std=B_STD, param="ntk", channels=4, pointwise=False):
    """nt's CNN with the same hyperparameters as `_gcnn`.

    Fan-ins are matched: a group conv sees |G|·C inputs, so every CNN conv that feeds another
    conv has |G|·C channels. This matters only for the 'standard' parametrisation, whose NTK
    carries the finite fan-in.
    """
    order = get_group(group).order
    conv = dict(padding=padding, W_std=W_STD, b_std=b_std, parameterization=param)
    layers = []
    for layer in range(depth):
        width = channels if layer == depth - 1 else order * channels
        layers += [stax.Conv(width, (3, 3), **conv), stax.Relu()]
        if pointwise and layer == 0:
            layers += [stax.Dense(3, W_std=1.3, b_std=0.1), stax.Erf()]
    return stax.serial(*layers, stax.GlobalAvgPool(),
                       stax.Dense(1, W_std=W_OUT, b_std=b_std, parameterization=param))


def _averaged(kernel_fn, group, x1, x2):
    """1/|G| Σ_g K(x1, g·x2) for nngp and ntk, from one call on the stacked orbit of x2."""
    grp = get_group(group)
    orbit = jnp.concatenate([grp.act(x2, g) for g in range(grp.order)])
    k = kernel_fn(x1, orbit, ("nngp", "ntk"))
    return {name: np.asarray(getattr(k, name)).reshape(len(x1), grp.order, len(x2)).mean(1)
            for name in ("nngp", "ntk")}


def _check_identity(group, tol, dtype, **arch):
    x1, x2 = _images(3, seed=1, dtype=dtype), _images(2, seed=2, dtype=dtype)
    gcnn = _gcnn(group, **arch)[2](x1, x2, ("nngp", "ntk"))
    avg = _averaged(_cnn_twin(group, **arch)[2], group, x1, x2)
    assert gcnn.nngp.shape == (3, 2) and gcnn.nngp.dtype == dtype
    for name in ("nngp", "ntk"):
        err = _rel(getattr(gcnn, name), avg[name])
        assert err < tol, f"{name}: {err:.2e}"


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", ["C1", "C2", "C4", "D1", "D2", "D4"])
def test_offset_matrices_are_a_representation(group):
    grp = get_group(group)
    mats = offset_matrices(grp)
    table = grp.multiplication_table
    for a in range(grp.order):
        assert abs(round(np.linalg.det(mats[a]))) == 1
        for b in range(grp.order):
            np.testing.assert_array_equal(mats[a] @ mats[b], mats[table[a, b]])
    # (g·x)(R_g p) = x(p) for an image that marks one off-centre pixel
    x = np.zeros((5, 5, 1))
    x[2 + 1, 2 + 2, 0] = 1.0
    for g in range(grp.order):
        moved = np.argwhere(np.asarray(grp.act(x, g))[..., 0])[0] - 2
        np.testing.assert_array_equal(moved, mats[g] @ np.array([1, 2]))


# ---------------------------------------------------------------------------------------------
# (a) invariance of the kernel
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_kernel_invariant_under_either_input(group, padding):
    grp = get_group(group)
    x1, x2 = _images(3, seed=3), _images(2, seed=4)
    kernel_fn = _gcnn(group, padding=padding)[2]
    orbit1 = jnp.concatenate([grp.act(x1, g) for g in range(grp.order)])
    orbit2 = jnp.concatenate([grp.act(x2, g) for g in range(grp.order)])
    left = kernel_fn(orbit1, x2, ("nngp", "ntk"))    # K(g·x1, x2) for all g
    right = kernel_fn(x1, orbit2, ("nngp", "ntk"))   # K(x1, g·x2) for all g
    for name in ("nngp", "ntk"):
        a = np.asarray(getattr(left, name)).reshape(grp.order, 3, 2)
        b = np.asarray(getattr(right, name)).reshape(3, grp.order, 2).transpose(1, 0, 2)
        for g in range(1, grp.order):
            assert _rel(a[g], a[0]) < 1e-5, (name, g)
            assert _rel(b[g], b[0]) < 1e-5, (name, g)
        assert _rel(a[0], b[0]) < 1e-6
    # a plain CNN kernel is *not* invariant on these inputs (the check above can fail)
    cnn = _cnn_twin(group, padding=padding)[2](x1, orbit2, "ntk")
    cnn = np.asarray(cnn).reshape(3, grp.order, 2)
    assert _rel(cnn[:, 1], cnn[:, 0]) > 1e-3


# ---------------------------------------------------------------------------------------------
# (b) the GCNN / averaged-CNN identity against nt's own CNN
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("b_std", [None, B_STD], ids=["nobias", "bias"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("group", GROUPS)
def test_identity_float32(group, padding, b_std, param):
    _check_identity(group, 1e-4, jnp.float32, padding=padding, b_std=b_std, param=param)


F64_CASES = [("C4", "VALID", None, "ntk"), ("D4", "SAME", B_STD, "standard"),
             ("C4", "CIRCULAR", B_STD, "standard"), ("D4", "VALID", None, "ntk")]
F64_ALL = [(g, p, b, s) for g in GROUPS for p in PADDINGS for b in (None, B_STD) for s in ("ntk", "standard")]


def _identity_float64(group, padding, b_std, param):
    with enable_x64():  # scoped: other tests keep float32
        _check_identity(group, 1e-8, jnp.float64, padding=padding, b_std=b_std, param=param)
    assert jnp.zeros(()).dtype == jnp.float32


@pytest.mark.parametrize("group,padding,b_std,param", F64_CASES)
def test_identity_float64(group, padding, b_std, param):
    _identity_float64(group, padding, b_std, param)


@pytest.mark.slow
@pytest.mark.parametrize("group,padding,b_std,param", [c for c in F64_ALL if c not in F64_CASES])
def test_identity_float64_all(group, padding, b_std, param):
    _identity_float64(group, padding, b_std, param)


@pytest.mark.parametrize("param", ["ntk", "standard"])
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("group", GROUPS)
def test_identity_lifting_relu_pool_dense(group, padding, param):
    _check_identity(group, 1e-4, jnp.float32, depth=1, padding=padding, param=param)


def test_identity_lifting_relu_pool_dense_float64():
    with enable_x64():
        for group in GROUPS:
            _check_identity(group, 1e-8, jnp.float64, depth=1, padding="SAME")


@pytest.mark.parametrize("group", GROUPS)
def test_identity_with_nt_pointwise_layers_between(group):
    # nt's Dense acts as a pointwise 1×1 layer on (N, H, W, |G|, C) features, Erf elementwise.
    _check_identity(group, 1e-4, jnp.float32, pointwise=True, padding="SAME")


@pytest.mark.parametrize("group", ["C1", "C2", "D1", "D2"])
def test_identity_smaller_groups(group):
    _check_identity(group, 1e-4, jnp.float32, padding="SAME")


def test_identity_on_real_histology_tiles():
    images = np.load(PATHMNIST_SAMPLE)["test_images"][:5, 10:18, 10:18].astype(np.float32) / 255.0
    images = jnp.asarray(images - images.mean(axis=(0, 1, 2)))
    x1, x2 = images[:3], images[3:]
    for group in GROUPS:
        gcnn = _gcnn(group, padding="SAME")[2](x1, x2, ("nngp", "ntk"))
        avg = _averaged(_cnn_twin(group, padding="SAME")[2], group, x1, x2)
        for name in ("nngp", "ntk"):
            assert _rel(getattr(gcnn, name), avg[name]) < 1e-4, (group, name)


@pytest.mark.parametrize("group", GROUPS)
def test_nonlinear_head_breaks_identity_but_matches_engine(group):
    """With Dense→ReLU→Dense after pooling only the pooled kernels obey the identity.

    The stax GCNN must then equal the engine, which applies the head to the averaged pooled
    kernel; and it must differ from the averaged CNN (so the comparison has teeth).
    """
    net = ConvNetSpec(readout="mlp", bias_std=0.2, readout_bias_std=0.1)
    x, x1, x2 = _images(3, seed=5), _images(1, seed=5), _images(2, seed=6)
    kernel_fn = gcnn_stax(net, group)[2]
    engine = ImageKernel(KernelSpec(FAMILY[group], net), progress=False)
    for args in ((x, None), (x1, x2)):  # the cross call goes through the union (3 images)
        ours, ref = kernel_fn(*args, ("nngp", "ntk")), engine(*args)
        for name in ("nngp", "ntk"):
            assert _rel(getattr(ours, name), ref[name]) < 1e-5, (name, args[1] is None)
    avg = _averaged(cnn_stax(net)[2], group, x1, x2)
    assert _rel(kernel_fn(x1, x2, "ntk"), avg["ntk"]) > 1e-5


def test_mlp_head_symmetric_call_without_union_wrapper():
    """A bare serial(...) with a nonlinear head: exact when x2 is None or equal to x1 (pooled
    variances from the block diagonal); a cross call has none and must raise. The old layer
    returned NaN without an exception (and NaN off-diagonal blocks under nt.batch)."""
    net = ConvNetSpec(readout="mlp", bias_std=0.2)
    q = (3, 3)
    conv = dict(group="C4", W_std=net.weight_std, b_std=0.2)
    kernel_fn = stax.serial(LiftingConv(4, q, **conv), stax.Relu(), GroupConv(4, q, **conv), stax.Relu(),
                            GroupPool(), stax.Dense(8, W_std=net.weight_std, b_std=0.2), stax.Relu(),
                            stax.Dense(1))[2]
    x1, x2 = _images(3, seed=7), _images(2, seed=8)
    ref = ImageKernel(KernelSpec("p4cnn", net), progress=False)(x1)
    ours = kernel_fn(x1, None, ("nngp", "ntk"))
    assert _rel(ours.nngp, ref["nngp"]) < 1e-5 and _rel(ours.ntk, ref["ntk"]) < 1e-5
    assert _rel(kernel_fn(x1, x1, "ntk"), ref["ntk"]) < 1e-5  # x2 equal to x1 (not None)
    with pytest.raises(ValueError, match="cross_kernel_via_union"):
        kernel_fn(x1, x2, "nngp")
    with pytest.raises(ValueError, match="x2=None"):  # off-diagonal blocks are cross calls
        nt.batch(kernel_fn, batch_size=1)(x1, None, "nngp")
    with pytest.raises(ValueError, match="x2=None"):  # traced: x2 == x1 cannot be decided
        jax.jit(kernel_fn, static_argnames="get")(x1, x1, get="nngp")
    # with a linear head, declared, the cross call is exact (checked against the engine)
    lin = ConvNetSpec(bias_std=0.2)
    linear = stax.serial(LiftingConv(4, q, **conv), stax.Relu(), GroupConv(4, q, **conv), stax.Relu(),
                         GroupPool(linear_head=True), stax.Dense(1))[2]
    engine = ImageKernel(KernelSpec("p4cnn", lin), progress=False)(x1, x2)["ntk"]
    assert _rel(linear(x1, x2, "ntk"), engine) < 1e-5
    assert _rel(nt.batch(linear, batch_size=1)(x1, x2, "ntk"), engine) < 1e-5


@pytest.mark.parametrize("pool", ["GlobalAvgPool", "GlobalSumPool", "Flatten"])
def test_nt_spatial_pooling_after_group_layers_is_refused(pool):
    """nt's own pooling would treat the |G| slots as inputs: an (N1, N2·|G|) kernel without error."""
    x1, x2 = _images(3, seed=7), _images(2, seed=8)
    kernel_fn = stax.serial(LiftingConv(4, (3, 3), group="C4"), stax.Relu(), getattr(stax, pool)(),
                            stax.Dense(1))[2]
    for args in ((x1, x2), (x1, None)):
        with pytest.raises(ValueError, match="GroupPool"):
            kernel_fn(*args, "ntk")
    # nt's pointwise layers between group layers remain allowed (test_identity_with_nt_pointwise_layers_between)


# ---------------------------------------------------------------------------------------------
# (c) two independent implementations: stax layers vs the fast engine
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("group", GROUPS)
def test_stax_gcnn_equals_engine_linear_readout(group, padding):
    net = ConvNetSpec(padding=padding, bias_std=0.1, readout_bias_std=0.2)
    kernel_fn = gcnn_stax(net, group)[2]
    engine = ImageKernel(KernelSpec(FAMILY[group], net), progress=False)
    x1, x2 = _images(3, seed=9), _images(4, seed=10)
    for args in ((x1, x2), (x1, None)):
        ours, ref = kernel_fn(*args, ("nngp", "ntk")), engine(*args)
        for name in ("nngp", "ntk"):
            assert _rel(getattr(ours, name), ref[name]) < 1e-5, (name, args[1] is None)


def test_cnn_stax_equals_engine():
    net = ConvNetSpec(padding="SAME")
    x1, x2 = _images(2, seed=11), _images(3, seed=12)
    ours = cnn_stax(net)[2](x1, x2, ("nngp", "ntk"))
    ref = ImageKernel(KernelSpec("cnn", net), progress=False)(x1, x2)
    assert _rel(ours.nngp, ref["nngp"]) < 1e-5 and _rel(ours.ntk, ref["ntk"]) < 1e-5


def test_kernel_fn_jits():
    kernel_fn = jax.jit(_gcnn("C4", depth=1)[2], static_argnames="get")
    x1, x2 = _images(3, seed=13), _images(2, seed=14)
    eager = _gcnn("C4", depth=1)[2](x1, x2, "ntk")
    assert _rel(kernel_fn(x1, x2, get="ntk"), eager) < 1e-6


# ---------------------------------------------------------------------------------------------
# (d) finite networks: exact equivariance and invariance
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("group", GROUPS)
def test_apply_fn_equivariant_and_invariant(group, padding):
    grp = get_group(group)
    x = _images(2, size=9, channels=3, seed=15)
    conv = dict(group=group, padding=padding, W_std=1.4, b_std=0.3)
    init_fn, apply_fn, _ = stax.serial(LiftingConv(5, (3, 3), **conv), stax.Relu(), stax.Dense(6, b_std=0.1),
                                       stax.Relu(), GroupConv(4, (3, 3), **conv))
    _, params = init_fn(jax.random.PRNGKey(0), x.shape)
    y = apply_fn(params, x)
    assert y.shape == ((2, 5, 5) if padding == "VALID" else (2, 9, 9)) + (grp.order, 4)
    for h in range(1, grp.order):
        # transforming the input by h rotates space and permutes the group axis by left-multiplication
        assert _rel(apply_fn(params, grp.act(x, h)), act_on_group_features(y, grp, h)) < 1e-5
        assert _rel(apply_fn(params, grp.act(x, h)), y) > 1e-2  # equivariant, not invariant

    init_fn, apply_fn, _ = stax.serial(LiftingConv(5, (3, 3), **conv), stax.Relu(),
                                       GroupConv(4, (3, 3), **conv), stax.Relu(), GroupPool(), stax.Dense(3))
    _, params = init_fn(jax.random.PRNGKey(1), x.shape)
    z = apply_fn(params, x)
    assert z.shape == (2, 3)
    for h in range(1, grp.order):
        assert _rel(apply_fn(params, grp.act(x, h)), z) < 1e-5


def test_gcnn_stax_finite_network_is_invariant():
    net = ConvNetSpec(readout="mlp", channels=6, readout_hidden=5)
    init_fn, apply_fn, _ = gcnn_stax(net, "D4", readout_width=3)
    x = _images(2, size=10, seed=16)
    _, params = init_fn(jax.random.PRNGKey(2), x.shape)
    z = apply_fn(params, x)
    assert z.shape == (2, 3)
    grp = get_group("D4")
    for h in range(1, grp.order):
        assert _rel(apply_fn(params, grp.act(x, h)), z) < 1e-5


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="odd and square"):
        LiftingConv(4, (2, 2))
    with pytest.raises(ValueError, match="padding"):
        GroupConv(4, (3, 3), padding="FULL")
    with pytest.raises(ValueError, match="unknown group"):
        LiftingConv(4, (3, 3), group="C3")
    # a group conv needs a kernel on the group, not an image kernel
    with pytest.raises(ValueError, match="LiftingConv"):
        stax.serial(stax.Conv(4, (3, 3)), stax.Relu(), GroupConv(4, (3, 3)))[2](_images(2), None, "nngp")


@pytest.mark.parametrize("group", GROUPS)
def test_lifting_conv_refuses_rectangles(group):
    """90° rotations do not map a 7×11 grid onto itself: the old layer silently returned a kernel
    (and initialised a network) that is neither invariant nor the averaged CNN's."""
    x = np.zeros((2, 7, 11, 3), np.float32)
    init_fn, apply_fn, kernel_fn = stax.serial(LiftingConv(4, (3, 3), group=group), stax.Relu(), GroupPool(),
                                               stax.Dense(1))
    with pytest.raises(ValueError, match="square images"):
        kernel_fn(x, None, "ntk")
    with pytest.raises(ValueError, match="square images"):
        init_fn(jax.random.PRNGKey(0), x.shape)
    # 180° turns and mirror images keep a rectangle in place: still allowed
    assert np.all(np.isfinite(stax.serial(LiftingConv(4, (3, 3), group="D2"), stax.Relu(), GroupPool(),
                                          stax.Dense(1))[2](x + 1, None, "ntk")))


# ---------------------------------------------------------------------------------------------
# (e) Monte Carlo: finite networks approach the analytic NTK; the first-layer NTK is counted once
# ---------------------------------------------------------------------------------------------

def _mc_net(group, width, depth):
    conv = dict(group=group, W_std=math.sqrt(2.0), b_std=0.2)
    layers = [LiftingConv(width, (3, 3), **conv), stax.Relu()]
    for _ in range(depth - 1):
        layers += [GroupConv(width, (3, 3), **conv), stax.Relu()]
    return stax.serial(*layers, GroupPool(), stax.Dense(1, W_std=1.0, b_std=0.1))


def _doubled_first_layer_ntk(group, depth, x):
    """The analytic NTK if the lifting layer added σ_w²·A(K⁰) once more (Θ¹ = 2K¹)."""
    conv = dict(group=group, W_std=math.sqrt(2.0), b_std=0.2)
    k = LiftingConv(1, (3, 3), **conv)[2](x, None)
    k = k.replace(ntk=2 * k.nngp)
    rest = [stax.Relu()]
    for _ in range(depth - 1):
        rest += [GroupConv(1, (3, 3), **conv), stax.Relu()]
    rest += [GroupPool(), stax.Dense(1, W_std=1.0, b_std=0.1)]
    return np.asarray(stax.serial(*rest)[2](k).ntk)


def _empirical_ntks(group, width, depth, x, seeds):
    init_fn, apply_fn, _ = _mc_net(group, width, depth)
    ntk_fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(-1,), vmap_axes=0))
    return np.array([np.asarray(ntk_fn(x, None, init_fn(jax.random.PRNGKey(s), x.shape)[1])) for s in seeds])


def _lifting_part_ntks(group, width, depth, x, seeds):
    """J_lift J_liftᵀ: the part of the empirical NTK from the lifting layer's parameters only."""
    init_fn, apply_fn, _ = _mc_net(group, width, depth)

    @jax.jit
    def part(params):
        jac = jax.jacrev(lambda first: apply_fn([first] + list(params[1:]), x)[:, 0])(params[0])
        jac = jnp.concatenate([j.reshape(len(x), -1) for j in jax.tree_util.tree_leaves(jac)], axis=1)
        return jac @ jac.T

    return np.array([np.asarray(part(init_fn(jax.random.PRNGKey(s), x.shape)[1])) for s in seeds])


def _frob(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_monte_carlo_smoke_first_layer_counted_once():
    """Quick MC check (loose): 4 networks of width 256 for lifting → ReLU → pool → dense."""
    x = _images(3, seed=17)
    analytic = np.asarray(_mc_net("C4", 1, 1)[2](x, None, "ntk"))
    doubled = _doubled_first_layer_ntk("C4", 1, x)
    gap = _frob(doubled, analytic)
    assert gap > 0.05  # the double count is a visible difference for this network
    mc = np.mean(_empirical_ntks("C4", 256, 1, x, range(4)), axis=0)
    assert _frob(mc, analytic) < 0.4 * gap
    assert _frob(mc, doubled) > 0.6 * gap


def test_monte_carlo_error_falls_with_width_reduced():
    """Default-run version of the slow width study: C4, lifting → ReLU → group conv → ReLU → pool →
    dense on three 8×8 images, 8 initialisations at widths 8 and 128 (fixed seeds).

    Expected: the RMS relative error of single networks falls like 1/√width, ratio √(8/128) = 0.25.
    Measured over five disjoint seed sets: ratio 0.22–0.40, RMS at width 128 0.086–0.155, error of
    the 8-network average at width 128 0.012–0.087. Bounds (0.6, 0.25, 0.15) leave ~1.5× margin.
    """
    x = _images(3, seed=18)
    analytic = np.asarray(_mc_net("C4", 1, 2)[2](x, None, "ntk"))
    rms = {}
    for width in (8, 128):
        ntks = _empirical_ntks("C4", width, 2, x, range(8))
        errors = np.linalg.norm((ntks - analytic).reshape(len(ntks), -1), axis=1) / np.linalg.norm(analytic)
        rms[width] = float(np.sqrt(np.mean(errors ** 2)))
    averaged = _frob(ntks.mean(0), analytic)
    print(f"RMS relative error {rms}, error of the width-128 average {averaged:.4f}")
    assert rms[128] < 0.6 * rms[8], rms
    assert rms[128] < 0.25, rms
    assert averaged < 0.15, averaged


@pytest.mark.slow
@pytest.mark.parametrize("group", GROUPS)
def test_monte_carlo_error_falls_with_width(group):
    """Empirical NTKs of lifting → ReLU → group conv → ReLU → pool → dense on 8×8 images, 32
    initialisations per width: the RMS relative error over initialisations falls over widths
    16, 64, 256 (the fluctuation is mostly a random overall scale, ~1/√width), and the kernel
    averaged over the initialisations is close to the analytic one at width 256."""
    x = _images(3, seed=18)
    analytic = np.asarray(_mc_net(group, 1, 2)[2](x, None, "ntk"))
    rms, averaged = [], []
    for width in (16, 64, 256):
        ntks = _empirical_ntks(group, width, 2, x, range(32))
        errors = np.linalg.norm((ntks - analytic).reshape(len(ntks), -1), axis=1) / np.linalg.norm(analytic)
        rms.append(float(np.sqrt(np.mean(errors ** 2))))
        averaged.append(_frob(ntks.mean(0), analytic))
    print(f"{group}: widths 16/64/256, RMS relative error {rms}, error of the averaged kernel {averaged}")
    assert rms[0] > rms[1] > rms[2], rms
    assert rms[2] < 0.5 * rms[0], rms
    assert averaged[2] < 0.04, averaged


@pytest.mark.slow
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("depth", [1, 2])
def test_monte_carlo_first_layer_ntk_counted_once(group, depth):
    """The lifting layer's own contribution to the empirical NTK (its parameters' J Jᵀ, 16
    networks of width 256) equals the analytic first-layer contribution δ = Θ[Θ¹ = 2K¹] − Θ[Θ¹ = K¹].
    With the double count the analytic contribution would be 2δ: 50% off, not a few percent."""
    x = _images(3, seed=19)
    analytic = np.asarray(_mc_net(group, 1, depth)[2](x, None, "ntk"))
    delta = _doubled_first_layer_ntk(group, depth, x) - analytic
    part = _lifting_part_ntks(group, 256, depth, x, range(16)).mean(0)
    print(f"{group} depth {depth}: |δ|/|Θ| = {_frob(analytic + delta, analytic):.4f}, lifting part vs δ "
          f"{_frob(part, delta):.4f}, vs 2δ {_frob(part, 2 * delta):.4f}")
    assert _frob(part, delta) < 0.15, _frob(part, delta)
    assert _frob(part, 2 * delta) > 0.35
    if depth == 1:  # here the gap is large enough to see in the whole NTK as well
        total = _empirical_ntks(group, 256, depth, x, range(16)).mean(0)
        gap = _frob(analytic + delta, analytic)
        assert _frob(total, analytic) < 0.35 * gap, (_frob(total, analytic), gap)
