"""Every pass, random geometry, every dtype, every backend -- against the float64 reference.

Hypothesis draws ranks 1-3, strides, every padding form, dilations, groups
(depthwise with channel multipliers 1 and 2 included), odd sizes, N in {0, 1, 2},
the four dtypes and three memory layouts (contiguous, non-contiguous,
negatively strided).  Each example runs the forward pass with and without
bias, the input, weight and bias gradients (and, separately, the transposed
convolution and the seed's forms) and compares with :mod:`gpuconv.reference`
under :func:`gpuconv.testing.tolerance`.  It also checks that inputs are left
untouched, that results never alias inputs, and that results keep the inputs'
dtype and array type.  The adjoint identities are checked in float64.

Examples per test depend on the backend (the emulator runs kernels on CPU
fibers and is slow): see ``EXAMPLES``; ``GPUCONV_HYPOTHESIS_SCALE`` multiplies
them (e.g. 10 for a long soak run).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gpuconv
from gpuconv import reference as ref
from gpuconv import testing as gt

DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32),
          np.dtype(np.float64))
LAYOUTS = ("contiguous", "strided", "reversed")

_SCALE = float(os.environ.get("GPUCONV_HYPOTHESIS_SCALE", "1"))
# examples per hypothesis test, per backend; 'small' backends also get smaller shapes.
# The emulator runs the kernels compiled by g++ on CPU fibers: fast enough on these
# tiny shapes (~0.01 s per call) for 50 examples; flip SMALL if that ever changes.
EXAMPLES = {"numpy": 150, "cudasim": 50, "cupy": 60}
SMALL = {"numpy": False, "cudasim": False, "cupy": False}


def _settings(backend, factor=1.0):
    return settings(max_examples=max(1, int(EXAMPLES[backend] * factor * _SCALE)),
                    deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    x_shape: tuple
    w_shape: tuple
    stride: object
    padding: object
    dilation: object
    groups: int
    dtype: np.dtype
    layout: str
    seed: int

    @property
    def kw(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)


def _per_dim(draw, nd, values):
    """An int or a per-dim tuple drawn from `values`."""
    if draw(st.booleans()):
        return draw(st.sampled_from(values))
    return tuple(draw(st.sampled_from(values)) for _ in range(nd))


def _as_tuple(v, nd):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


@st.composite
def conv_cases(draw, small=False, dtypes=DTYPES, min_n=0):
    nd = draw(st.integers(1, 3))
    kmax = 2 if (small and nd == 3) else 3
    dmax = 2 if nd == 3 or small else 3
    depthwise = draw(st.integers(0, 3)) == 0
    if depthwise:
        C = draw(st.integers(1, 2 if small else 4))
        groups, Cg, Kg = C, 1, draw(st.sampled_from((1, 2)))  # channel multiplier 1 or 2
    else:
        groups = draw(st.integers(1, 2 if small else 3))
        Cg = draw(st.integers(1, 2 if small else 3))
        Kg = draw(st.integers(1, 2 if small else 3))
    C, K = groups * Cg, groups * Kg
    N = draw(st.sampled_from((1, 2, 0)[:3 - min_n]))  # N = 0 drawn, but not most often
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(nd))
    stride = _per_dim(draw, nd, (1, 2, 3))
    dilation = _per_dim(draw, nd, tuple(range(1, dmax + 1)))
    d = _as_tuple(dilation, nd)
    form = draw(st.sampled_from(("pairs", "same", "int", "tuple", "valid")))
    if form == "int":
        padding = draw(st.integers(0, 2))
        lo = hi = (padding,) * nd
    elif form == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
        lo = hi = padding
    elif form == "pairs":
        padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(nd))
        lo, hi = tuple(p[0] for p in padding), tuple(p[1] for p in padding)
    else:
        padding = form
        lo = hi = (0,) * nd
    extra_max = 2 if (nd == 3 or small) else 4
    L = []
    for i in range(nd):
        eff = d[i] * (kernel[i] - 1) + 1
        lmin = 1 if form == "same" else max(1, eff - lo[i] - hi[i])
        L.append(lmin + draw(st.integers(0, extra_max)))
    if math.prod(L) * C > (120 if small else 400):
        assume(False)
    return Case(x_shape=(N, C) + tuple(L), w_shape=(K, Cg) + kernel, stride=stride,
                padding=padding, dilation=dilation, groups=groups,
                dtype=draw(st.sampled_from(dtypes)), layout=draw(st.sampled_from(LAYOUTS)),
                seed=draw(st.integers(0, 2**31 - 1)))


def make_array(rng, shape, dtype, layout):
    """Standard-normal data (never all zeros) of `dtype` in the requested memory layout."""
    if layout == "contiguous":
        return rng.standard_normal(shape).astype(dtype)
    if layout == "strided":
        # every other element of a larger buffer along the last two axes
        big = tuple(s * 2 if i >= len(shape) - 2 else s for i, s in enumerate(shape))
        a = rng.standard_normal(big).astype(dtype)
        return a[(Ellipsis,) + (slice(None, None, 2),) * min(2, len(shape))]
    if layout == "reversed":
        a = rng.standard_normal(shape).astype(dtype)
        return a[(slice(None, None, -1),) * len(shape)]
    raise ValueError(layout)


def f64(a):
    return gt.to_numpy(a).astype(np.float64)


# ----------------------------------------------------------------------------- call checks
def snapshot(*arrays):
    return [gt.to_numpy(a).tobytes() for a in arrays]


def _shares(a, b):
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.shares_memory(a, b)
    import cupy
    return cupy.shares_memory(a, b)


def check_call(fn, args, inputs, expected, dtype, what, array_type, scale=None, **kw):
    """Run fn(*args, **kw); inputs untouched, no aliasing, right type/dtype, close to reference.

    ``scale``: the reference evaluated on absolute values (the size of the summed
    terms), so outputs that cancel to almost zero are judged fairly."""
    before = snapshot(*inputs)
    out = fn(*args, **kw)
    assert snapshot(*inputs) == before, f"{what} modified an input"
    assert isinstance(out, array_type), f"{what}: result type {type(out)} is not {array_type}"
    assert out.dtype == dtype, f"{what}: result dtype {out.dtype} != {dtype}"
    for a in inputs:
        assert not _shares(out, a), f"{what}: result shares memory with an input"
    gt.assert_close(out, expected, dtype, what,
                    scale=None if scale is None else float(np.max(scale, initial=0.0)))
    return out


def run_all_passes(case, to_backend, array_type):
    rng = np.random.default_rng(case.seed)
    dt = case.dtype
    x = make_array(rng, case.x_shape, dt, case.layout)
    w = make_array(rng, case.w_shape, dt, case.layout)
    b = rng.standard_normal(case.w_shape[0]).astype(dt)
    y_shape = gpuconv.conv_output_shape(case.x_shape, case.w_shape, **case.kw)
    gy = make_array(rng, y_shape, dt, case.layout)
    X, W, B, GY = to_backend(x), to_backend(w), to_backend(b), to_backend(gy)
    x64, w64, b64, gy64 = f64(x), f64(w), f64(b), f64(gy)
    kw = case.kw
    tag = f"{case}"

    ax, aw, ab, agy = np.abs(x64), np.abs(w64), np.abs(b64), np.abs(gy64)
    bshape = (1, -1) + (1,) * (x.ndim - 2)

    y_ref = ref.conv(x64, w64, **kw)
    assert y_ref.shape == tuple(y_shape)
    y_abs = ref.conv(ax, aw, **kw)
    check_call(gpuconv.conv, (X, W), (X, W), y_ref, dt, f"conv {tag}", array_type, y_abs, **kw)
    check_call(gpuconv.conv, (X, W, B), (X, W, B), y_ref + b64.reshape(bshape), dt,
               f"conv+bias {tag}", array_type, y_abs + ab.reshape(bshape), **kw)
    check_call(gpuconv.conv_input_grad, (GY, W, case.x_shape), (GY, W),
               ref.conv_input_grad(gy64, w64, case.x_shape, **kw), dt, f"input_grad {tag}",
               array_type, ref.conv_input_grad(agy, aw, case.x_shape, **kw), **kw)
    check_call(gpuconv.conv_weight_grad, (X, GY, case.w_shape), (X, GY),
               ref.conv_weight_grad(x64, gy64, case.w_shape, **kw), dt, f"weight_grad {tag}",
               array_type, ref.conv_weight_grad(ax, agy, case.w_shape, **kw), **kw)
    check_call(gpuconv.conv_bias_grad, (GY,), (GY,), ref.conv_bias_grad(gy64), dt,
               f"bias_grad {tag}", array_type, ref.conv_bias_grad(agy))


def test_all_passes_random_geometry(backend, to_backend, array_type):
    @_settings(backend)
    @given(case=conv_cases(small=SMALL[backend]))
    def inner(case):
        run_all_passes(case, to_backend, array_type)

    inner()


def test_adjoint_identities_float64(backend, to_backend):
    """<conv(x,w), g> == <x, conv_input_grad(g,w)> == <w, conv_weight_grad(x,g)>."""
    @_settings(backend, 0.5)
    @given(case=conv_cases(small=SMALL[backend], dtypes=(np.dtype(np.float64),), min_n=1))
    def inner(case):
        rng = np.random.default_rng(case.seed)
        x = make_array(rng, case.x_shape, np.float64, case.layout)
        w = make_array(rng, case.w_shape, np.float64, case.layout)
        y = f64(gpuconv.conv(to_backend(x), to_backend(w), **case.kw))
        g = rng.standard_normal(y.shape)
        gx = f64(gpuconv.conv_input_grad(to_backend(g), to_backend(w), x.shape, **case.kw))
        gw = f64(gpuconv.conv_weight_grad(to_backend(x), to_backend(g), w.shape, **case.kw))
        a, b_, c = np.vdot(y, g), np.vdot(x, gx), np.vdot(w, gw)
        scale = max(np.vdot(np.abs(y), np.abs(g)), np.vdot(np.abs(x), np.abs(gx)),
                    np.vdot(np.abs(w), np.abs(gw)))
        assert abs(a - b_) <= 1e-12 * scale, (case, a, b_)
        assert abs(a - c) <= 1e-12 * scale, (case, a, c)

    inner()


# ----------------------------------------------------------------------------- seed forms
def test_seed_forms_random_geometry(backend, to_backend, array_type):
    """conv1d/2d/3d with an unbatched x and/or a shared kernel (K, *kernel)."""
    @_settings(backend, 0.5)
    @given(case=conv_cases(small=SMALL[backend], min_n=1), unbatched=st.booleans(),
           shared=st.booleans())
    def inner(case, unbatched, shared):
        if shared:  # shared kernels need groups == 1; reuse the geometry with one group
            K = case.w_shape[0]
            case = dataclasses.replace(case, groups=1, w_shape=(K, case.x_shape[1]) + case.w_shape[2:])
        if unbatched:
            case = dataclasses.replace(case, x_shape=(1,) + case.x_shape[1:])
        nd = len(case.w_shape) - 2
        fwd = getattr(gpuconv, f"conv{nd}d")
        dgrad = getattr(gpuconv, f"conv{nd}d_input_grad")
        wgrad = getattr(gpuconv, f"conv{nd}d_weight_grad")
        rng = np.random.default_rng(case.seed)
        dt = case.dtype
        x = make_array(rng, case.x_shape, dt, case.layout)
        K, C = case.w_shape[0], case.x_shape[1]
        if shared:
            w = make_array(rng, (K,) + case.w_shape[2:], dt, case.layout)
            w_full = np.repeat(f64(w)[:, None], C, axis=1)
        else:
            w = make_array(rng, case.w_shape, dt, case.layout)
            w_full = f64(w)
        y_ref = ref.conv(f64(x), w_full, **case.kw)
        gy = make_array(rng, y_ref.shape, dt, case.layout)
        gx_ref = ref.conv_input_grad(f64(gy), w_full, case.x_shape, **case.kw)
        gw_ref = ref.conv_weight_grad(f64(x), f64(gy), w_full.shape, **case.kw)
        ax, aw, agy = np.abs(f64(x)), np.abs(w_full), np.abs(f64(gy))
        y_abs = ref.conv(ax, aw, **case.kw)
        gx_abs = ref.conv_input_grad(agy, aw, case.x_shape, **case.kw)
        gw_abs = ref.conv_weight_grad(ax, agy, w_full.shape, **case.kw)
        if shared:
            gw_ref, gw_abs = gw_ref.sum(axis=1), gw_abs.sum(axis=1)
        xs, gys, xshape = x, gy, case.x_shape
        if unbatched:
            xs, gys, xshape = x[0], gy[0], case.x_shape[1:]
            y_ref, gx_ref = y_ref[0], gx_ref[0]
        X, W, GY = to_backend(xs), to_backend(w), to_backend(gys)
        check_call(fwd, (X, W), (X, W), y_ref, dt, f"conv{nd}d {case}", array_type, y_abs,
                   **case.kw)
        check_call(dgrad, (GY, W, xshape), (GY, W), gx_ref, dt, f"conv{nd}d_input_grad {case}",
                   array_type, gx_abs, **case.kw)
        check_call(wgrad, (X, GY, w.shape), (X, GY), gw_ref, dt,
                   f"conv{nd}d_weight_grad {case}", array_type, gw_abs, **case.kw)

    inner()


# ----------------------------------------------------------------------------- transpose
def ref_conv_transpose(x, w, b, stride, lo, hi, output_padding, dilation, groups):
    """Independent float64 scatter definition: input position o of x feeds output
    position o*stride + r*dilation - lo through tap r."""
    N, Cin = x.shape[:2]
    L = x.shape[2:]
    Coutg, kernel = w.shape[1], w.shape[2:]
    nd = len(L)
    out = tuple((L[i] - 1) * stride[i] - lo[i] - hi[i] + dilation[i] * (kernel[i] - 1)
                + output_padding[i] + 1 for i in range(nd))
    Cing = Cin // groups
    y = np.zeros((N, Coutg * groups) + out)
    for tap in itertools.product(*[range(k) for k in kernel]):
        pos = [np.arange(L[i]) * stride[i] + tap[i] * dilation[i] - lo[i] for i in range(nd)]
        ok = [(p >= 0) & (p < out[i]) for i, p in enumerate(pos)]
        if not all(o.any() for o in ok):
            continue
        for gi in range(groups):
            xs = x[:, gi * Cing:(gi + 1) * Cing]
            wt = w[(slice(gi * Cing, (gi + 1) * Cing), slice(None)) + tap]  # (Cing, Coutg)
            contrib = np.einsum("nc...,ck->nk...", xs, wt)
            contrib = contrib[(slice(None), slice(None)) + np.ix_(*[np.nonzero(o)[0] for o in ok])]
            ys = y[:, gi * Coutg:(gi + 1) * Coutg]
            ys[(slice(None), slice(None)) + np.ix_(*[p[o] for p, o in zip(pos, ok)])] += contrib
    if b is not None:
        y += b.reshape((1, -1) + (1,) * nd)
    return y


@st.composite
def transpose_cases(draw, small=False):
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2 if small else 3))
    Cing, Coutg = draw(st.integers(1, 2)), draw(st.integers(1, 2 if small else 3))
    N = draw(st.integers(0, 2))
    kernel = tuple(draw(st.integers(1, 2 if nd == 3 else 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    form = draw(st.sampled_from(("int", "tuple", "pairs")))
    if form == "int":
        p = draw(st.integers(0, 2))
        padding, lo, hi = p, (p,) * nd, (p,) * nd
    elif form == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(nd))
        lo = hi = padding
    else:
        padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(nd))
        lo, hi = tuple(q[0] for q in padding), tuple(q[1] for q in padding)
    opad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    L = tuple(draw(st.integers(1, 3 if nd == 3 else 5)) for _ in range(nd))
    out = [(L[i] - 1) * stride[i] - lo[i] - hi[i] + dilation[i] * (kernel[i] - 1) + opad[i] + 1
           for i in range(nd)]
    assume(min(out) >= 1)
    return dict(x_shape=(N, groups * Cing) + L, w_shape=(groups * Cing, Coutg) + kernel,
                stride=stride, padding=padding, lo=lo, hi=hi, output_padding=opad,
                dilation=dilation, groups=groups, bias=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)), layout=draw(st.sampled_from(LAYOUTS)),
                seed=draw(st.integers(0, 2**31 - 1)))


def test_conv_transpose_random_geometry(backend, to_backend, array_type):
    @_settings(backend, 0.5)
    @given(c=transpose_cases(small=SMALL[backend]))
    def inner(c):
        rng = np.random.default_rng(c["seed"])
        dt = c["dtype"]
        x = make_array(rng, c["x_shape"], dt, c["layout"])
        w = make_array(rng, c["w_shape"], dt, c["layout"])
        b = rng.standard_normal(c["w_shape"][1] * c["groups"]).astype(dt) if c["bias"] else None
        expected = ref_conv_transpose(f64(x), f64(w), None if b is None else f64(b), c["stride"],
                                      c["lo"], c["hi"], c["output_padding"], c["dilation"],
                                      c["groups"])
        scale = ref_conv_transpose(np.abs(f64(x)), np.abs(f64(w)),
                                   None if b is None else np.abs(f64(b)), c["stride"], c["lo"],
                                   c["hi"], c["output_padding"], c["dilation"], c["groups"])
        args = (to_backend(x), to_backend(w), to_backend(b))
        inputs = [a for a in args if a is not None]
        check_call(gpuconv.conv_transpose, args, inputs, expected, dt, f"conv_transpose {c}",
                   array_type, scale, stride=c["stride"], padding=c["padding"],
                   output_padding=c["output_padding"], dilation=c["dilation"],
                   groups=c["groups"])

    inner()


def test_transpose_reference_is_the_adjoint_of_conv():
    """The test's own transpose reference against conv's adjoint (no output_padding)."""
    rng = np.random.default_rng(0)
    for nd, s, d, p in [(1, 2, 1, 1), (2, 3, 2, 0), (3, 1, 1, 1), (2, 2, 2, 2)]:
        x = rng.standard_normal((2, 4) + (4,) * nd)      # transpose input = conv output
        w = rng.standard_normal((4, 3) + (3,) * nd)      # (C_in, C_out, *k)
        L = [(4 - 1) * s - 2 * p + d * 2 + 1] * nd
        z = rng.standard_normal((2, 3) + tuple(L))
        y = ref_conv_transpose(x, w, None, (s,) * nd, (p,) * nd, (p,) * nd, (0,) * nd,
                               (d,) * nd, 1)
        cz = ref.conv(z, w, stride=s, padding=p, dilation=d)
        assert cz.shape == x.shape
        assert np.vdot(y, z) == pytest.approx(np.vdot(x, cz), rel=1e-12)


# ----------------------------------------------------------------------------- awkward geometry
AWKWARD = [
    # id, x_shape, w_shape, kwargs
    ("stride>kernel", (2, 3, 11, 9), (4, 3, 2, 2), dict(stride=(4, 3))),
    ("stride>kernel-1d-pad", (1, 2, 13), (3, 2, 1), dict(stride=5, padding=2)),
    ("dilation+stride", (2, 2, 12, 10), (3, 2, 3, 2), dict(stride=(2, 3), dilation=(3, 2),
                                                            padding=1)),
    ("pad-hi-only", (1, 3, 6, 5), (2, 3, 3, 3), dict(padding=((0, 2), (0, 1)))),
    ("pad-lo-only-1d", (2, 2, 7), (2, 2, 4), dict(padding=((3, 0),), stride=2)),
    ("same-even-kernel", (2, 2, 7, 6), (3, 2, 4, 2), dict(padding="same")),
    ("same-even-kernel-stride", (1, 2, 9, 8), (2, 2, 2, 4), dict(padding="same", stride=(2, 3),
                                                                  dilation=(1, 2))),
    ("kernel==padded-input", (2, 2, 3, 4), (3, 2, 5, 6), dict(padding=1)),
    ("kernel==input-valid", (1, 3, 5), (2, 3, 5), dict(padding="valid")),
    ("depthwise-3d", (2, 3, 4, 5, 3), (3, 1, 3, 2, 3), dict(groups=3, padding=(1, 0, 1))),
    ("depthwise-3d-multiplier", (1, 2, 5, 4, 4), (4, 1, 2, 3, 2),
     dict(groups=2, stride=(2, 1, 2), dilation=(1, 1, 2), padding="same")),
    ("grouped-1x1", (2, 6, 5, 5), (9, 2, 1, 1), dict(groups=3, stride=2)),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("x_shape,w_shape,kw", [a[1:] for a in AWKWARD], ids=[a[0] for a in AWKWARD])
def test_awkward_geometry(backend, to_backend, array_type, x_shape, w_shape, kw, dtype):
    case = Case(x_shape=x_shape, w_shape=w_shape, stride=kw.get("stride", 1),
                padding=kw.get("padding", 0), dilation=kw.get("dilation", 1),
                groups=kw.get("groups", 1), dtype=np.dtype(dtype), layout="contiguous", seed=11)
    run_all_passes(case, to_backend, array_type)
    if dtype == np.float64:
        rng = np.random.default_rng(3)
        gt.gradcheck(to_backend(rng.standard_normal(x_shape)),
                     to_backend(rng.standard_normal(w_shape)),
                     to_backend(rng.standard_normal(w_shape[0])),
                     points=6 if backend == "numpy" else 2, rng=5, **kw)
