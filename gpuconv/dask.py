"""Convolutions and their gradients on Dask arrays, on any Dask scheduler.

Imported lazily: ``gpuconv.conv`` and friends route here when an argument is a
``dask.array.Array`` (recognised by its type's module, so importing gpuconv never
imports Dask).  Everything is built from Dask's own operations
(``dask.array.overlap.overlap``, ``map_blocks``, ``rechunk``, reductions); each
task calls gpuconv on one chunk, so NumPy chunks run on the CPU backend and CuPy
chunks on the CUDA kernels, in whichever worker Dask puts them.  The result is a
lazy Dask array whose chunk type is the input's.

Operands
--------
The data argument (``x`` for ``conv``/``conv_transpose``/``conv_weight_grad``,
``grad_out`` for ``conv_input_grad``/``conv_bias_grad``) may be chunked along any
axis.  ``weight`` and ``bias`` are NumPy/CuPy arrays or single-chunk Dask arrays
(anything else is a ``ValueError`` naming ``weight.chunks``).  A second data
operand (``grad_out`` of ``conv_weight_grad``) may be a Dask array of any chunking
(it is rechunked to match ``x``) or a plain array.  Chunk types must agree with
the other operands (NumPy chunks with NumPy weights, CuPy with CuPy): gpuconv
never copies between host and device.

Chunking rules (per spatial axis; ``s`` stride, ``d`` dilation, ``k`` kernel,
``(lo, hi)`` padding, ``eff = d*(k-1)+1``)
------------------------------------------------------------------------
* **Forward** (``conv``; also the input chunks of ``conv_weight_grad``): every
  interior chunk boundary ``b`` of ``x`` is moved down to a multiple of the stride,
  ``s*floor(b/s)``; boundaries at or past ``s*out`` are dropped; then a chunk
  shorter than the halo ``max(lo, eff - s - lo)`` is merged with the chunks that
  follow it until it is long enough (a short last chunk goes into the one
  before it).  If that changes anything,
  ``x`` is rechunked to those boundaries first.  Output chunk ``j`` is then
  ``[B_j / s, B_{j+1} / s)`` (the last one ends at ``out``): the outputs whose
  window starts at ``o*s - lo`` with ``o*s`` inside input chunk ``j``.  With
  stride 1 and ``padding='same'`` the output chunks are the input chunks.
  Each chunk receives a halo of ``lo`` elements on the left and
  ``max(eff - s - lo, 0)`` on the right from its neighbours (asymmetric when the
  padding is); outside the volume the padding is zero.
* **Input gradient** (``conv_input_grad``, ``conv_transpose``): interior chunk
  boundaries ``O`` of ``grad_out`` with ``s*O >= L`` are dropped and chunks shorter
  than the halo are merged as above; the result's chunk boundaries are ``s*O``
  (the last chunk ends at ``L``).  ``grad_out`` gets halos of
  ``max(ceil((eff - lo)/s) - 1, 0)`` on the left and ``ceil(lo/s)`` on the right.
* **Batch**: the result keeps the data argument's batch chunks.
* **Channels**: with ``groups == 1`` channel chunks of ``x`` (forward) or of
  ``grad_out`` (input gradient) are summed in a fixed pairwise order (half types
  in float32, rounded once); the result has one channel chunk.  With
  ``groups > 1`` every channel chunk must hold whole groups (a multiple of
  ``C/groups`` channels of ``x``, ``K/groups`` of ``grad_out``), else a
  ``ValueError`` names the chunks; the result's channel chunks hold the same
  groups.
* **Weight gradient**: one partial per block pair (``grad_out`` is rechunked to
  the forward output chunks of ``x``), reduced over batch and spatial blocks by
  Dask's tree reduction in float32/float64: the same chunking gives the same bits
  on every run and every scheduler.  The result's chunks follow the channel
  chunks: ``(grad_out's K chunks, x's C chunks, *kernel)`` with ``groups == 1``,
  ``(K chunks of x's groups, C/groups, *kernel)`` otherwise.  ``conv_bias_grad``
  is Dask's tree-reduced sum of ``grad_out`` (one chunk).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import dask.array as da
from dask.array.utils import meta_from_array

from . import _geometry as geo

__all__ = ["DaskBackend", "namespace", "array_namespace"]


# ----------------------------------------------------------------------------- helpers
def _kind_of_type(t) -> str | None:
    """'numpy' for numpy.ndarray itself (not subclasses such as masked arrays), 'cupy'
    for cupy.ndarray, None otherwise (CuPy recognised without importing it)."""
    if t is np.ndarray:
        return "numpy"
    if t.__module__.split(".")[0] == "cupy" and t.__name__ == "ndarray":
        return "cupy"
    return None


def _chunk_xp(a):
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


def _ascontiguous(b):
    return _chunk_xp(b).ascontiguousarray(b)


class _Namespace:
    """What ``gpuconv._dispatch.array_namespace`` returns for Dask arrays: ``dask.array``
    plus the few array-module helpers gpuconv's front end calls, and the backend."""

    gpuconv_namespace = "dask"

    def __getattr__(self, name):
        return getattr(da, name)

    @staticmethod
    def ascontiguousarray(a):
        return a.map_blocks(_ascontiguous, dtype=a.dtype)

    @staticmethod
    def backend(name):
        return DaskBackend(name)

    def __repr__(self):
        return "<gpuconv.dask.namespace: dask.array with NumPy or CuPy chunks>"


