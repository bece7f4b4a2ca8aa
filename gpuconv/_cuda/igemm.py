"""Plans of the implicit-GEMM engine (kernels/igemm.cuh, kernels/conv_igemm.cu).

Everything here is arithmetic on the geometry: which tile configuration, how many
split-K slices, the stride phases of the input gradient and the kernel's scalar
parameter list (``GC_FP_PARAMS``).  The launches themselves go through
:func:`gpuconv._cuda.launch.launch` from :mod:`gpuconv._cuda.backend`.

GEMM views (CUTLASS's implicit GEMM), per group:
  forward      M = N*P*Q, N = K/G, K = C/G * taps
  input grad   M = N*H*W per stride phase, N = C/G, K = K/G * taps of the phase
  weight grad  M = K/G, N = C/G * taps, K = N*P*Q (split-K, fixed-order second pass)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .._runtimes.limits import INT32_LIMIT, MAX_GRID

# tile configurations of conv_igemm.cu (gc_cfg_l / gc_cfg_s in igemm.cuh)
CONFIGS = {
    "l": dict(BM=128, BN=128, BK=8, NT=256),
    "s": dict(BM=64, BN=64, BK=8, NT=64),
}
# tensor-op policy (gc_tc_l / gc_tc_s, float16/bfloat16, every pass): same BM x BN tiles,
# BK = 16 (one m16n8k16 step), NS = 3 shared stages, A [BK][BM+8] + B [BN][BK+8] halves
TC_CONFIGS = {
    "l": dict(BM=128, BN=128, BK=16, NT=256, NS=3),
    "s": dict(BM=64, BN=64, BK=16, NT=128, NS=3),
}
# TF32 (float32 under precision "high", forward-like GEMMs: gc_tc32_l / gc_tc32_s): the same
# tiles, BK = 8 32-bit values (one m16n8k8 step), A [BK][BM+8] + B [BN][BK+4] words
TC32_CONFIGS = {
    "l": dict(BM=128, BN=128, BK=8, NT=256, NS=3),
    "s": dict(BM=64, BN=64, BK=8, NT=128, NS=3),
}
TAP_INTS = 5  # GC_TAP_INTS: ints per tap-table entry in shared memory
MAX_TAPS = 512
NUM_SMS = 132  # H100/H200; the wave used by the split-K rule
# resident blocks per SM of each kernel (float32, sm_90, register bound: gpuconv kernels)
BLOCKS_PER_SM = {("fp", "l"): 2, ("fp", "s"): 6, ("wg", "l"): 1, ("wg", "s"): 4}
MAX_SPLITS = 32


def _env_choice(name, allowed):
    v = os.environ.get(name, "").strip().lower()
    if v and v not in allowed:
        raise ValueError(f"{name}={v!r}: expected one of {', '.join(allowed)}")
    return v or None


def smem_bytes(cfg: str, acc_size: int, taps: int = 0) -> int:
    c = CONFIGS[cfg]
    return 2 * c["BK"] * ((c["BM"] + 4) + (c["BN"] + 4)) * acc_size + 4 * TAP_INTS * taps


def tc_configs(esz: int) -> dict:
    """Tile configurations of the tensor-op policy for operands of `esz` bytes."""
    return TC_CONFIGS if esz == 2 else TC32_CONFIGS


def tc_smem_bytes(cfg: str, taps: int, esz: int = 2) -> int:
    c = tc_configs(esz)[cfg]
    return (c["NS"] * (c["BK"] * (c["BM"] + 8) + c["BN"] * (c["BK"] + 16 // esz)) * esz
            + 4 * TAP_INTS * taps)


WGC_INTS = 4  # GC_WGC_INTS: ints per column-table entry of the tensor-op weight grad


def tc_wg_smem_bytes(cfg: str, esz: int = 2) -> int:
    return tc_smem_bytes(cfg, 0, esz) + 4 * WGC_INTS * tc_configs(esz)[cfg]["BM"]


def tensor_op(g, algo: str, pass_name: str = "fp") -> bool:
    """The tensor-op policy takes the half types' passes (forward, input grad at every
    stride phase, weight grad: pass_name 'fp' or 'wg'), and float32's as TF32 when the
    float32 precision in force is 'high' (gpuconv.set_float32_precision, precision=);
    GPUCONV_CUDA_ALGO=simt forces the engine's SIMT policy."""
    if algo == "simt":
        return False
    if g.dtype.itemsize == 2:
        return True
    from .._precision import allow_tf32
    return allow_tf32(g.dtype)


