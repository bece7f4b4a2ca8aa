"""SimRuntime: the device-runtime interface of gpuconv implemented by the CPU emulator."""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import threading

import numpy as np

from .. import DeviceRuntime
from ..limits import MAX_BLOCK, MAX_GRID, MAX_THREADS_PER_BLOCK, SHARED_MEM_PER_BLOCK_OPTIN
from . import _build, _memory

SCHEDULES = ("forward", "reverse", "random", "warp")
_SCHED_CODE = {"forward": 0, "reverse": 1, "random": 2, "warp": 3}
ENV_SCHEDULE = "GPUCONV_CUDASIM_SCHEDULE"
ENV_TIME_LIMIT = "GPUCONV_CUDASIM_TIME_LIMIT"


# ---------------------------------------------------------------------------- errors
class CudaSimError(RuntimeError):
    """A kernel launch misbehaved in the emulator (the message says where and how)."""


class LaunchArgumentError(CudaSimError, TypeError):
    """Launch arguments that do not match the kernel's C signature."""


class LaunchConfigError(CudaSimError, ValueError):
    """Grid, block or shared-memory size outside what CUDA allows."""


class SyncError(CudaSimError):
    """Barrier misuse or deadlock (a __syncthreads not reached by the whole block, ...)."""


class WarpSyncError(SyncError):
    """Warp operation misuse: lanes outside the mask, mask lanes that never arrive, ..."""


class MemoryAccessError(CudaSimError):
    """Out-of-bounds or otherwise invalid memory access (global or shared memory)."""


class AsyncCopyError(SyncError):
    """cp.async misuse: shared bytes read (by ldmatrix) before the wait_group that delivers them."""


class MmaOperandError(CudaSimError):
    """A tensor-core operand the hardware would not take as given (an unrounded TF32 value)."""


class KernelTimeoutError(CudaSimError):
    """The launch ran past the emulator's time limit (an infinite loop?)."""


class KernelCrashError(CudaSimError):
    """__trap(), abort()/assert, an arithmetic trap or a stack overflow in a kernel."""


_ERR_CLASS = {1: SyncError, 2: MemoryAccessError, 3: KernelTimeoutError, 4: KernelCrashError,
              5: MemoryAccessError, 6: LaunchConfigError, 7: KernelCrashError, 8: WarpSyncError,
              9: AsyncCopyError, 10: MmaOperandError, 11: MemoryAccessError}


# ---------------------------------------------------------------------------- ctypes ABI
class _Desc(ctypes.Structure):
    _fields_ = [("invoke", ctypes.c_void_p), ("fn", ctypes.c_void_p), ("argv", ctypes.c_void_p),
                ("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("dyn_bytes", ctypes.c_ulonglong), ("dyn_array", ctypes.c_void_p),
                ("dyn_capacity", ctypes.c_ulonglong), ("tls_block", ctypes.c_void_p),
                ("tls_size", ctypes.c_ulonglong), ("schedule", ctypes.c_int),
                ("seed", ctypes.c_ulonglong), ("time_limit", ctypes.c_double),
                ("stack_size", ctypes.c_ulonglong)]


class _Err(ctypes.Structure):
    _fields_ = [("code", ctypes.c_int), ("has_thread", ctypes.c_int),
                ("block", ctypes.c_uint * 3), ("thread", ctypes.c_uint * 3),
                ("addr", ctypes.c_ulonglong), ("access", ctypes.c_int), ("line", ctypes.c_int),
                ("blocks_done", ctypes.c_ulonglong), ("msg", ctypes.c_char * 4096)]


class _Param(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_char), ("pointee_kind", ctypes.c_char),
                ("pointee_const", ctypes.c_char), ("pad", ctypes.c_char),
                ("size", ctypes.c_uint), ("pointee_size", ctypes.c_uint)]


class _Entry(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("fn", ctypes.c_void_p), ("invoke", ctypes.c_void_p),
                ("nparams", ctypes.c_int), ("params", ctypes.POINTER(_Param))]


_rt_lock = threading.Lock()
_rt_lib = None


def _runtime_lib():
    global _rt_lib
    with _rt_lock:
        if _rt_lib is None:
            path = _build.runtime_library()
            lib = ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL | os.RTLD_NOW)
            lib.cudasim_launch.argtypes = (ctypes.POINTER(_Desc), ctypes.POINTER(_Err))
            lib.cudasim_launch.restype = ctypes.c_int
            lib.cudasim_module_tls.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                               ctypes.POINTER(ctypes.c_ulonglong))
            lib.cudasim_module_tls.restype = ctypes.c_int
            lib.cudasim_ldsm_stats.argtypes = (ctypes.POINTER(ctypes.c_ulonglong),)
            lib.cudasim_ldsm_stats.restype = None
            _rt_lib = lib
        return _rt_lib


