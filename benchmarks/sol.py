"""Speed-of-light estimate of the implicit-GEMM engine on an H100/H200 (sm_90), without a
GPU: SASS counts of each configuration's main loop (gpuconv kernels) plus the plans the
CUDA backend would launch for each dense benchmark layer.

    python benchmarks/sol.py [--batch 32 8] > table.md
    python benchmarks/sol.py --tensor-op     # the tensor-op entries' loop bounds

Method (GPU-FACTS.md): per warp and k-step of BK = 8, F math instructions (FFMA/DFMA),
I instructions issued on the loop's common path (the static loop body without the
divergent tap-refresh regions, which run once per C/BK steps), W shared-memory
wavefronts.  Per SM, 4 schedulers issue 4 warp
instructions a clock, the FP32 pipes take 4 warp-FFMA a clock (FP64: 2 warp-DFMA),
shared memory serves 1 wavefront a clock.  Loop-bound fraction of peak:
  float32  F / max(I, 4W)          float64  F / max(I/2, 2W, F)
W is counted two ways: 'strict' (GPU-FACTS: LDS.128 = 4 wavefronts, no broadcast) and
'bcast' (the engine's LDS.128 operand reads touch <= 128 distinct bytes per warp: 4
distinct float4 for A, 8 for B -> 1 wavefront each).  A layer's prediction multiplies the
loop bound by the tile utilisation (useful / padded MACs), the wave quantisation
(blocks over whole waves of resident blocks) and takes the memory roofline (minimum
bytes + split-K partial traffic at 4.8 TB/s) into account.  Latency (global loads are
staged through registers, two shared stages) and the epilogue are not modelled.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpuconv import _bench  # noqa: E402
from gpuconv._cuda import igemm as IG, report as R  # noqa: E402

PEAK = {"float32": 67e12, "float64": 34e12}
HBM = 4.8e12
SMS = IG.NUM_SMS


def loop_bounds(rep):
    """Common-path counts (hot_*: the loop without the rarely taken tap refresh)."""
    c = rep.loop
    F = c["FFMA"] + c["DFMA"]
    I = c["hot_instructions"]
    other = (c["hot_LDS"] + 2 * c["hot_LDS.64"] + c["hot_STS"] + 2 * c["hot_STS.64"]
             + 4 * c["hot_STS.128"])
    w_strict = 4 * c["hot_LDS.128"] + other
    w_bcast = c["hot_LDS.128"] + other
    if c["DFMA"]:
        f = lambda W: F / max(I / 2, 2 * W, F)  # noqa: E731
    else:
        f = lambda W: F / max(I, 4 * W)  # noqa: E731
    return dict(F=F, I=I, Ws=w_strict, Wb=w_bcast, strict=f(w_strict), bcast=f(w_bcast))


def tc_table(reps):
    """Markdown rows of the tensor-op entries (fptc / wgtc): issue bound 4H/I (one HMMA
    per SM per clock is the dense tensor peak: 4 issue clocks of a sub-partition) and
    shared bound H/W (W: 4 per LDSM.x4 / LDS.128, 1 per LDS.32 / STS, strict)."""
    out = ["| entry | regs | blocks/SM (warps) | HMMA | LDSM.x4 | LDS (32-bit) | STS | LDGSTS "
           "| hot instr. | wavefronts | issue 4H/I | shared H/W | bound |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted(reps):
        r = reps[n]
        if "tc_" not in n or not r.loop:
            continue
        c = r.loop
        H, I = c["HMMA"], c["hot_instructions"]
        W = (4 * c["LDSM"] + c["hot_LDS"] + 2 * c["hot_LDS.64"] + 4 * c["hot_LDS.128"]
             + c["hot_STS"] + 2 * c["hot_STS.64"] + 4 * c["hot_STS.128"])
        iss, sh = 4 * H / I, H / W
        out.append(f"| {n} | {r.regs} | {r.blocks_per_sm} ({r.warps_per_sm}) | {H} "
                   f"| {c['LDSM']} | {c['hot_LDS']} | {c['hot_STS']} | {c['LDGSTS']} | {I} "
                   f"| {W} | {iss:.2f} | {sh:.2f} "
                   f"| {'issue' if iss <= sh else 'shared'} {min(1.0, iss, sh):.2f} |")
    return out


def layer_rows(layer, batch, dtype, reports):
    import numpy as np
    g = _bench.layer_geometry(layer, batch, np.dtype(dtype))
    esz = np.dtype(dtype).itemsize
    acc = 8 if dtype == "float64" else 4
    rows = []
    suf = "f64" if dtype == "float64" else "f32"
    xb, wb, yb = (math.prod(s) * esz for s in (g.x_shape, g.w_shape, g.y_shape))
    # forward / input grad: forward-like GEMMs
    for pass_name, probs in (("forward", [IG.forward_problem(g)]),
                             ("input_grad", IG.dgrad_problems(g))):
        cfg, splits = IG.fp_plan(probs, g.groups)
        c = IG.CONFIGS[cfg]
        rep = reports[f"gpuconv_igemm_fp_{suf}_{cfg}_i32"]
        useful = padded = blocks = 0
        for p in probs:
            gx, gy, _ = IG.fp_grid(p, cfg, g.groups, splits)
            blocks += gx * gy * splits
            chunk = IG.kchunk(p.kred, splits, c["BK"])
            useful += p.M * p.Ng * g.groups * p.kred
            padded += gx * c["BM"] * gy * c["BN"] * chunk * splits
        out_b = yb if pass_name == "forward" else xb
        extra = 2 * splits * (out_b // esz) * acc if splits > 1 else 0
        rows.append((pass_name, cfg, splits, blocks, useful / max(padded, 1), rep,
                     xb + wb + yb + extra, g.flops))
    cfg, grid, splits, chunk = IG.wg_plan(g)
    c = IG.CONFIGS[cfg]
    rep = reports[f"gpuconv_igemm_wg_{suf}_{cfg}_i32"]
    blocks = grid[0] * grid[1] * grid[2]
    red = g.N * math.prod(g.out_spatial)
    useful = g.Kg * g.groups * g.Cg * g.taps * red
    padded = grid[0] * c["BN"] * grid[1] * c["BM"] * chunk * splits
    extra = 2 * splits * math.prod(g.w_shape) * acc
    rows.append(("weight_grad", cfg, splits, blocks, useful / padded, rep,
                 xb + wb + yb + extra, g.flops))
    out = []
    for pass_name, cfg, splits, blocks, util, rep, nbytes, flops in rows:
        lb = loop_bounds(rep)
        wave = SMS * rep.blocks_per_sm
        q = blocks / (math.ceil(blocks / wave) * wave)
        pred = {}
        for k in ("strict", "bcast"):
            t_c = flops / (PEAK[dtype] * lb[k] * util * q)
            t_m = nbytes / HBM
            pred[k] = flops / max(t_c, t_m) / PEAK[dtype]
        out.append(dict(layer=layer["name"], pass_=pass_name, cfg=cfg, splits=splits,
                        blocks=blocks, wave=wave, util=util, q=q, **pred))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 8])
    ap.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    ap.add_argument("--tensor-op", action="store_true",
                    help="only the per-configuration table of the tensor-op entries")
    args = ap.parse_args(argv)
    reps = {r.name: r for r in R.build_reports("sm_90", None, sass=True, passes=["igemm"])}
    if args.tensor_op:
        print("\n".join(tc_table(reps)))
        return
    print("### Per configuration (sm_90, SASS of the hottest loop: one warp, one k-step of 8)\n")
    print("| entry | regs | threads | blocks/SM | warps/SM | instr static / common path | math "
          "| LDS.128 | other LDS (common path) | STS | wavefronts strict / bcast "
          "| loop bound strict / bcast |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sorted(reps):
        r = reps[n]
        if not r.loop or "_i32" not in n or "reduce" in n:
            continue
        lb = loop_bounds(r)
        c = r.loop
        print(f"| {n} | {r.regs} | {r.threads} | {r.blocks_per_sm} | {r.warps_per_sm} "
              f"| {c['instructions']} / {lb['I']} | {lb['F']} | {c['LDS.128']} "
              f"| {c['LDS'] + c['LDS.64']} ({c['hot_LDS'] + c['hot_LDS.64']}) "
              f"| {c['STS'] + c['STS.64']} | {lb['Ws']} / {lb['Wb']} "
              f"| {lb['strict']:.2f} / {lb['bcast']:.2f} |")
    dense = [L for L in _bench.LAYERS if L["group"] == "dense"]
    for dtype in args.dtype:
        for batch in args.batch:
            print(f"\n### {dtype}, batch {batch}: predicted fraction of the {dtype} peak "
                  f"({PEAK[dtype] / 1e12:.0f} TFLOP/s)\n")
            print("| layer | pass | cfg | splits | blocks (wave) | tile util | wave q "
                  "| predicted strict | predicted bcast |")
            print("|---|---|---|---|---|---|---|---|---|")
            geo = {}
            for L in dense:
                for r in layer_rows(L, batch, dtype, reps):
                    geo.setdefault(r["pass_"], []).append((r["strict"], r["bcast"]))
                    print(f"| {r['layer']} | {r['pass_']} | {r['cfg']} | {r['splits']} "
                          f"| {r['blocks']} ({r['wave']}) | {r['util']:.2f} | {r['q']:.2f} "
                          f"| {r['strict']:.2f} | {r['bcast']:.2f} |")
            for p, v in geo.items():
                gs = math.exp(sum(math.log(a) for a, _ in v) / len(v))
                gb = math.exp(sum(math.log(b) for _, b in v) / len(v))
                print(f"| **geomean** | {p} | | | | | | **{gs:.2f}** | **{gb:.2f}** |")


if __name__ == "__main__":
    main()
