"""Argument parsing, validation and size arithmetic -- done once, here only.

Every public entry point turns its arguments into one frozen :class:`ConvGeometry`
before any work starts.  Backends read sizes from it and never re-derive them.
Every error names the operation, the argument, the value received and the sizes
involved.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "DTYPES",
    "ConvGeometry",
    "accumulate_dtype",
    "check_dtype",
    "conv_geometry",
    "dgrad_as_forward",
    "effective_kernel",
    "flip_weight",
    "output_size",
    "resolve_padding",
    "stride_phases",
    "transpose_geometry",
]


@dataclass(frozen=True)
class DtypeInfo:
    """One supported dtype: its entry-point suffix, C++ storage type and accumulate type."""

    name: str
    suffix: str
    ctype: str
    accumulate: str


# THE dtype table: every supported dtype, in the order entry points are emitted
DTYPES = {d.name: d for d in (
    DtypeInfo("float16", "f16", "gc_half", "float32"),
    DtypeInfo("bfloat16", "bf16", "gc_bf16", "float32"),
    DtypeInfo("float32", "f32", "float", "float32"),
    DtypeInfo("float64", "f64", "double", "float64"),
)}
DTYPES_TEXT = "float16, bfloat16 (ml_dtypes), float32 and float64"


@functools.lru_cache(maxsize=64)
def dtype_name(dt: np.dtype) -> str:
    """``dt.name``, cached (numpy derives the name anew on every access: per-call cost)."""
    return dt.name


def resolve_dtype(dtype, what: str = "dtype") -> np.dtype:
    """A supported dtype from a dtype or its name ('bfloat16' needs ml_dtypes)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(f"{what}='bfloat16' needs the ml_dtypes package "
                            f"(pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    dt = np.dtype(dtype)
    if dt.name not in DTYPES:
        raise TypeError(f"{what}={dtype!r}: supported dtypes are {DTYPES_TEXT}")
    return dt


def available_dtypes() -> list:
    """[(name, numpy dtype)] of the supported dtypes usable here (bfloat16 needs ml_dtypes)."""
    out = []
    for name in DTYPES:
        try:
            out.append((name, resolve_dtype(name)))
        except TypeError:
            pass
    return out


def accumulate_dtype(dtype) -> np.dtype:
    """The type sums are accumulated in: float64 for float64, float32 otherwise
    (half types are accumulated in float32 and rounded once)."""
    return np.dtype(DTYPES[dtype_name(np.dtype(dtype))].accumulate)


def effective_kernel(k: int, d: int) -> int:
    """Extent of a kernel of `k` taps dilated by `d`: d*(k-1) + 1."""
    return d * (k - 1) + 1


@dataclass(frozen=True)
class ConvGeometry:
    """Everything a backend needs to know about one convolution.

    The convolution is always described in its forward direction:
    x ``(N, C, *in_spatial)`` * w ``(K, C // groups, *kernel)`` -> y
    ``(N, K, *out_spatial)``.  Input and weight gradients use the same object.
    """

    op: str
    N: int
    C: int
    K: int
    groups: int
    in_spatial: tuple
    kernel: tuple
    out_spatial: tuple
    stride: tuple
    dilation: tuple
    pad_lo: tuple
    pad_hi: tuple
    dtype: np.dtype

    @property
    def nd(self) -> int:
        return len(self.kernel)

    @property
    def Cg(self) -> int:
        return self.C // self.groups

    @property
    def Kg(self) -> int:
        return self.K // self.groups

    @property
    def x_shape(self) -> tuple:
        return (self.N, self.C) + self.in_spatial

    @property
    def w_shape(self) -> tuple:
        return (self.K, self.Cg) + self.kernel

    @property
    def y_shape(self) -> tuple:
        return (self.N, self.K) + self.out_spatial

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)

    @property
    def depthwise(self) -> bool:
        """One input channel per group (groups == C), any channel multiplier."""
        return self.Cg == 1 and self.groups > 1

    @property
    def flops(self) -> int:
        """Multiply-adds counted as 2 FLOPs, for one pass."""
        return 2 * self.N * self.K * self.Cg * self.taps * math.prod(self.out_spatial)

    @property
    def effective_kernel(self) -> tuple:
        """Per spatial dim, the extent of the dilated kernel: dilation*(k-1) + 1."""
        return tuple(effective_kernel(k, d) for k, d in zip(self.kernel, self.dilation))

    @property
    def dtype_info(self) -> DtypeInfo:
        return DTYPES[dtype_name(np.dtype(self.dtype))]

    @property
    def accumulate_dtype(self) -> np.dtype:
        return accumulate_dtype(self.dtype)

    def padded_spatial(self) -> tuple:
        return tuple(l + lo + hi for l, lo, hi in zip(self.in_spatial, self.pad_lo, self.pad_hi))


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _as_int(op: str, name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an integer, got {value!r}") from None


def int_tuple(op: str, name: str, value, nd: int, minimum=None) -> tuple:
    """THE sequence-argument normaliser: an int, or any non-string sequence of nd ints,
    as an nd-tuple of ints, each >= minimum (None: unchecked)."""
    if hasattr(value, "__iter__") and not isinstance(value, str):
        value = tuple(value) if not isinstance(value, (list, tuple)) else value
        if len(value) != nd:
            raise ValueError(
                f"{op}: {name}={value!r} has {len(value)} entries, expected 1 int or {nd} "
                f"(one per spatial dimension)")
        out = tuple(_as_int(op, name, v) for v in value)
    else:
        out = (_as_int(op, name, value),) * nd
    if minimum is not None:
        for v in out:
            if v < minimum:
                raise ValueError(f"{op}: {name}={value!r} must be >= {minimum} in every dimension")
    return out


_int_tuple = int_tuple


def resolve_padding(op: str, padding, in_spatial: Sequence[int], kernel: Sequence[int],
                    stride: Sequence[int], dilation: Sequence[int], *, allow_strings=True):
    """Return (pad_lo, pad_hi) tuples for any accepted padding form.

    Forms: int; per-dim tuple of ints; per-dim tuple of (lo, hi) pairs; 'valid';
    'same'.  For 1-d, a plain pair of ints ``(lo, hi)`` is accepted too.  'same' gives out = ceil(L / stride) (TensorFlow/JAX SAME); with
    stride 1 that keeps every size, for any kernel and dilation.  An odd total
    padding puts the extra element on the high side.
    """
    nd = len(kernel)
    if isinstance(padding, str):
        if not allow_strings:
            raise ValueError(f"{op}: padding={padding!r}: string padding is not supported here; "
                             f"give an int, a per-dim tuple or (lo, hi) pairs")
        mode = padding.lower()
        if mode == "valid":
            return (0,) * nd, (0,) * nd
        if mode == "same":
            lo, hi = [], []
            for L, k, s, d in zip(in_spatial, kernel, stride, dilation):
                out = -(-L // s)
                total = max((out - 1) * s + effective_kernel(k, d) - L, 0)
                lo.append(total // 2)
                hi.append(total - total // 2)
            return tuple(lo), tuple(hi)
        raise ValueError(f"{op}: unknown padding={padding!r}; expected an int, a tuple, "
                         f"(lo, hi) pairs, 'valid' or 'same'")
    if isinstance(padding, (list, tuple)):
        if nd == 1 and len(padding) == 2 and not any(isinstance(p, (list, tuple)) for p in padding):
            padding = (tuple(padding),)  # 1-d: a pair of ints can only mean (lo, hi)
        if len(padding) != nd:
            raise ValueError(
                f"{op}: padding={padding!r} has {len(padding)} entries, expected 1 int, {nd} ints "
                f"or {nd} (lo, hi) pairs for a {nd}-d convolution")
        lo, hi = [], []
        for p in padding:
            if isinstance(p, (list, tuple)):
                if len(p) != 2:
                    raise ValueError(f"{op}: padding={padding!r}: each pair must be (lo, hi), got {p!r}")
                a, b = _as_int(op, "padding", p[0]), _as_int(op, "padding", p[1])
            else:
                a = b = _as_int(op, "padding", p)
            lo.append(a)
            hi.append(b)
    else:
        v = _as_int(op, "padding", padding)
        lo, hi = [v] * nd, [v] * nd
    if min(lo + hi) < 0:
        raise ValueError(f"{op}: padding={padding!r} must not be negative")
    return tuple(lo), tuple(hi)


def output_size(L: int, k: int, s: int, d: int, lo: int, hi: int) -> int:
    """floor((L + lo + hi - d*(k-1) - 1) / s) + 1 (may be < 1: caller checks)."""
    return (L + lo + hi - effective_kernel(k, d)) // s + 1


def transposed_output_size(L: int, k: int, s: int, d: int, lo: int, hi: int, opad: int) -> int:
    """(L - 1)*s - lo - hi + d*(k-1) + 1 + output_padding (may be < 1: caller checks)."""
    return (L - 1) * s - lo - hi + effective_kernel(k, d) + opad


def check_dtype(op: str, arrays: dict) -> np.dtype:
    """All named arrays must share one supported floating dtype; return it."""
    first = None
    for a in arrays.values():  # common case first: one native dtype object, supported
        if a is not None:
            if first is None:
                first = a.dtype
            elif a.dtype is not first:
                break
    else:
        if first is not None and first.isnative and dtype_name(first) in DTYPES:
            return first
    dtypes = {}
    for name, a in arrays.items():
        if a is None:
            continue
        dt = np.dtype(a.dtype)
        if dtype_name(dt) not in DTYPES:
            raise TypeError(f"{op}: {name} has dtype {dt.name}; supported dtypes are {DTYPES_TEXT}")
        dtypes[name] = dt
    if not dtypes:
        raise TypeError(f"{op}: no array given")
    if len({d.name for d in dtypes.values()}) > 1:
        desc = ", ".join(f"{n}={_dtype_text(d)}" for n, d in dtypes.items())
        raise TypeError(f"{op}: all arrays must share one dtype, got {desc}; cast them first")
    if len({_byte_order(d) for d in dtypes.values()}) > 1:
        desc = ", ".join(f"{n} is {_dtype_text(d, True)}" for n, d in dtypes.items())
        raise TypeError(f"{op}: all arrays must share one byte order, got {desc}; convert them "
                        f"to one first, e.g. a.astype(a.dtype.newbyteorder('='))")
    return next(iter(dtypes.values())).newbyteorder("=")


def _byte_order(dt: np.dtype) -> str:
    """'big-endian' or 'little-endian' ('|' single-byte types count as native)."""
    import sys
    if dt.byteorder in ("=", "|"):
        return sys.byteorder + "-endian"
    return "big-endian" if dt.byteorder == ">" else "little-endian"


def _dtype_text(dt: np.dtype, always=False) -> str:
    """'float64', or with the byte order where it is not native (or always): 'big-endian
    float64 ('>f8')'."""
    if dt.isnative and not always:
        return dt.name
    return f"{_byte_order(dt)} {dt.name} ({dt.str!r})"


def _shape_of(op: str, name: str, shape) -> tuple:
    try:
        out = tuple(_as_int(op, name, s) for s in shape)
    except TypeError:
        raise TypeError(f"{op}: {name} must be a sequence of ints, got {shape!r}") from None
    if any(s < 0 for s in out):
        raise ValueError(f"{op}: {name}={shape!r} has a negative size; every size must be >= 0")
    return out


def _exact(v) -> bool:
    """v is made of plain ints and strs (tuples of them, nested): a memo key that no
    other accepted value equals (True == 1 and 2.0 == 2 are kept out)."""
    t = type(v)
    if t is int or t is str:
        return True
    if t is not tuple:
        return False
    for e in v:
        t = type(e)
        if t is not int and t is not str and not (t is tuple and _exact(e)):
            return False
    return True


def conv_geometry(op: str, x_shape, w_shape, *, stride=1, padding=0, dilation=1, groups=1,
                  dtype=np.float32, allow_string_padding=True,
                  names=("x.shape", "weight.shape"), memo=True) -> ConvGeometry:
    """Validate a forward convolution x * w and derive every size.

    x_shape: (N, C, *spatial); w_shape: (K, C // groups, *kernel).  The spatial
    rank is taken from the weight.  ``names`` label the two shapes in error
    messages (the gradients pass e.g. ``"input_shape"`` / ``"weight_shape"``).
    Memoized (unless ``memo`` is false: tracers that must see no cache) for arguments
    of plain ints/tuples, so a layer called again skips the validation (a few tens of
    microseconds a call); anything else is validated anew.
    """
    args = (op, x_shape, w_shape, stride, padding, dilation, groups, dtype,
            bool(allow_string_padding), names)
    if memo and _exact((op, x_shape, w_shape, stride, padding, dilation, groups, names)) and \
            isinstance(dtype, (np.dtype, type)):
        return _memo_geometry(*args)
    return _conv_geometry(*args)


@functools.lru_cache(maxsize=512)
def _memo_geometry(*args) -> ConvGeometry:
    return _conv_geometry(*args)


def _conv_geometry(op, x_shape, w_shape, stride, padding, dilation, groups, dtype,
                   allow_string_padding, names) -> ConvGeometry:
    xn, wn = names
    x_shape = _shape_of(op, xn, x_shape)
    w_shape = _shape_of(op, wn, w_shape)
    if len(w_shape) not in (3, 4, 5):
        raise ValueError(
            f"{op}: {wn.split('.')[0]} must have shape (K, C/groups, *kernel) with 1, 2 or 3 kernel dims, "
            f"got {wn}={_fmt_shape(w_shape)} ({len(w_shape)} dims)")
    nd = len(w_shape) - 2
    if len(x_shape) != nd + 2:
        what = xn.split(".")[0]  # "x" or "input_shape"
        raise ValueError(
            f"{op}: {what} must have shape (N, C, *spatial) with {nd} spatial dims to match "
            f"{wn}={_fmt_shape(w_shape)}, got {xn}={_fmt_shape(x_shape)} "
            f"({len(x_shape)} dims)")
    N, C = x_shape[:2]
    K, Cg = w_shape[:2]
    in_spatial, kernel = x_shape[2:], w_shape[2:]
    g = _as_int(op, "groups", groups)
    if g < 1:
        raise ValueError(f"{op}: groups={groups!r} must be >= 1")
    if C % g:
        raise ValueError(f"{op}: groups={g} does not divide input channels C={C} "
                         f"({xn}={_fmt_shape(x_shape)})")
    if K % g:
        raise ValueError(f"{op}: groups={g} does not divide output channels K={K} "
                         f"({wn}={_fmt_shape(w_shape)})")
    if Cg * g != C:
        raise ValueError(
            f"{op}: channel mismatch: x has C={C} channels, so with groups={g} weight.shape[1] "
            f"must be C/groups={C // g}, got {wn}={_fmt_shape(w_shape)}")
    if K == 0 or C == 0 or min(kernel, default=1) < 1:
        raise ValueError(f"{op}: empty channel or kernel dimension: {xn}={_fmt_shape(x_shape)}, "
                         f"{wn}={_fmt_shape(w_shape)}")
    if min(in_spatial) < 1:
        raise ValueError(f"{op}: {xn}={_fmt_shape(x_shape)} has an empty spatial dimension")
    s = _int_tuple(op, "stride", stride, nd, 1)
    d = _int_tuple(op, "dilation", dilation, nd, 1)
    lo, hi = resolve_padding(op, padding, in_spatial, kernel, s, d,
                             allow_strings=allow_string_padding)
    _check_extents(op, padding, in_spatial, lo, hi, xn, x_shape)
    # a stride longer than the padded input (one output position) or the dilation of a
    # one-tap kernel cannot change the result: bounded by the padded size, so a valid
    # stride=2**70 never reaches the kernels' 32-bit or NumPy's 64-bit arithmetic
    padded = tuple(L + a + b for L, a, b in zip(in_spatial, lo, hi))
    d = tuple(1 if k == 1 and dd > P else dd for k, dd, P in zip(kernel, d, padded))
    s = tuple(min(st, P) for st, P in zip(s, padded))
    out = tuple(output_size(*a) for a in zip(in_spatial, kernel, s, d, lo, hi))
    if min(out) < 1:
        i = int(np.argmin(out))
        eff = effective_kernel(kernel[i], d[i])
        raise ValueError(
            f"{op}: effective kernel size {eff} (kernel {kernel[i]}, dilation {d[i]}) exceeds the "
            f"padded input size {in_spatial[i] + lo[i] + hi[i]} (input {in_spatial[i]}, padding "
            f"({lo[i]}, {hi[i]})) in spatial dim {i}: output size would be {out[i]}; "
            f"{xn}={_fmt_shape(x_shape)}, {wn}={_fmt_shape(w_shape)}")
    geom = ConvGeometry(op=op, N=N, C=C, K=K, groups=g, in_spatial=in_spatial, kernel=kernel,
                        out_spatial=out, stride=s, dilation=d, pad_lo=lo, pad_hi=hi,
                        dtype=np.dtype(dtype))
    _check_total(op, geom, padding, xn, wn)
    return geom


# Largest extent of one spatial dimension, padding included: every kernel indexes a
# dimension with 32-bit integers (the tensors as a whole may be larger).
MAX_EXTENT = 2**31 - 1


def _check_extents(op, padding, in_spatial, lo, hi, xn, x_shape):
    for i, (L, a, b) in enumerate(zip(in_spatial, lo, hi)):
        if L + a + b > MAX_EXTENT:
            what = f"padding={padding!r}" if L <= MAX_EXTENT else f"{xn}={_fmt_shape(x_shape)}"
            raise ValueError(
                f"{op}: {what} would need a padded spatial dim {i} of {L + a + b} elements "
                f"(input {L}, padding ({a}, {b})); at most {MAX_EXTENT} (2**31 - 1) per "
                f"dimension are supported")


def _check_total(op, g, padding, xn, wn):
    """Every tensor of the problem must be allocatable (bytes within the address space)."""
    import sys
    it = np.dtype(g.dtype).itemsize
    for what, shape in (("the output", g.y_shape), ("the input", g.x_shape),
                        ("the weight", g.w_shape)):
        n = math.prod(shape)
        if n * it > sys.maxsize:
            cause = (f"padding={padding!r}" if what == "the output" and any(g.pad_lo + g.pad_hi)
                     else f"{xn}={_fmt_shape(g.x_shape)}, {wn}={_fmt_shape(g.w_shape)}")
            raise ValueError(f"{op}: {cause} would need {what} of shape {_fmt_shape(shape)}: "
                             f"{n} elements, {n * it} bytes, more than this machine can address")


def check_shape(op: str, name: str, got, expected, why: str) -> None:
    got = tuple(got)
    if got != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {_fmt_shape(got)}, expected "
                         f"{_fmt_shape(expected)} ({why})")


def transpose_output_padding(op: str, output_padding, nd: int, stride, dilation) -> tuple:
    op_t = _int_tuple(op, "output_padding", output_padding, nd, 0)
    for o, s, d in zip(op_t, stride, dilation):
        if o >= s and o >= d:
            raise ValueError(
                f"{op}: output_padding={output_padding!r} must be smaller than stride={stride!r} "
                f"or dilation={dilation!r} in every dimension")
    return op_t


# ----------------------------------------------------------------------------- transposed
def transpose_geometry(op: str, x_shape, w_shape, *, stride=1, padding=0, output_padding=0,
                       dilation=1, groups=1, dtype=np.float32, rank=None,
                       names=("x.shape", "weight.shape"), memo=True):
    """Validate a transposed convolution and return ``(g, L)``.

    ``g`` is the matching forward convolution ``(N, C_out, *out) -> (N, C_in, *L')``
    with weight ``(C_in, C_out/groups, *kernel)``: the transposed convolution of x
    ``(N, C_in, *L)`` is that convolution's input gradient.  ``L' == L`` unless
    output_padding >= stride (allowed when < dilation): then the forward output has
    extra trailing positions that x does not feed (zero there; cropped from gradients).
    ``memo``: as for :func:`conv_geometry`.
    """
    xn, wn = names
    x_shape = _shape_of(op, xn, x_shape)
    w_shape = _shape_of(op, wn, w_shape)
    ranks = (3, 4, 5) if rank is None else (rank + 2,)
    if len(w_shape) not in ranks:
        raise ValueError(f"{op}: weight must have {' or '.join(map(str, ranks))} dims "
                         f"((C_in, C_out/groups, *kernel)), got {wn}={_fmt_shape(w_shape)}")
    nd = len(w_shape) - 2
    if len(x_shape) != nd + 2:
        raise ValueError(f"{op}: x must have {nd + 2} dims ((N, C_in, *spatial) with {nd} spatial "
                         f"dims), got {xn}={_fmt_shape(x_shape)}")
    N, Cin = x_shape[:2]
    L = tuple(x_shape[2:])
    if min(L) < 1 or Cin < 1:
        raise ValueError(f"{op}: {xn}={_fmt_shape(x_shape)} has an empty channel or "
                         f"spatial dimension")
    gr = _as_int(op, "groups", groups)
    if gr < 1 or Cin % gr:
        raise ValueError(f"{op}: groups={groups!r} must be >= 1 and divide the input channels "
                         f"C_in={Cin} ({xn}={_fmt_shape(x_shape)})")
    if w_shape[0] != Cin:
        raise ValueError(f"{op}: channel mismatch: x has C_in={Cin} channels but weight.shape[0]="
                         f"{w_shape[0]} (weight is (C_in, C_out/groups, *kernel), "
                         f"{wn}={_fmt_shape(w_shape)})")
    kernel = w_shape[2:]
    s = _int_tuple(op, "stride", stride, nd, 1)
    d = _int_tuple(op, "dilation", dilation, nd, 1)
    lo, hi = resolve_padding(op, padding, L, kernel, s, d, allow_strings=False)
    opad = transpose_output_padding(op, output_padding, nd, s, d)
    out = tuple(transposed_output_size(*a) for a in zip(L, kernel, s, d, lo, hi, opad))
    for i, o in enumerate(out):
        if o > MAX_EXTENT:
            raise ValueError(
                f"{op}: stride={stride!r}, dilation={dilation!r}, output_padding="
                f"{output_padding!r} would need an output spatial dim {i} of {o} elements "
                f"for {xn}={_fmt_shape(x_shape)}, {wn}={_fmt_shape(w_shape)}; at most "
                f"{MAX_EXTENT} (2**31 - 1) per dimension are supported")
    if min(out) < 1:
        raise ValueError(f"{op}: output size {out} is not positive for {xn}="
                         f"{_fmt_shape(x_shape)}, {wn}={_fmt_shape(w_shape)}, "
                         f"stride={stride!r}, padding={padding!r}, dilation={dilation!r}")
    g = conv_geometry(op, (N, w_shape[1] * gr) + out, w_shape, stride=s,
                      padding=tuple(zip(lo, hi)), dilation=d, groups=gr, dtype=dtype, memo=memo)
    return g, L


def leading_box(spatial) -> tuple:
    """Index of the leading ``spatial`` box of an (N, C, *S) array: [:, :, :L0, :L1, ...]."""
    return (slice(None), slice(None)) + tuple(slice(0, l) for l in spatial)


# ----------------------------------------------------------------------------- input gradient
@functools.lru_cache(maxsize=1024)
def dgrad_as_forward(g: ConvGeometry):
    """Geometry of the stride-1 input gradient written as a forward convolution of
    grad_out with the flipped, channel-swapped weight (:func:`flip_weight`), or None
    when that needs a negative padding (padding wider than the kernel's reach) or
    stride > 1."""
    if any(s != 1 for s in g.stride):
        return None
    reach = tuple(e - 1 for e in g.effective_kernel)
    lo = tuple(r - p for r, p in zip(reach, g.pad_lo))
    hi = tuple(r - p for r, p in zip(reach, g.pad_hi))
    if min(lo + hi) < 0:
        return None
    return dataclasses.replace(g, C=g.K, K=g.C, in_spatial=g.out_spatial,
                               out_spatial=g.in_spatial, pad_lo=lo, pad_hi=hi)


def flip_weight(w, g: ConvGeometry):
    """w (K, C/G, *k) -> w' (C, K/G, *k) with w'[c, k', t] = w[k, c', T-1-t] per group
    (a view where the array type allows; numpy and cupy alike)."""
    G, Kg, Cg = g.groups, g.Kg, g.Cg
    wv = w.reshape((G, Kg, Cg) + g.kernel).swapaxes(1, 2)
    wv = wv[(Ellipsis,) + (slice(None, None, -1),) * g.nd]
    return wv.reshape((g.C, Kg) + g.kernel)


def stride_phases(g: ConvGeometry) -> tuple:
    """The stride-phase decomposition of the input gradient, per spatial dim padded
    to 3 (leading dims stride 1): (step, inv, gcd) such that the taps r with
    r*dilation = i + pad (mod stride) are r = r0 + j*step,
    r0 = ((q mod stride)/gcd * inv) mod step."""
    out = []
    for s, d in zip((1,) * (3 - g.nd) + g.stride, (1,) * (3 - g.nd) + g.dilation):
        gcd = math.gcd(s, d)
        step = s // gcd
        inv = pow(d // gcd, -1, step) if step > 1 else 0
        out += [step, inv, gcd]
    return tuple(out)