# ---------------------------------------------------------------------------- modules
_KIND_NAME = {"p": "pointer", "i": "signed integer", "u": "unsigned integer", "b": "bool",
              "f": "floating point", "o": "struct/other", "v": "void"}
_C_NAME = {("i", 1): "signed char", ("i", 2): "short", ("i", 4): "int", ("i", 8): "long long",
           ("u", 1): "unsigned char", ("u", 2): "unsigned short", ("u", 4): "unsigned int",
           ("u", 8): "unsigned long long", ("f", 4): "float", ("f", 8): "double",
           ("b", 1): "bool"}


class Param:
    __slots__ = ("index", "name", "kind", "size", "pointee_kind", "pointee_size", "pointee_const")

    def __init__(self, index, name, p):
        self.index = index
        self.name = name
        self.kind = p.kind.decode()
        self.size = p.size
        self.pointee_kind = p.pointee_kind.decode()
        self.pointee_size = p.pointee_size
        self.pointee_const = p.pointee_const != b"\0"

    def describe(self):
        if self.kind == "p":
            c = "const " if self.pointee_const else ""
            t = "void" if self.pointee_kind == "v" else _C_NAME.get(
                (self.pointee_kind, self.pointee_size), f"<{self.pointee_size}-byte struct>")
            return f"{c}{t}*"
        return _C_NAME.get((self.kind, self.size), f"<{self.size}-byte {_KIND_NAME[self.kind]}>")

    def label(self):
        return f"argument {self.index} '{self.name}'" if self.name else f"argument {self.index}"


class Kernel:
    """One entry point of a built module (what get_function returns)."""

    def __init__(self, module, name, fn, invoke, params):
        self.module = module
        self.name = name
        self.fn = fn
        self.invoke = invoke
        self.params = params

    def __repr__(self):
        sig = ", ".join(f"{p.describe()} {p.name or ''}".strip() for p in self.params)
        return f"<cudasim kernel {self.name}({sig})>"


class Module:
    """A compiled CUDA source (the .so loaded once per process)."""

    def __init__(self, path, meta, source):
        _runtime_lib()
        self.path = path
        self.source = source
        self.lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL | os.RTLD_NOW)
        self.lib.cudasim_dynsmem_array.restype = ctypes.c_void_p
        n = ctypes.c_int.in_dll(self.lib, "cudasim_nentries").value
        entries = (_Entry * (n + 1)).in_dll(self.lib, "cudasim_entries")
        names = meta.get("params", {})
        self.kernels = {}
        for i in range(n):
            e = entries[i]
            name = e.name.decode()
            pnames = names.get(name, [])
            if len(pnames) != e.nparams:
                pnames = [None] * e.nparams
            params = [Param(j, pnames[j], e.params[j]) for j in range(e.nparams)]
            self.kernels[name] = Kernel(self, name, e.fn, e.invoke, params)
        self._markers = [(m.start(), m.group(1)) for m in
                         re.finditer(r"^// ---- (\S+)\s*$", source, flags=re.M)]
        self._line_starts = None

    def tls(self):
        """(dyn array address, TLS block address, TLS size) for the calling thread."""
        dyn = self.lib.cudasim_dynsmem_array()  # touches the TLS block (allocates it)
        addr = ctypes.c_void_p()
        size = ctypes.c_ulonglong()
        _runtime_lib().cudasim_module_tls(self.lib._handle, ctypes.byref(addr), ctypes.byref(size))
        return dyn, addr.value, size.value

    def where(self, line: int) -> str:
        """'conv_fwd.cu:12' for a line of the compiled text (markers '// ---- name')."""
        if self._line_starts is None:
            self._line_starts = [0] + [m.end() for m in re.finditer("\n", self.source)]
            self._marker_lines = [(self.source.count("\n", 0, pos) + 1, name)
                                  for pos, name in self._markers]
        best = None
        for mline, name in getattr(self, "_marker_lines", []):
            if mline < line:
                best = (mline, name)
        if best is None:
            return f"line {line}"
        return f"{best[1]}:{line - best[0]}"