namespace = _Namespace()


def array_namespace(op, arrays):
    """Check a call's arrays when at least one is a Dask array: every Dask array has
    known chunk sizes and NumPy or CuPy chunks, all of one kind, which the plain arrays
    share; ``weight`` and ``bias`` given as Dask arrays are one chunk.  Returns
    :data:`namespace`."""
    kinds = {}
    for name, a in arrays.items():
        if a is None:
            continue
        if _is_dask(a):
            kinds[name] = _data_kind(op, name, a) + " chunks"
            if name in ("weight", "bias"):
                _small_operand(op, name, a, _data_kind(op, name, a))
        else:
            kinds[name] = _kind_of_type(type(a))
    if len({k.split()[0] for k in kinds.values()}) > 1:
        desc = ", ".join(f"{n} is {k}" for n, k in kinds.items())
        raise TypeError(f"{op}: numpy and cupy data mixed ({desc}); gpuconv never copies "
                        f"between host and device silently -- move them first")
    return namespace


def _is_dask(a):
    return isinstance(a, da.Array)


def _fmt_chunks(chunks):
    return "(" + ", ".join("(" + ", ".join(str(c) for c in ax) + ("," if len(ax) == 1 else "")
                           + ")" for ax in chunks) + ")"


def _data_kind(op, name, a):
    """Chunk type ('numpy'/'cupy') of a Dask array, with clear errors."""
    if any(math.isnan(c) for ax in a.chunks for c in ax):
        raise ValueError(f"{op}: {name} has unknown chunk sizes ({name}.chunks="
                         f"{a.chunks}); call {name}.compute_chunk_sizes() first")
    kind = _kind_of_type(type(a._meta))
    if kind is None:
        raise TypeError(f"{op}: {name} is a Dask array of {type(a._meta).__module__}."
                        f"{type(a._meta).__qualname__} chunks; gpuconv runs NumPy or CuPy chunks")
    return kind


def _small_operand(op, name, a, kind):
    """weight / bias: NumPy/CuPy, or a single-chunk Dask array, of the chunks' kind."""
    if a is None:
        return None
    if _is_dask(a):
        k = _data_kind(op, name, a)
        if any(len(ax) > 1 for ax in a.chunks):
            raise ValueError(f"{op}: {name} is a Dask array with {name}.chunks="
                             f"{_fmt_chunks(a.chunks)}; the {name} must be one chunk -- pass "
                             f"{name}.rechunk(-1) or a NumPy/CuPy array")
    else:
        k = _kind_of_type(type(a))
    if k != kind:
        raise TypeError(f"{op}: the data has {kind} chunks but {name} is {k}; gpuconv never "
                        f"copies between host and device silently -- move {name} first")
    return a


def _as_dask(op, name, a, kind):
    """A second data operand: Dask of the same chunk kind, or a plain array wrapped."""
    if _is_dask(a):
        k = _data_kind(op, name, a)
    else:
        k = _kind_of_type(type(a))
        a = da.from_array(a, chunks=a.shape, asarray=False)
    if k != kind:
        raise TypeError(f"{op}: the data has {kind} chunks but {name} has {k} chunks; gpuconv "
                        f"never copies between host and device silently")
    return a


def _starts(chunks):
    out = [0]
    for c in chunks:
        out.append(out[-1] + int(c))
    return tuple(out)


def _diffs(bounds):
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


