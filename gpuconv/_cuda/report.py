"""`python -m gpuconv kernels`: compile every kernel module for an architecture without a
GPU (NVRTC through CuPy), report registers, spills, shared memory and occupancy per entry
point, write one cubin per module, and count the main loop's SASS (cuobjdump).

The figures feed the speed-of-light table of benchmarks/RESULTS.md (method in
GPU-FACTS: math issue slots and shared-memory wavefronts per k-step, occupancy).
"""
from __future__ import annotations

import glob
import io
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field

from . import igemm as IG
from . import sources as K

# sm_80 / sm_90 per-SM limits used for occupancy
SM_REGS = 65536
SM_MAX_WARPS = 64
SM_MAX_BLOCKS = 32
SM_SMEM = {"sm_80": 164 * 1024, "sm_86": 100 * 1024, "sm_89": 100 * 1024, "sm_90": 228 * 1024}
SMEM_RESERVED = 1024  # per block (sm_80+)


@dataclass
class EntryReport:
    name: str
    module: str
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    threads: int
    smem: int            # dynamic shared memory of a typical launch (3x3 kernel)
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    sass: dict = field(default_factory=dict)  # whole-function counts
    loop: dict = field(default_factory=dict)  # counts in the hottest loop body


def nvrtc_compiler():
    """CuPy's NVRTC wrapper, or raise RuntimeError saying why not."""
    try:
        from cupy.cuda import compiler
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"CuPy is not importable ({type(e).__name__}: {e}); "
                           f"pip install cupy-cuda13x nvidia-cuda-nvrtc") from None
    return compiler


def compile_module(pass_name: str, arch: str):
    """(cubin bytes, ptxas -v log) of one module for `arch` (e.g. 'sm_90')."""
    compiler = nvrtc_compiler()
    prog = compiler._NVRTCProgram(K.full_source(pass_name), f"{pass_name}.cu", method="cubin")
    log = io.StringIO()
    cubin, _ = prog.compile(options=(f"--gpu-architecture={arch}",) + K.compile_options()
                            + ("-Xptxas=-v",), log_stream=log)
    return complete_elf(bytes(cubin)), log.getvalue()