# ---------------------------------------------------------------------------- schedule helper
class _Schedule(str):
    """``sim.schedule`` is the default schedule's name (a str) and, called, a context
    manager: ``with sim.schedule("reverse"): ...``."""

    def __new__(cls, name, runtime):
        s = super().__new__(cls, name)
        s._rt = runtime
        return s

    @contextlib.contextmanager
    def __call__(self, name, seed=None):
        rt = self._rt
        _check_schedule(name)
        old = rt._schedule, rt.seed
        rt._schedule = name
        if seed is not None:
            rt.seed = int(seed)
        try:
            yield rt
        finally:
            rt._schedule, rt.seed = old


def _check_schedule(name):
    if name not in SCHEDULES + ("cycle",):
        raise ValueError(f"cudasim: unknown schedule {name!r}; expected one of "
                         f"{', '.join(SCHEDULES + ('cycle',))}")


# ---------------------------------------------------------------------------- runtime
class SimRuntime(DeviceRuntime):
    """gpuconv device runtime on the CPU emulator.

    schedule: 'forward' | 'reverse' | 'random' | 'warp' | 'cycle' (each launch uses the
    next of the four); default from $GPUCONV_CUDASIM_SCHEDULE, else 'forward'.
    seed: for 'random' (launch k uses seed + k; ``launch(..., seed=s)`` uses s exactly).  time_limit: seconds per launch
    ($GPUCONV_CUDASIM_TIME_LIMIT, default 120).  stack_kib: stack of each CUDA thread.
    """

    name = "cudasim"
    xp = np

    def __init__(self, schedule=None, seed=0, time_limit=None, stack_kib=128):
        if schedule is None:
            schedule = os.environ.get(ENV_SCHEDULE, "").strip().lower() or "forward"
        _check_schedule(schedule)
        self._schedule = schedule
        self.seed = int(seed)
        if time_limit is None:
            time_limit = float(os.environ.get(ENV_TIME_LIMIT, "120"))
        self.time_limit = float(time_limit)
        self.stack_kib = int(stack_kib)
        self._launches = itertools.count()
        self._modules = {}
        self.last_schedule = None  # (name, seed) of the latest launch
        self.launch_count = 0

    # schedule: a str attribute that is also a context manager factory
    @property
    def schedule(self):
        return _Schedule(self._schedule, self)

    @schedule.setter
    def schedule(self, name):
        _check_schedule(name)
        self._schedule = name

    def device_key(self):
        return 0

    def device_scope(self, a):
        return contextlib.nullcontext()  # one emulated device

    # ------------------------------------------------------------------ building
    def build(self, source: str, entry_names=None, options=()):
        path, meta = _build.build_module(source, entry_names, options)
        mod = self._modules.get(str(path))
        if mod is None:
            mod = _loaded_module(path, meta, source)
            self._modules[str(path)] = mod
        return mod

    def get_function(self, module, name):
        try:
            return module.kernels[name]
        except KeyError:
            raise KeyError(f"cudasim: {name!r} is not an entry point of this module "
                           f"(entry points: {', '.join(sorted(module.kernels))})") from None

    # ------------------------------------------------------------------ memory
    def empty(self, shape, dtype):
        return _memory.allocate(shape, dtype)

    def ascontiguous(self, a):
        a = np.asarray(a)
        out = _memory.allocate(a.shape, a.dtype)
        out[...] = a
        return out

    def is_device_array(self, a) -> bool:
        return isinstance(a, np.ndarray) and _memory.allocation_of(a) is not None

    # ------------------------------------------------------------------ launching
    def launch(self, fn, grid, block, args, shared_mem=0, schedule=None, seed=None):
        if not isinstance(fn, Kernel):
            raise TypeError(f"cudasim: launch needs a kernel from get_function(), got {fn!r}")
        grid = _dims(grid, "grid", MAX_GRID)
        block = _dims(block, "block", MAX_BLOCK)
        nthreads = block[0] * block[1] * block[2]
        if nthreads > MAX_THREADS_PER_BLOCK:
            raise LaunchConfigError(f"cudasim: {fn.name}: block {block} has {nthreads} threads, "
                                    f"more than {MAX_THREADS_PER_BLOCK}")
        shared_mem = int(shared_mem)
        if not 0 <= shared_mem <= SHARED_MEM_PER_BLOCK_OPTIN:
            raise LaunchConfigError(f"cudasim: {fn.name}: shared_mem={shared_mem} bytes outside "
                                    f"0..{SHARED_MEM_PER_BLOCK_OPTIN}")
        k = next(self._launches)
        self.launch_count = k + 1
        sched = schedule or self._schedule
        _check_schedule(sched)
        if sched == "cycle":
            sched = SCHEDULES[k % len(SCHEDULES)]
        # the seed in an error message reproduces the launch: launch(..., seed=that)
        eff_seed = self.seed + k if seed is None else int(seed)
        self.last_schedule = (sched, eff_seed)
        argv_holder, buffers = _pack_args(fn, args)
        _launch(fn, grid, block, shared_mem, argv_holder, buffers, sched, eff_seed,
                self.time_limit, self.stack_kib * 1024)