def _merge_small(bounds, total, m):
    """Interior boundaries (sorted, in (0, total)) -> those left after merging every
    chunk shorter than m with the chunks after it (a short last one into the one before)."""
    kept = [0]
    for b in bounds:
        if b - kept[-1] >= m:
            kept.append(b)
    while len(kept) > 1 and total - kept[-1] < m:
        kept.pop()
    return kept


def _tree_sum(parts):
    """Fixed-order pairwise sum of a list of (lazy) arrays."""
    parts = list(parts)
    while len(parts) > 1:
        parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


@dataclasses.dataclass(frozen=True)
class _AxisPlan:
    """One spatial axis: the core ranges of the halo'd operand's chunks (``src``,
    with the halo ``(dl, dr)`` actually attached) and the result's chunk ranges
    (``dst``); plus the convolution's numbers on that axis."""

    src: tuple
    dst: tuple
    dl: int
    dr: int
    L: int
    out: int
    s: int
    d: int
    lo: int
    eff: int

    def provided(self, j):
        """Global range held by halo'd block j of the source."""
        nb = len(self.src) - 1
        return (self.src[j] - (self.dl if j > 0 else 0),
                self.src[j + 1] + (self.dr if j < nb - 1 else 0))


def _axis_numbers(g, i):
    k, s, d = g.kernel[i], g.stride[i], g.dilation[i]
    return dict(L=g.in_spatial[i], out=g.out_spatial[i], s=s, d=d, lo=g.pad_lo[i],
                eff=geo.effective_kernel(k, d))