def fits(g) -> bool:
    """Problems the engine takes: tap table in shared memory, 32-bit spatial offsets,
    grid y (groups * N tiles, or groups * M tiles) within 65535 for the small tile."""
    bs = CONFIGS["s"]["BN"]
    return (g.taps <= MAX_TAPS and math.prod(g.in_spatial) <= INT32_LIMIT
            and math.prod(g.out_spatial) <= INT32_LIMIT
            and g.groups * -(-max(g.Kg, g.Cg) // bs) <= MAX_GRID[1]
            and g.Cg * g.taps <= INT32_LIMIT and g.Kg * g.taps <= INT32_LIMIT)


def choose_config(M: int, N: int, groups: int, kred: int = 0, kind: str = "fp") -> str:
    """'l' (128x128, the better loop) when N fills a large tile and the large tiles make
    at least a wave, by themselves or split-K over a long enough reduction (`kred`);
    otherwise 's' (64x64): four times the blocks for small layers / few channels.
    GPUCONV_IGEMM_CONFIG=l|s forces one (tests reach both on small data)."""
    forced = _env_choice("GPUCONV_IGEMM_CONFIG", tuple(CONFIGS))
    if forced:
        return forced
    if N <= 64 or M <= 64:
        return "s"
    blocks_l = -(-M // 128) * -(-N // 128) * groups
    max_splits = max(1, min(kred // (4 * CONFIGS["l"]["BK"]), MAX_SPLITS))
    return "l" if blocks_l * max_splits >= NUM_SMS * BLOCKS_PER_SM[(kind, "l")] else "s"


def best_splits(base: int, smax: int, wave: int, waves: float = 2.0) -> int:
    """Split count for `base` blocks, at most `smax`: about `waves` waves of blocks,
    the count that wastes the least of the last wave among those (wave quantisation)."""
    if base >= waves * wave or smax <= 1:
        return 1
    best, best_s = -1.0, 1
    for s in range(1, smax + 1):
        b = base * s
        score = b / (-(-b // wave) * wave) * min(1.0, b / (waves * wave))
        if score > best + 1e-9:
            best, best_s = score, s
        if b >= 4 * waves * wave:
            break
    return best_s


def choose_splits(blocks: int, kred: int, cfg: str) -> int:
    """Split-K slices for a forward-like GEMM whose grid is under one wave (each slice
    keeps at least 4 steps of BK; best_splits).  GPUCONV_IGEMM_SPLITS=n forces n."""
    bk = CONFIGS[cfg]["BK"]
    forced = os.environ.get("GPUCONV_IGEMM_SPLITS", "").strip()
    if forced:
        n = int(forced)
        if n < 1:
            raise ValueError(f"GPUCONV_IGEMM_SPLITS={forced!r}: expected an integer >= 1")
        return max(1, min(n, -(-kred // bk) if kred > 0 else 1))
    wave = NUM_SMS * BLOCKS_PER_SM[("fp", cfg)]
    if blocks >= wave or kred < 8 * bk:
        return 1
    return best_splits(blocks, min(kred // (4 * bk), MAX_SPLITS), wave, waves=1.0)


def kchunk(kred: int, splits: int, bk: int) -> int:
    if kred <= 0:
        return bk
    c = -(-kred // splits)
    return -(-c // bk) * bk


@dataclass(frozen=True)
class FpProblem:
    """One forward-like GEMM launch (the forward, or one stride phase of the input grad)."""
    params: tuple  # GC_FP_PARAMS without kchunk
    M: int         # N * MD * MH * MW
    Ng: int        # GEMM N per group
    kred: int      # reduction length Cg * T


def _three(t, fill):
    return (fill,) * (3 - len(t)) + tuple(t)


def forward_problem(g) -> FpProblem:
    D, H, W = _three(g.in_spatial, 1)
    OD, OH, OW = _three(g.out_spatial, 1)
    KD, KH, KW = _three(g.kernel, 1)
    s, d, p = _three(g.stride, 1), _three(g.dilation, 1), _three(g.pad_lo, 0)
    taps = KD * KH * KW
    params = (g.groups, g.N, g.C, g.Cg, D, H, W, g.Kg, g.K,
              OD, OH, OW, *s, *(-x for x in p),
              OD, OH, OW, 1, 1, 1, 0, 0, 0,
              KD, KH, KW, 0, 0, 0, *d, 0, 0, 0, 1, 1, 1,
              KH, KW, g.Kg * g.Cg * taps, g.Cg * taps, taps)
    return FpProblem(params, g.N * OD * OH * OW, g.Kg, g.Cg * taps)


def _phase_dim(i0, s, d, p, L, O, R):
    """Stride phase i0 of one dim: (positions, taps, ta, tb, tr, ts) or None if no
    input position lies in the phase.  Taps r with (i0 + p - r*d) % s == 0 reach the
    phase; for them the grad_out index is j + ta + tb*t (t-th such tap, j the
    position within the phase)."""
    if i0 >= L:
        return None
    npos = -(-(L - i0) // s)
    rs = [r for r in range(R) if (i0 + p - r * d) % s == 0]
    if not rs:
        return (npos, 0, 0, 0, 0, 1)
    step = s // math.gcd(s, d)
    r0 = rs[0]
    assert rs == list(range(r0, R, step))
    ta = (i0 + p - r0 * d) // s
    tb = -(d // math.gcd(s, d))
    return (npos, len(rs), ta, tb, r0, step)


def dgrad_problems(g) -> list:
    """[(FpProblem, phase first positions)] for the input gradient: one stride-1 GEMM per
    stride phase (all of them at stride 1), each over only the taps that reach it."""
    D, H, W = _three(g.in_spatial, 1)
    OD, OH, OW = _three(g.out_spatial, 1)
    KD, KH, KW = _three(g.kernel, 1)
    s, d, p = _three(g.stride, 1), _three(g.dilation, 1), _three(g.pad_lo, 0)
    taps = KD * KH * KW
    L, O, R = (D, H, W), (OD, OH, OW), (KD, KH, KW)
    out = []
    for ph in np.ndindex(*s):
        dims = [_phase_dim(ph[a], s[a], d[a], p[a], L[a], O[a], R[a]) for a in range(3)]
        if any(x is None for x in dims):
            continue
        MD, MH, MW = (x[0] for x in dims)
        T = [x[1] for x in dims]
        ta = [x[2] for x in dims]
        tb = [x[3] for x in dims]
        tr = [x[4] for x in dims]
        ts = [x[5] for x in dims]
        params = (g.groups, g.N, g.K, g.Kg, OD, OH, OW, g.Cg, g.C,
                  MD, MH, MW, 1, 1, 1, 0, 0, 0,
                  D, H, W, *s, *ph,
                  *T, *ta, *tb, *tr, *ts,
                  KH, KW, g.Kg * g.Cg * taps, taps, g.Cg * taps)
        out.append(FpProblem(params, g.N * MD * MH * MW, g.Cg, g.Kg * math.prod(T)))
    return out


def fp_grid(prob: FpProblem, cfg: str, groups: int, splits: int):
    c = CONFIGS[cfg]
    return (-(-prob.M // c["BM"]), groups * -(-prob.Ng // c["BN"]), splits)


def fp_taps(prob: FpProblem) -> int:
    TD, TH, TW = prob.params[27:30]
    return TD * TH * TW


def fp_plan(problems, groups: int):
    """(config, splits) for a set of forward-like GEMMs launched together (the forward,
    or every stride phase of one input grad): the config by the largest phase, split-K
    when all their blocks together stay under a wave."""
    M = max(p.M for p in problems)
    cfg = choose_config(M, problems[0].Ng, groups, max(p.kred for p in problems))
    blocks = 0
    for p in problems:
        gx, gy, _ = fp_grid(p, cfg, groups, 1)
        blocks += gx * gy
    return cfg, choose_splits(blocks, max(p.kred for p in problems), cfg)


def wg_splits(base: int, red: int, cfg: str) -> int:
    """Split-K slices of the weight grad: about two waves of blocks where the reduction
    allows (>= 16 steps of BK a slice), least wave quantisation (best_splits)."""
    bk = CONFIGS[cfg]["BK"]
    smax = max(1, min(red // (16 * bk), MAX_GRID[2]))
    return best_splits(base, smax, NUM_SMS * BLOCKS_PER_SM[("wg", cfg)])


def wg_plan(g, tensor_op: bool = False):
    """(config, grid, splits, chunk) of the weight-grad GEMM, split-K over N*P*Q in chunks
    of BK (wg_splits; GPUCONV_IGEMM_SPLITS=n forces n).  SIMT: M = K/G, N = C/G*taps;
    tensor_op: the transposed GEMM (M' = C/G*taps, N' = K/G, BK 16, TF32 8).  The
    config rule is symmetric in M and N, so both get the same config and the same grid:
    x over C/G*taps, y over groups * K/G tiles, z over the splits."""
    red = g.N * math.prod(g.out_spatial)
    Nn = g.Cg * g.taps
    cfg = choose_config(g.Kg, Nn, g.groups, red // 4, kind="wg")
    c = (tc_configs(g.dtype.itemsize) if tensor_op else CONFIGS)[cfg]
    ntiles = -(-Nn // c["BN"])
    mtiles = g.groups * -(-g.Kg // c["BM"])
    forced = os.environ.get("GPUCONV_IGEMM_SPLITS", "").strip()
    want = int(forced) if forced else wg_splits(ntiles * mtiles, red, cfg)
    chunk = kchunk(red, max(1, min(want, -(-red // c["BK"]) if red else 1)), c["BK"])
    splits = max(1, -(-red // chunk)) if red > 0 else 1
    return cfg, (ntiles, mtiles, splits), splits, chunk