_loaded = {}
_loaded_lock = threading.Lock()


def _loaded_module(path, meta, source):
    # one Module per .so per process (dlopen returns the same handle anyway)
    with _loaded_lock:
        mod = _loaded.get(str(path))
        if mod is None:
            mod = Module(path, meta, source)
            _loaded[str(path)] = mod
        return mod


def _dims(v, what, lim):
    if isinstance(v, (int, np.integer)):
        v = (int(v),)
    v = tuple(int(x) for x in v)
    if not 1 <= len(v) <= 3:
        raise LaunchConfigError(f"cudasim: {what}={v} must have 1 to 3 dimensions")
    v = v + (1,) * (3 - len(v))
    for i, (x, m) in enumerate(zip(v, lim)):
        if not 1 <= x <= m:
            raise LaunchConfigError(f"cudasim: {what}[{i}]={x} outside 1..{m}")
    return v


# ---------------------------------------------------------------------------- arguments
def _scalar_kind(v):
    if isinstance(v, np.bool_):
        return "b"
    if isinstance(v, np.signedinteger):
        return "i"
    if isinstance(v, np.unsignedinteger):
        return "u"
    if isinstance(v, np.floating):
        return "f"
    if isinstance(v, np.generic):
        return "o"
    return None


def _pack_args(fn: Kernel, args):
    args = tuple(args)
    params = fn.params
    if len(args) != len(params):
        sig = ", ".join(p.describe() + (f" {p.name}" if p.name else "") for p in params)
        raise LaunchArgumentError(f"cudasim: {fn.name} takes {len(params)} arguments ({sig}), "
                                  f"got {len(args)}")
    n = len(args)
    store = np.zeros(max(n, 1) * 2, dtype=np.uint64)  # 16 bytes per argument value
    argv = (ctypes.c_void_p * max(n, 1))()
    base = store.ctypes.data
    buffers = []  # (allocation, param, array)
    for i, (p, a) in enumerate(zip(params, args)):
        slot = store[2 * i:2 * i + 2].view(np.uint8)
        if p.kind == "p":
            if not isinstance(a, np.ndarray):
                raise LaunchArgumentError(
                    f"cudasim: {fn.name}: {p.label()} is {p.describe()}, got "
                    f"{type(a).__name__} {a!r:.60}; pass an array from SimRuntime.empty/ascontiguous")
            mm = _memory.allocation_of(a)
            if mm is None:
                raise LaunchArgumentError(
                    f"cudasim: {fn.name}: {p.label()} ({p.describe()}) is a numpy array in host "
                    f"memory, not device memory from SimRuntime.empty()/ascontiguous() "
                    f"(a real GPU would fault on it)")
            _check_pointee(fn, p, a)
            slot[:8].view(np.uint64)[0] = a.ctypes.data
            buffers.append((mm, p, a))
        else:
            k = _scalar_kind(a)
            if k is None:
                what = ("an untyped Python " + type(a).__name__) if isinstance(a, (int, float, bool)) \
                    else type(a).__name__
                raise LaunchArgumentError(
                    f"cudasim: {fn.name}: {p.label()} is {p.describe()}, got {what} {a!r:.60}; "
                    f"pass a typed numpy scalar (np.int32, np.int64, np.float32, ...)")
            if k != p.kind or a.dtype.itemsize != p.size:
                if not (p.kind == "o" and a.dtype.itemsize == p.size):
                    raise LaunchArgumentError(
                        f"cudasim: {fn.name}: {p.label()} is {p.describe()} ({p.size} bytes, "
                        f"{_KIND_NAME[p.kind]}), got np.{a.dtype.name} ({a.dtype.itemsize} bytes, "
                        f"{_KIND_NAME[k]})")
            slot[:p.size] = np.frombuffer(np.asarray(a).tobytes(), dtype=np.uint8)
        argv[i] = base + 16 * i
    return (store, argv), buffers