def _forward_axis(g, i, chunks):
    """Chunks of x along spatial axis i -> (x chunks, plan); see the module docstring."""
    n = _axis_numbers(g, i)
    L, out, s, lo, eff = n["L"], n["out"], n["s"], n["lo"], n["eff"]
    dl, dr = lo, max(eff - s - lo, 0)
    cand = sorted({s * (b // s) for b in _starts(chunks)[1:-1] if 0 < b // s < out})
    kept = _merge_small(cand, L, max(dl, dr, 1))
    if len(kept) == 1:
        dl = dr = 0
    src = tuple(kept) + (L,)
    dst = tuple(b // s for b in kept) + (out,)
    return _diffs(src), _AxisPlan(src=src, dst=dst, dl=dl, dr=dr, **n)


def _input_grad_axis(g, i, chunks):
    """Chunks of grad_out along spatial axis i -> (grad_out chunks, plan)."""
    n = _axis_numbers(g, i)
    L, out, s, lo, eff = n["L"], n["out"], n["s"], n["lo"], n["eff"]
    dl, dr = max(-(-(eff - lo) // s) - 1, 0), -(-lo // s)
    cand = [b for b in _starts(chunks)[1:-1] if s * b < L]
    kept = _merge_small(cand, out, max(dl, dr, 1))
    if len(kept) == 1:
        dl = dr = 0
    src = tuple(kept) + (out,)
    dst = tuple(s * b for b in kept) + (L,)
    return _diffs(src), _AxisPlan(src=src, dst=dst, dl=dl, dr=dr, **n)


def _window(p, o0, o1):
    """Input range [A, E) read by outputs [o0, o1) on this axis."""
    return o0 * p.s - p.lo, (o1 - 1) * p.s - p.lo + p.eff


def _overlap(a, plans):
    depth = {2 + i: (p.dl, p.dr) for i, p in enumerate(plans) if p.dl or p.dr}
    if not depth:
        return a
    return da.overlap.overlap(a, depth=depth, boundary={ax: "none" for ax in depth},
                              allow_rechunk=False)


def _group_chunks(op, name, chunks, per_group, groups, what):
    """Channel chunks must hold whole groups; returns the group count of each chunk."""
    if groups == 1:
        return (1,) * len(chunks) if len(chunks) == 1 else None
    bad = [c for c in chunks if c % per_group]
    if bad:
        raise ValueError(
            f"{op}: {name} is chunked over its {what} channels as {name}.chunks[1]="
            f"{tuple(chunks)}, which splits a group: with groups={groups} every channel chunk "
            f"must hold whole groups of {per_group} channels ({bad[0]} is not a multiple of "
            f"{per_group}); rechunk it, e.g. {name}.rechunk({{1: {per_group * groups}}}) (one "
            f"chunk) or to chunks that are multiples of {per_group}")
    return tuple(c // per_group for c in chunks)


# ----------------------------------------------------------------------------- block tasks
@dataclasses.dataclass(frozen=True)
class _Task:
    op: str
    axes: tuple          # _AxisPlan per spatial axis
    ch: tuple            # channel starts of the result (forward: x chunks; igrad: grad_out chunks)
    Cg: int
    Kg: int
    kernel: tuple
    stride: tuple
    dilation: tuple
    backend: str
    acc: np.dtype | None  # cast chunks to this type first (half types' partials), or None


def _fwd_block(xb, w, b, *, block_id, t):
    import gpuconv
    j = block_id[1]
    c0, c1 = t.ch[j], t.ch[j + 1]
    gl = (c1 - c0) // t.Cg
    k0, k1 = c0 // t.Cg * t.Kg, c1 // t.Cg * t.Kg
    w = w[k0:k1]
    b = None if b is None else b[k0:k1]
    sl, pads, nout, empty = [slice(None)] * 2, [], [], False
    for p, jj in zip(t.axes, block_id[2:]):
        o0, o1 = p.dst[jj], p.dst[jj + 1]
        nout.append(o1 - o0)
        A, E = _window(p, o0, o1)
        a, e = max(A, 0), min(E, p.L)
        q0, q1 = p.provided(jj)
        if e <= a:
            empty = True
            continue
        assert q0 <= a and e <= q1, (t.op, p, jj, A, E)
        sl.append(slice(a - q0, e - q0))
        pads.append((a - A, E - e))
    xp = _chunk_xp(xb)
    if t.acc is not None:
        xb, w = xb.astype(t.acc), w.astype(t.acc)
        b = None if b is None else b.astype(t.acc)
    if empty:  # every window of this block lies in the zero padding
        y = xp.zeros((xb.shape[0], k1 - k0) + tuple(nout), dtype=xb.dtype)
        if b is not None:
            y += b.reshape((1, -1) + (1,) * len(nout))
        return y
    y = gpuconv.conv(xb[tuple(sl)], w, b, stride=t.stride, padding=tuple(pads),
                     dilation=t.dilation, groups=gl, backend=t.backend)
    assert y.shape[2:] == tuple(nout), (t.op, y.shape, nout)
    return y


def _igrad_block(gyb, w, *, block_id, t):
    import gpuconv
    j = block_id[1]
    k0, k1 = t.ch[j], t.ch[j + 1]
    gl = (k1 - k0) // t.Kg
    c0, c1 = k0 // t.Kg * t.Cg, k1 // t.Kg * t.Cg
    w = w[k0:k1]
    sl, pads, shape, place, empty = [slice(None)] * 2, [], [], [(0, 0)] * 2, False
    for p, jj in zip(t.axes, block_id[2:]):
        B0, B1 = p.dst[jj], p.dst[jj + 1]
        o_lo = max((B0 + p.lo - p.eff) // p.s + 1, 0)
        o_hi = min(-(-(B1 + p.lo) // p.s), p.out)
        if o_hi <= o_lo:
            empty = True
            continue
        A, E = _window(p, o_lo, o_hi)
        a, e = max(A, B0), min(E, B1)
        if e <= a:
            empty = True
            continue
        q0, q1 = p.provided(jj)
        assert q0 <= o_lo and o_hi <= q1, (t.op, p, jj, o_lo, o_hi)
        sl.append(slice(o_lo - q0, o_hi - q0))
        pads.append((a - A, E - e))
        shape.append(e - a)
        place.append((a - B0, B1 - e))
    xp = _chunk_xp(gyb)
    if t.acc is not None:
        gyb, w = gyb.astype(t.acc), w.astype(t.acc)
    core = tuple(p.dst[jj + 1] - p.dst[jj] for p, jj in zip(t.axes, block_id[2:]))
    if empty:
        return xp.zeros((gyb.shape[0], c1 - c0) + core, dtype=gyb.dtype)
    gx = gpuconv.conv_input_grad(gyb[tuple(sl)], w, (gyb.shape[0], c1 - c0) + tuple(shape),
                                 stride=t.stride, padding=tuple(pads), dilation=t.dilation,
                                 groups=gl, backend=t.backend)
    if any(lo or hi for lo, hi in place):
        gx = xp.pad(gx, place)
    assert gx.shape[2:] == core, (t.op, gx.shape, core)
    return gx


def _wgrad_block(xb, gyb, *, block_id, t, x_blocks):
    import gpuconv
    nd = len(t.axes)
    xj = block_id[1] if x_blocks > 1 else 0
    c0, c1 = t.ch[xj], t.ch[xj + 1]
    gl = (c1 - c0) // t.Cg
    Kc = gyb.shape[1]
    sl, pads, empty = [slice(None)] * 2, [], False
    for p, jj in zip(t.axes, block_id[2:2 + nd]):
        o0, o1 = p.dst[jj], p.dst[jj + 1]
        A, E = _window(p, o0, o1)
        a, e = max(A, 0), min(E, p.L)
        q0, q1 = p.provided(jj)
        if e <= a:
            empty = True
            continue
        assert q0 <= a and e <= q1, (t.op, p, jj, A, E)
        sl.append(slice(a - q0, e - q0))
        pads.append((a - A, E - e))
    xp = _chunk_xp(xb)
    acc = t.acc if t.acc is not None else xb.dtype
    shape = (1, Kc) + (1,) * nd + (t.Cg,) + tuple(t.kernel)
    if empty or Kc == 0:
        return xp.zeros(shape, dtype=acc)
    gw = gpuconv.conv_weight_grad(xb[tuple(sl)].astype(acc, copy=False),
                                  gyb.astype(acc, copy=False), (Kc, t.Cg) + tuple(t.kernel),
                                  stride=t.stride, padding=tuple(pads), dilation=t.dilation,
                                  groups=gl, backend=t.backend)
    return gw.reshape(shape)


# ----------------------------------------------------------------------------- backend
class DaskBackend:
    """What ``gpuconv._dispatch.get_backend`` returns for Dask arrays: builds the
    lazy graph; ``name`` is the per-chunk backend ('auto': by chunk type)."""

    def __init__(self, name=None):
        self.name = "auto" if name in (None, "auto") else name

    def _check(self, op, kind):
        from ._dispatch import BackendUnavailableError, get_backend
        if kind == "cupy":
            import cupy as xp
        else:
            xp = np
        try:  # raises now for a backend that cannot take the chunks
            get_backend(op, xp, self.name)
        except BackendUnavailableError:
            if kind != "cupy":  # CuPy chunks: the workers may hold GPUs the client lacks
                raise

    def _task(self, g, axes, ch, acc=None):
        return _Task(op=g.op, axes=tuple(axes), ch=tuple(ch), Cg=g.Cg, Kg=g.Kg,
                     kernel=g.kernel, stride=g.stride, dilation=g.dilation, backend=self.name,
                     acc=acc)

    # -- forward ---------------------------------------------------------------
    def forward(self, x, w, bias, g):
        op = g.op
        x = x if _is_dask(x) else _as_dask(op, "x", x, _kind_of_type(type(x)))
        kind = _data_kind(op, "x", x)
        w = _small_operand(op, "weight", w, kind)
        bias = _small_operand(op, "bias", bias, kind)
        self._check(op, kind)
        if g.groups == 1 and len(x.chunks[1]) > 1:
            # fixed-order sum over the input-channel chunks, in the accumulate type
            acc = g.accumulate_dtype
            starts = _starts(x.chunks[1])
            parts = []
            for c0, c1 in zip(starts[:-1], starts[1:]):
                if c1 == c0:  # an empty chunk contributes nothing
                    continue
                gj = dataclasses.replace(g, C=c1 - c0)
                parts.append(self._forward_core(x[:, c0:c1], w[:, c0:c1], None, gj,
                                                acc if acc != g.dtype else None))
            y = _tree_sum(parts)
            if bias is not None:
                y = y + bias.astype(acc).reshape((1, -1) + (1,) * g.nd)
            return y.astype(g.dtype)
        _group_chunks(op, "x", x.chunks[1], g.Cg, g.groups, "input")
        return self._forward_core(x, w, bias, g, None)

    def _forward_core(self, x, w, bias, g, acc):
        chunks, axes = [x.chunks[0], x.chunks[1]], []
        for i in range(g.nd):
            c, p = _forward_axis(g, i, x.chunks[2 + i])
            chunks.append(c)
            axes.append(p)
        x = x.rechunk(tuple(chunks))
        ch = _starts(x.chunks[1])
        kch = tuple(c // g.Cg * g.Kg for c in x.chunks[1])
        out_chunks = (x.chunks[0], kch) + tuple(_diffs(p.dst) for p in axes)
        dtype = np.dtype(acc) if acc is not None else g.dtype
        return da.map_blocks(_fwd_block, _overlap(x, axes), w=w, b=bias,
                             t=self._task(g, axes, ch, acc), chunks=out_chunks, dtype=dtype,
                             meta=meta_from_array(x, ndim=x.ndim, dtype=dtype))

    # -- input gradient --------------------------------------------------------
    def input_grad(self, gy, w, g, name="grad_out"):
        op = g.op
        gy = gy if _is_dask(gy) else _as_dask(op, name, gy, _kind_of_type(type(gy)))
        kind = _data_kind(op, name, gy)
        w = _small_operand(op, "weight", w, kind)
        self._check(op, kind)
        if g.groups == 1 and len(gy.chunks[1]) > 1:
            acc = g.accumulate_dtype
            starts = _starts(gy.chunks[1])
            parts = []
            for k0, k1 in zip(starts[:-1], starts[1:]):
                if k1 == k0:
                    continue
                gj = dataclasses.replace(g, K=k1 - k0)
                parts.append(self._input_grad_core(gy[:, k0:k1], w[k0:k1], gj,
                                                   acc if acc != g.dtype else None))
            return _tree_sum(parts).astype(g.dtype)
        _group_chunks(op, name, gy.chunks[1], g.Kg, g.groups,
                      "input" if name == "x" else "output")
        return self._input_grad_core(gy, w, g, None)

    def _input_grad_core(self, gy, w, g, acc):
        chunks, axes = [gy.chunks[0], gy.chunks[1]], []
        for i in range(g.nd):
            c, p = _input_grad_axis(g, i, gy.chunks[2 + i])
            chunks.append(c)
            axes.append(p)
        gy = gy.rechunk(tuple(chunks))
        ch = _starts(gy.chunks[1])
        cch = tuple(k // g.Kg * g.Cg for k in gy.chunks[1])
        out_chunks = (gy.chunks[0], cch) + tuple(_diffs(p.dst) for p in axes)
        dtype = np.dtype(acc) if acc is not None else g.dtype
        return da.map_blocks(_igrad_block, _overlap(gy, axes), w=w,
                             t=self._task(g, axes, ch, acc), chunks=out_chunks, dtype=dtype,
                             meta=meta_from_array(gy, ndim=gy.ndim, dtype=dtype))

    # -- weight gradient -------------------------------------------------------
    def weight_grad(self, x, gy, g):
        op = g.op
        kind = _data_kind(op, "x", x) if _is_dask(x) else _kind_of_type(type(x))
        x = _as_dask(op, "x", x, kind)
        gy = _as_dask(op, "grad_out", gy, kind)
        self._check(op, kind)
        if g.groups == 1 and len(x.chunks[1]) > 1:
            starts = _starts(x.chunks[1])
            parts = [self._weight_grad_core(x[:, c0:c1], gy, dataclasses.replace(g, C=c1 - c0))
                     for c0, c1 in zip(starts[:-1], starts[1:]) if c1 > c0]
            return da.concatenate(parts, axis=1)
        _group_chunks(op, "x", x.chunks[1], g.Cg, g.groups, "input")
        return self._weight_grad_core(x, gy, g)

    def _weight_grad_core(self, x, gy, g):
        nd = g.nd
        acc = g.accumulate_dtype
        chunks, axes = [x.chunks[0], x.chunks[1]], []
        for i in range(nd):
            c, p = _forward_axis(g, i, x.chunks[2 + i])
            chunks.append(c)
            axes.append(p)
        x = x.rechunk(tuple(chunks))
        kch = (tuple(c // g.Cg * g.Kg for c in x.chunks[1]) if g.groups > 1 else gy.chunks[1])
        gy = gy.rechunk((x.chunks[0], kch) + tuple(_diffs(p.dst) for p in axes))
        ch = _starts(x.chunks[1])
        part_chunks = ((1,) * len(x.chunks[0]), kch) + tuple((1,) * (len(p.dst) - 1)
                                                             for p in axes)
        part_chunks += ((g.Cg,),) + tuple((k,) for k in g.kernel)
        parts = da.map_blocks(_wgrad_block, _overlap(x, axes), gy,
                              t=self._task(g, axes, ch, acc), x_blocks=len(x.chunks[1]),
                              chunks=part_chunks, new_axis=list(range(2 + nd, 3 + 2 * nd)),
                              dtype=acc, meta=meta_from_array(x, ndim=3 + 2 * nd, dtype=acc))
        gw = parts.sum(axis=(0,) + tuple(range(2, 2 + nd)), dtype=acc)
        return gw.astype(g.dtype)
