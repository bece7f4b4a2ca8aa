"""Compiling CUDA sources with the system C++ compiler (cached by content hash).

Two kinds of shared libraries live in the cache directory
(``$GPUCONV_CACHE_DIR/cudasim`` or ``~/.cache/gpuconv/cudasim``):

* ``rt-<hash>.so``: runtime.cpp, the fiber scheduler (one per compiler + runtime text);
* ``mod-<hash>.so``: one CUDA source (unchanged) force-including cudasim.h, plus a
  generated trailer that registers every entry point with its parameter
  signature, plus the dynamic shared memory array that every
  ``extern __shared__`` declaration of the source is bound to.

Files are written under a temporary name and renamed, so concurrent builds are safe.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ... import _hostcc
from ..limits import SHARED_MEM_PER_BLOCK_OPTIN

PKG_DIR = Path(__file__).resolve().parent
HEADER = PKG_DIR / "cudasim.h"
RUNTIME = PKG_DIR / "runtime.cpp"
PAGE = 4096
# the dynamic shared-memory buffer: the most a launch may use (limits.SHARED_MEM_PER_BLOCK_OPTIN,
# checked at launch) rounded up to whole pages, so the guard page follows it
DYN_SMEM_USABLE = -(-SHARED_MEM_PER_BLOCK_OPTIN // PAGE) * PAGE
DYN_SMEM_CAPACITY = DYN_SMEM_USABLE + 2 * PAGE
BUILD_VERSION = "4"  # bump to invalidate cached libraries

# headers a CUDA source may include; the shim already provides what they declare
STUB_HEADERS = ("cuda.h", "cuda_runtime.h", "cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h",
                "device_launch_parameters.h", "device_functions.h", "sm_20_intrinsics.h",
                "vector_types.h", "math_constants.h")


class CudaSimCompileError(RuntimeError):
    """The emulator could not compile a CUDA source (the message holds the compiler output)."""


# ---------------------------------------------------------------------------- compiler
def compiler_command() -> str:
    return os.environ.get("GPUCONV_CUDASIM_CXX") or os.environ.get("CXX") or "g++"


def compiler_info():
    """(path, version text) of the C++ compiler, or (None, reason)."""
    return _hostcc.compiler_info(compiler_command(), "GPUCONV_CUDASIM_CXX")


def cache_dir() -> Path:
    return _hostcc.cache_subdir("cudasim")


_hash = _hostcc.content_hash


def _run(cmd, what):
    return _hostcc.run_compiler(cmd, what, CudaSimCompileError, "cudasim")


def _publish(tmp: Path, final: Path):
    os.replace(tmp, final)


# ---------------------------------------------------------------------------- runtime
@functools.lru_cache(maxsize=None)
def runtime_library() -> Path:
    cxx, ver = compiler_info()
    if cxx is None:
        raise CudaSimCompileError(f"cudasim: {ver}")
    key = _hash(BUILD_VERSION, ver, platform.machine(), HEADER.read_bytes(), RUNTIME.read_bytes())
    d = cache_dir()
    out = d / f"rt-{key}.so"
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory(dir=d, prefix="tmp-rt-") as tmp:
        so = Path(tmp) / "rt.so"
        _run([cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-U_FORTIFY_SOURCE",
              "-fno-stack-protector", "-I", str(PKG_DIR), str(RUNTIME), "-o", str(so),
              "-ldl", "-lrt"], "building the emulator runtime")
        _publish(so, out)
    return out


@functools.lru_cache(maxsize=None)
def stub_include_dir() -> Path:
    d = cache_dir() / f"include-{_hash(BUILD_VERSION, *STUB_HEADERS)}"
    if not d.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix="tmp-inc-"))
        for h in STUB_HEADERS:
            (tmp / h).write_text(f"// cudasim stub for <{h}>: cudasim.h (force-included) "
                                 f"declares what the emulator supports\n#pragma once\n")
        try:
            os.rename(tmp, d)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return d


# ---------------------------------------------------------------------------- modules
def translate_options(options) -> list:
    """nvcc/NVRTC options -> g++ options (unknown ones are ignored)."""
    std = "c++14"
    out = []
    opts = list(options or ())
    i = 0
    while i < len(opts):
        o = str(opts[i])
        m = re.match(r"^--?std=(c\+\+|gnu\+\+)?(\d\d)$", o)
        if m:
            std = "c++" + m.group(2)
            if std in ("c++03", "c++11"):
                std = "c++14"  # the generated trailer needs C++14
        elif o in ("-D", "--define-macro", "-I", "--include-path") and i + 1 < len(opts):
            out += ["-D" if o in ("-D", "--define-macro") else "-I", str(opts[i + 1])]
            i += 1
        elif o.startswith("--define-macro="):
            out.append("-D" + o.split("=", 1)[1])
        elif o.startswith("--include-path="):
            out.append("-I" + o.split("=", 1)[1])
        elif o.startswith(("-D", "-U", "-I")) and len(o) > 2:
            out.append(o)
        # everything else (-arch, --use_fast_math, -lineinfo, --fmad, ...) has no CPU meaning
        i += 1
    return [f"-std={std}"] + out


def make_trailer(entry_names) -> str:
    lines = [
        "",
        "// ---- cudasim: generated registration trailer",
        "namespace cudasim_gen {",
        "template <class T> struct pointee { typedef void type; };",
        "template <class T> struct pointee<T*> { typedef T type; };",
        "template <class T> struct kind_of { static constexpr char value =",
        "  std::is_pointer<T>::value ? 'p' : std::is_void<T>::value ? 'v' :",
        "  std::is_same<T, bool>::value ? 'b' : std::is_floating_point<T>::value ? 'f' :",
        "  std::is_integral<T>::value ? (std::is_signed<T>::value ? 'i' : 'u') : 'o'; };",
        "template <class T> struct size_of { static constexpr unsigned value = sizeof(T); };",
        "template <> struct size_of<void> { static constexpr unsigned value = 0; };",
        "template <class T> cudasim_param param() {",
        "  typedef typename pointee<T>::type P0;",
        "  typedef typename std::remove_cv<P0>::type P;",
        "  cudasim_param p = {kind_of<T>::value, kind_of<P>::value,",
        "                     (char)std::is_const<P0>::value, 0, (unsigned)sizeof(T), size_of<P>::value};",
        "  return p;",
        "}",
        "template <class... A> struct sig {",
        "  static const cudasim_param params[sizeof...(A) + 1];",
        "  template <size_t... I>",
        "  static void call(void (*f)(A...), void** a, std::index_sequence<I...>) {",
        "    (void)a; f(*static_cast<A*>(a[I])...);",
        "  }",
        "  static void invoke(void* f, void** a) {",
        "    call(reinterpret_cast<void (*)(A...)>(f), a, std::index_sequence_for<A...>{});",
        "  }",
        "};",
        "template <class... A> const cudasim_param sig<A...>::params[sizeof...(A) + 1] =",
        "  {param<A>()..., cudasim_param{0, 0, 0, 0, 0, 0}};",
        "template <class... A> cudasim_entry entry(const char* name, void (*f)(A...)) {",
        "  cudasim_entry e = {name, reinterpret_cast<void*>(f), &sig<A...>::invoke,",
        "                     (int)sizeof...(A), sig<A...>::params};",
        "  return e;",
        "}",
        "}  // namespace cudasim_gen",
        "extern thread_local unsigned char cudasim_dynsmem_tls[];",
        'extern "C" __attribute__((visibility("default"))) void* cudasim_dynsmem_array() {',
        "  return cudasim_dynsmem_tls;",
        "}",
        'extern "C" __attribute__((visibility("default"))) const cudasim_entry cudasim_entries[] = {',
    ]
    for n in entry_names:
        lines.append(f'  cudasim_gen::entry("{n}", &{n}),')
    lines.append('  cudasim_entry{nullptr, nullptr, nullptr, 0, nullptr}};')
    lines.append(f'extern "C" __attribute__((visibility("default"))) const int cudasim_nentries = '
                 f'{len(entry_names)};')
    lines.append('extern "C" __attribute__((visibility("default"))) int cudasim_module_abi() '
                 '{ return CUDASIM_ABI_VERSION; }')
    return "\n".join(lines) + "\n"


def _dyn_smem_asm(tls_names) -> str:
    """The module's dynamic shared memory: a page-aligned TLS array [guard | usable | guard];
    every `extern __shared__` symbol of the source names its usable part."""
    out = ['\t.section .tbss,"awT",%nobits', "\t.balign 4096",
           "\t.globl cudasim_dynsmem_tls", "\t.hidden cudasim_dynsmem_tls",
           "\t.type cudasim_dynsmem_tls, %object",
           f"\t.size cudasim_dynsmem_tls, {DYN_SMEM_CAPACITY}",
           "cudasim_dynsmem_tls:", f"\t.zero {PAGE}"]
    for n in tls_names:
        out += [f"\t.globl {n}", f"\t.hidden {n}", f"\t.type {n}, %object",
                f"\t.size {n}, {DYN_SMEM_USABLE}", f"{n}:"]
    out += [f"\t.zero {DYN_SMEM_CAPACITY - PAGE}", '\t.section .note.GNU-stack,"",%progbits', ""]
    return "\n".join(out)


def _undefined_tls(obj: Path) -> list:
    out = _run(["readelf", "-sW", str(obj)], "readelf")
    names = []
    for line in out.splitlines():
        f = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(f) >= 8 and f[3] == "TLS" and f[6] == "UND" and f[7] != "cudasim_dynsmem_tls":
            names.append(f[7])
    return sorted(set(names))


def _split_params(text: str) -> list:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "<([{":
            depth += 1
        elif ch in ">)]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def parameter_names(preprocessed: str, entry_names) -> dict:
    """Best effort: parameter names of each entry point from the preprocessed source."""
    out = {}
    for n in entry_names:
        m = re.search(r'extern\s+"C"[^;{}]*?\b' + re.escape(n) + r"\s*\(", preprocessed)
        if not m:
            continue
        i, depth = m.end(), 1
        j = i
        while j < len(preprocessed) and depth:
            depth += {"(": 1, ")": -1}.get(preprocessed[j], 0)
            j += 1
        names = []
        for p in _split_params(preprocessed[i:j - 1]):
            ids = re.findall(r"[A-Za-z_]\w*", p)
            names.append(ids[-1] if ids else "?")
        out[n] = names
    return out


def declared_entry_points(source: str) -> list:
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)',
                      source)


def build_module(source: str, entry_names, options=()) -> tuple:
    """Compile one CUDA source; returns (path of the .so, metadata dict)."""
    cxx, ver = compiler_info()
    if cxx is None:
        raise CudaSimCompileError(f"cudasim: {ver}")
    entry_names = list(entry_names) if entry_names else declared_entry_points(source)
    if not entry_names:
        raise CudaSimCompileError("cudasim: no entry point names given and none found "
                                  "(extern \"C\" __global__ void name(...))")
    flags = translate_options(options) + [
        "-O1", "-fPIC", "-fvisibility=hidden", "-fno-strict-aliasing", "-ffp-contract=off",
        "-fno-fast-math", "-fno-stack-protector", "-fno-extern-tls-init", "-w", "-include", str(HEADER),
        "-I", str(stub_include_dir())]
    text = source + "\n" + make_trailer(entry_names)
    key = _hash(BUILD_VERSION, ver, platform.machine(), HEADER.read_bytes(), " ".join(flags[:-4]),
                DYN_SMEM_CAPACITY, text)
    d = cache_dir()
    so_path, meta_path = d / f"mod-{key}.so", d / f"mod-{key}.json"
    if so_path.is_file() and meta_path.is_file():
        return so_path, json.loads(meta_path.read_text())
    with tempfile.TemporaryDirectory(dir=d, prefix="tmp-mod-") as tmp:
        tmp = Path(tmp)
        src = tmp / "kernel.cpp"
        src.write_text(text)
        obj = tmp / "kernel.o"
        try:
            _run([cxx, *flags, "-c", "-x", "c++", str(src), "-o", str(obj)],
                 "compiling the CUDA source with the host compiler")
        except CudaSimCompileError as e:
            missing = [n for n in entry_names if not re.search(r"\b" + re.escape(n) + r"\b", source)]
            if missing:
                raise CudaSimCompileError(f"cudasim: entry point(s) {missing} not found in the "
                                          f"source\n{e}") from None
            raise
        pre = _run([cxx, *flags, "-E", "-P", "-x", "c++", str(src)], "preprocessing")
        tls = _undefined_tls(obj)
        asm = tmp / "dynsmem.s"
        asm.write_text(_dyn_smem_asm(tls))
        so = tmp / "mod.so"
        _run([cxx, "-shared", "-fPIC", str(obj), str(asm), "-o", str(so)], "linking the module")
        meta = {"entries": entry_names, "params": parameter_names(pre, entry_names),
                "extern_shared": tls, "compiler": ver}
        mtmp = tmp / "meta.json"
        mtmp.write_text(json.dumps(meta))
        _publish(so, so_path)
        _publish(mtmp, meta_path)
    return so_path, meta


def platform_supported():
    if not sys.platform.startswith("linux"):
        return False, f"the CUDA emulator needs Linux (fibers, guard pages, TLS), not {sys.platform}"
    return True, None