def _check_pointee(fn, p, a):
    pk, ps, dt = p.pointee_kind, p.pointee_size, a.dtype
    if pk == "v" or ps == 1:
        return
    ok = True
    if pk == "o":
        ok = ps % dt.itemsize == 0 or dt.itemsize == ps
    elif ps == 2:
        ok = dt.itemsize == 2
    else:
        ok = dt.itemsize == ps and (dt.kind == "f" if pk == "f" else
                                    dt.kind in "iu" if pk in "iu" else dt.kind == "b" if pk == "b"
                                    else True)
    if not ok:
        raise LaunchArgumentError(f"cudasim: {fn.name}: {p.label()} is {p.describe()} "
                                  f"({ps}-byte elements), got a {dt.name} array "
                                  f"({dt.itemsize}-byte elements)")


# ---------------------------------------------------------------------------- the launch
_launch_lock = threading.RLock()


def _launch(fn, grid, block, shared_mem, argv_holder, buffers, sched, seed, time_limit, stack):
    lib = _runtime_lib()
    mod = fn.module
    store, argv = argv_holder
    with _launch_lock:
        dyn, tls, tls_size = mod.tls()
        desc = _Desc()
        desc.invoke = fn.invoke
        desc.fn = fn.fn
        desc.argv = ctypes.addressof(argv)
        desc.grid[:] = grid
        desc.block[:] = block
        desc.dyn_bytes = shared_mem
        desc.dyn_array = dyn
        desc.dyn_capacity = _build.DYN_SMEM_CAPACITY
        desc.tls_block = tls or 0
        desc.tls_size = tls_size if tls else 0
        desc.schedule = _SCHED_CODE[sched]
        desc.seed = seed & (2**64 - 1)
        desc.time_limit = time_limit
        desc.stack_size = stack
        err = _Err()
        # inputs declared const become read-only for the launch (unless also passed non-const)
        writable = {id(mm) for mm, p, _ in buffers if not p.pointee_const}
        readonly = {id(mm): mm for mm, p, _ in buffers if p.pointee_const and id(mm) not in writable}
        try:
            for mm in readonly.values():
                _memory.protect_data(mm, writable=False)
            code = lib.cudasim_launch(ctypes.byref(desc), ctypes.byref(err))
            if _bank_collectors:
                _record_banks(lib, fn, grid, block)
        finally:
            for mm in readonly.values():
                _memory.protect_data(mm, writable=True)
        del store
        ctx = _Context(fn, grid, block, shared_mem, sched, seed)
        if code != 0:
            raise _make_error(code, err, ctx, buffers, readonly)
        # small writes before a buffer's start land in its canary
        seen = set()
        for mm, p, a in buffers:
            if id(mm) in seen:
                continue
            seen.add(id(mm))
            bad = _memory.canary_damage(mm)
            if bad:
                raise MemoryAccessError(
                    f"cudasim: {ctx.head()}: out-of-bounds write before the start of {p.label()} "
                    f"({mm.label}) at byte offset(s) {bad[:8]} relative to its first element "
                    f"(found after the launch; block and thread unknown)")


# ---------------------------------------------------------------------------- bank counts
_bank_collectors: list = []


class BankCounts(list):
    """Per launch, the shared-memory wavefronts of its ldmatrix instructions (one dict a
    launch: kernel, grid, block, ldmatrix, phases, wavefronts, worst_ways, worst_at).
    A phase (one 8x8 matrix: 8 rows of 16 bytes) is conflict-free when it takes one
    wavefront; ``conflicts`` is the wavefronts over the ideal, summed over the launches."""

    @property
    def conflicts(self) -> int:
        return sum(r["wavefronts"] - r["phases"] for r in self)

    def worst(self):
        return max(self, key=lambda r: r["worst_ways"], default=None)


class count_bank_conflicts:
    """Context manager: collect :class:`BankCounts` for every emulated launch inside it."""

    def __enter__(self):
        self.counts = BankCounts()
        _bank_collectors.append(self.counts)
        return self.counts

    def __exit__(self, *exc):
        _bank_collectors.remove(self.counts)