def complete_elf(blob: bytes) -> bytes:
    """CuPy's getCUBIN (14.2) returns the image one byte short (it treats it as a
    C string); the ELF headers say how long it is.  The lost tail is the high byte of
    the last program header's alignment, zero: pad with zeros to the stated size."""
    import struct
    if blob[:4] != b"\x7fELF" or blob[4] != 2:
        return blob
    phoff, shoff = struct.unpack_from("<QQ", blob, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", blob, 0x36)
    size = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    if len(blob) < size and size - len(blob) <= 8:
        blob = blob + b"\0" * (size - len(blob))
    return blob


def parse_ptxas(log: str) -> dict:
    """{entry: (registers, spill stores, spill loads, stack bytes)} from ptxas -v."""
    out = {}
    for block in log.split("Compiling entry function")[1:]:
        name = block.split("'")[1]
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        if not (spill and regs):
            raise RuntimeError(f"unparsed ptxas report for {name}:\n{block}")
        out[name] = (int(regs.group(1)), int(spill.group(2)), int(spill.group(3)),
                     int(spill.group(1)))
    return out


def launch_shape(name: str, acc_size: int):
    """(threads per block, dynamic shared bytes for a 3x3 kernel) of an entry point."""
    m = re.match(r"gpuconv_igemm_(fp|wg)_\w+?_([ls])_i(32|64)$", name)
    if m:
        cfg = m.group(2)
        return IG.CONFIGS[cfg]["NT"], IG.smem_bytes(cfg, acc_size, 9 if m.group(1) == "fp" else 0)
    m = re.match(r"gpuconv_igemm_fptc_(\w+?)_([ls])_i(32|64)$", name)
    if m:
        cfg, esz = m.group(2), 4 if m.group(1) == "f32" else 2
        return IG.tc_configs(esz)[cfg]["NT"], IG.tc_smem_bytes(cfg, 9, esz)
    m = re.match(r"gpuconv_igemm_wgtc_(\w+?)_([ls])_i(32|64)$", name)
    if m:
        cfg, esz = m.group(2), 4 if m.group(1) == "f32" else 2
        return IG.tc_configs(esz)[cfg]["NT"], IG.tc_wg_smem_bytes(cfg, esz)
    if "fwdtile" in name:
        return 256, (16 * 65 + 16 * 64) * acc_size + 16 * 9
    if "wgradtile" in name:
        return 256, (16 * 65 + 16 * 64) * acc_size
    if re.match(r"gpuconv_wgrad_(f16|bf16|f32|f64)_i", name):
        return 256, 8 * acc_size
    return 256, 0


def occupancy(regs: int, threads: int, smem: int, arch: str = "sm_90"):
    """(blocks, warps) resident per SM (register allocation in 256-register warp units)."""
    warps = -(-threads // 32)
    regs_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = SM_REGS // (regs_warp * warps)
    by_warps = SM_MAX_WARPS // warps
    by_smem = SM_SMEM.get(arch, 100 * 1024) // (smem + SMEM_RESERVED) if smem else SM_MAX_BLOCKS
    b = max(0, min(by_regs, by_warps, by_smem, SM_MAX_BLOCKS))
    return b, b * warps


# ------------------------------------------------------------------------------ SASS
def find_cuobjdump():
    """cuobjdump and the directory of nvdisasm (PATH, or the nvidia-cuda-* wheels)."""
    exe = shutil.which("cuobjdump")
    dis = shutil.which("nvdisasm")
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for r in roots:
        for b in glob.glob(os.path.join(r, "nvidia", "*", "bin")):
            if exe is None and os.path.exists(os.path.join(b, "cuobjdump")):
                exe = os.path.join(b, "cuobjdump")
            if dis is None and os.path.exists(os.path.join(b, "nvdisasm")):
                dis = os.path.join(b, "nvdisasm")
    return exe, (os.path.dirname(dis) if dis else None)


def sass_of(cubin_path: str) -> dict:
    """{function name: [instruction text, ...]} from cuobjdump -sass."""
    exe, disdir = find_cuobjdump()
    if exe is None or disdir is None:
        raise RuntimeError("cuobjdump/nvdisasm not found (pip install nvidia-cuda-cuobjdump "
                           "nvidia-cuda-nvdisasm)")
    env = dict(os.environ)
    env["PATH"] = disdir + os.pathsep + env.get("PATH", "")
    r = subprocess.run([exe, "-sass", cubin_path], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {r.stderr.strip()}")
    funcs, cur = {}, None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


_OPS = ("FFMA", "DFMA", "HFMA2", "HMMA", "DMMA", "LDSM", "LDGSTS", "LDS", "LDS.64", "LDS.128",
        "STS", "STS.64", "STS.128", "LDG", "STG", "BAR", "LDL", "STL")


def _opcode(ins: str) -> str:
    t = ins.split()
    if t and t[0].startswith("@"):
        t = t[1:]
    return t[0] if t else ""


def count_ops(instrs) -> dict:
    c = {k: 0 for k in _OPS}
    c["instructions"] = len(instrs)
    for _, ins in instrs:
        op = _opcode(ins)
        base = op.split(".")[0]
        if base == "LDS" or base == "STS":
            width = next((w for w in ("128", "64") if f".{w}" in op), None)
            c[f"{base}.{width}" if width else base] += 1
        elif base in ("LDG", "STG", "LDGSTS", "BAR", "LDL", "STL", "FFMA", "DFMA", "HFMA2",
                      "HMMA", "DMMA", "LDSM"):
            c[base] += 1
    return c


def hottest_loop(instrs):
    """Instructions of the backward-branch loop with the most math instructions."""
    best, best_math = [], -1
    addr_index = {a: i for i, (a, _) in enumerate(instrs)}
    for i, (a, ins) in enumerate(instrs):
        if _opcode(ins) != "BRA":
            continue
        m = re.search(r"0x([0-9a-f]+)", ins)
        if not m:
            continue
        tgt = int(m.group(1), 16)
        if tgt >= a or tgt not in addr_index:
            continue
        body = instrs[addr_index[tgt]:i + 1]
        c = count_ops(body)
        math_ = c["FFMA"] + c["DFMA"] + c["HMMA"] + c["DMMA"]
        if math_ > best_math:
            best, best_math = body, math_
    return best


def hot_path(instrs):
    """The loop body without its divergent regions (BSSY ... BSYNC: in the engine, the
    refresh of a row whose tap changed, taken once per C/BK steps), each region
    counted as 4 instructions (the branch and the short path).  An estimate of the
    instructions issued per k-step on the common path."""
    out, depth, regions = [], 0, 0
    for a, ins in instrs:
        op = _opcode(ins)
        if op.startswith("BSSY"):
            depth += 1
            regions += 1
            continue
        if op.startswith("BSYNC"):
            depth = max(0, depth - 1)
            continue
        if depth == 0:
            out.append((a, ins))
    return out, regions


def loop_counts(instrs) -> dict:
    """count_ops of the loop plus 'hot_*' counts of its common path (hot_path)."""
    c = count_ops(instrs)
    hot, regions = hot_path(instrs)
    h = count_ops(hot)
    c["hot_instructions"] = h["instructions"] + 4 * regions
    for k in ("LDS", "LDS.64", "LDS.128", "STS", "STS.64", "STS.128"):
        c[f"hot_{k}"] = h[k]
    return c


def wavefronts(c: dict) -> int:
    """Shared-memory wavefronts per warp, GPU-FACTS counting (no conflicts, no broadcast)."""
    return (c["LDS"] + 2 * c["LDS.64"] + 4 * c["LDS.128"] + 4 * c["LDSM"]
            + c["STS"] + 2 * c["STS.64"] + 4 * c["STS.128"])


# ------------------------------------------------------------------------------ report
def build_reports(arch: str = "sm_90", cubin_dir: str | None = None, sass: bool = True,
                  passes=None):
    reports = []
    tmp = None
    if cubin_dir is None and sass:
        tmp = tempfile.TemporaryDirectory()
        cubin_dir = tmp.name
    try:
        for p in passes or K.PASSES:
            cubin, log = compile_module(p, arch)
            path = None
            if cubin_dir is not None:
                os.makedirs(cubin_dir, exist_ok=True)
                path = os.path.join(cubin_dir, f"gpuconv_{p}.{arch}.cubin")
                with open(path, "wb") as f:
                    f.write(cubin)
            table = parse_ptxas(log)
            funcs = sass_of(path) if sass and path else {}
            for name in K.entry_names(p):
                if name not in table:
                    raise RuntimeError(f"{name}: no ptxas report (entry point missing?)")
                regs, ss, sl, stack = table[name]
                acc = 8 if "_f64" in name else 4
                threads, smem = launch_shape(name, acc)
                r = EntryReport(name, p, regs, ss, sl, stack, threads, smem)
                r.blocks_per_sm, r.warps_per_sm = occupancy(regs, threads, smem, arch)
                if name in funcs:
                    r.sass = count_ops(funcs[name])
                    r.loop = loop_counts(hottest_loop(funcs[name]))
                reports.append(r)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return reports


def format_reports(reports, arch) -> str:
    lines = [f"gpuconv kernels for {arch} (NVRTC; occupancy for the launch's threads and the "
             f"dynamic shared memory of a 3x3 kernel)",
             f"{'entry point':34} {'regs':>4} {'spill':>5} {'smem':>6} {'thr':>4} {'blk/SM':>6} "
             f"{'warps':>5}  hottest loop, one warp, one pass: instructions, math (FFMA/DFMA/"
             f"HMMA), LDS.128, other LDS, STS (any width), wavefronts, BAR; LDL+STL in "
             f"the function"]
    for r in reports:
        spill = r.spill_stores + r.spill_loads
        loop = ""
        if r.loop:
            c = r.loop
            math_ = c["FFMA"] + c["DFMA"] + c["HMMA"] + c["DMMA"]
            sts = c["STS"] + c["STS.64"] + c["STS.128"]
            lds = c["LDS"] + c["LDS.64"]
            loop = (f"{c['instructions']:5d} {math_:5d} {c['LDS.128']:4d} {lds:4d} {sts:4d} "
                    f"{wavefronts(c):5d} {c['BAR']:2d} {r.sass.get('LDL', 0) + r.sass.get('STL', 0)}")
        lines.append(f"{r.name:34} {r.regs:4d} {spill:5d} {r.smem:6d} {r.threads:4d} "
                     f"{r.blocks_per_sm:6d} {r.warps_per_sm:5d}  {loop}")
    return "\n".join(lines)


def main(arch: str, cubin_dir: str | None, as_json: bool = False, out=sys.stdout) -> int:
    reports = build_reports(arch, cubin_dir, sass=find_cuobjdump()[0] is not None)
    if as_json:
        import dataclasses
        import json
        out.write(json.dumps([dataclasses.asdict(r) for r in reports], indent=1) + "\n")
    else:
        out.write(format_reports(reports, arch) + "\n")
    spilled = [r.name for r in reports if r.spill_stores or r.spill_loads]
    if spilled:
        out.write(f"register spills in: {', '.join(spilled)}\n")
        return 1
    return 0