def _record_banks(lib, fn, grid, block):
    out = (ctypes.c_ulonglong * 5)()
    lib.cudasim_ldsm_stats(out)
    n, phases, wf, ways, line = list(out)
    rec = {"kernel": fn.name, "grid": tuple(grid), "block": tuple(block), "ldmatrix": n,
           "phases": phases, "wavefronts": wf, "worst_ways": ways,
           "worst_at": fn.module.where(int(line)) if n else None}
    for c in _bank_collectors:
        c.append(rec)


class _Context:
    def __init__(self, fn, grid, block, shared_mem, sched, seed):
        self.fn, self.grid, self.block, self.smem = fn, grid, block, shared_mem
        self.sched, self.seed = sched, seed

    def head(self):
        s = self.sched + (f", seed {self.seed}" if self.sched == "random" else "")
        return (f"{self.fn.name} <<<grid {self.grid}, block {self.block}, shared {self.smem}>>> "
                f"[schedule {s}]")


def _make_error(code, err, ctx, buffers, readonly):
    msg = err.msg.decode(errors="replace")
    mod = ctx.fn.module
    msg = re.sub(r"(?:at )?\{L(\d+)\}", lambda m: f"at {mod.where(int(m.group(1)))}", msg)
    where = f"block ({err.block[0]},{err.block[1]},{err.block[2]})"
    if err.has_thread:
        where += f" thread ({err.thread[0]},{err.thread[1]},{err.thread[2]})"
    cls = _ERR_CLASS.get(code, CudaSimError)
    if code == 2:  # fault in global memory: name the buffer
        msg = _describe_fault(err.addr, err.access, buffers, readonly) or msg
    elif code == 11:  # misaligned vector access: name the global buffer, if any
        mm = _memory.find(err.addr)
        if mm is not None and mm.data_addr <= err.addr < mm.data_end:
            label = next((f"{p.label()} ({mm.label})" for m, p, _ in buffers if m is mm), mm.label)
            msg += f"; in {label} at byte offset {err.addr - mm.data_addr}"
    return cls(f"cudasim: {ctx.head()}: {where}: {msg}")


def _describe_fault(addr, access, buffers, readonly):
    what = {0: "read", 1: "write"}.get(access, "access")
    mm = _memory.find(addr)
    if mm is None:
        if addr < 65536:
            return f"invalid {what} at address 0x{addr:x} (a null pointer?)"
        return (f"invalid {what} at address 0x{addr:x}, which is in no device buffer "
                f"(wild pointer, or a pointer into a freed buffer)")
    cands = [(p, a) for m, p, a in buffers if m is mm]
    if cands:
        p, a = cands[0]
        label = f"{p.label()} ({mm.label})"
        ptr = a.ctypes.data
        isz = a.dtype.itemsize
    else:
        label = f"device buffer {mm.label} (not an argument of this launch)"
        ptr, isz = mm.data_addr, 1
    off = addr - ptr
    elem = f" (element {off // isz})" if isz > 1 and off % isz == 0 else ""
    if mm.data_addr <= addr < mm.data_end:
        if id(mm) in readonly and access != 0:
            return (f"write to {label} at byte offset {off}{elem}, but the kernel declares it "
                    f"const (it is read-only during the launch)")
        return f"invalid {what} inside {label} at byte offset {off}"
    if addr >= mm.data_end:
        return (f"out-of-bounds {what} of {label} at byte offset {off}{elem}: "
                f"{addr - mm.data_end} bytes past the end of the {mm.nbytes_data}-byte buffer")
    if addr >= mm.data_addr - (mm.data_addr - mm.base_addr - _memory.PAGE) and id(mm) in readonly:
        return (f"out-of-bounds {what} of {label} at byte offset {off}: before its start "
                f"(the kernel declares it const)")
    return (f"out-of-bounds {what} of {label} at byte offset {off}: "
            f"{mm.data_addr - addr} bytes before the start of the {mm.nbytes_data}-byte buffer")


# ---------------------------------------------------------------------------- probe
def probe():
    """(usable, reason, details) without compiling anything."""
    ok, reason = _build.platform_supported()
    if not ok:
        return False, reason, {}
    cxx, ver = _build.compiler_info()
    if cxx is None:
        return False, ver, {}
    details = {"compiler": ver, "schedules": list(SCHEDULES)}
    try:
        details["cache_dir"] = str(_build.cache_dir())
    except OSError as e:
        return False, f"cudasim cache directory not writable: {e}", details
    if not shutil_which("readelf"):
        return False, "readelf (binutils) not found on PATH", details
    return True, None, details


def shutil_which(name):
    import shutil
    return shutil.which(name)
