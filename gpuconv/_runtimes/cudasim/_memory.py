"""Guarded "device" memory of the emulator.

Every buffer is its own anonymous mapping::

    [guard page][slack (canary) | data ........................][guard page]
                                                    data end == page boundary

so a read or write past the end hits the trailing guard page at once (a fault
the runtime turns into an exception), an access far before the start hits the
leading guard page, and a small write before the start changes the canary,
which is checked after every launch.  Data is poisoned with 0xFF bytes (NaN in
every float format, -1 in integers).  The arrays handed out are plain numpy
arrays whose base chain keeps the mapping alive.
"""
from __future__ import annotations

import ctypes
import mmap
import threading
import weakref

import numpy as np

PAGE = mmap.PAGESIZE
POISON = 0xFF
# canary bytes alternate 0xFE (even address) / 0xFF (odd): NaN in float16, bfloat16, float32 and
# float64 alike, so a small read before the start also yields NaN, yet distinct from the 0xFF poison
CANARY_PAIR = np.array([0xFE, 0xFF], np.uint8)
PROT_READ, PROT_WRITE = 1, 2

_libc = ctypes.CDLL(None, use_errno=True)
_mprotect = _libc.mprotect
_mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_mprotect.restype = ctypes.c_int


def mprotect(addr: int, size: int, prot: int) -> None:
    if size <= 0:
        return
    if _mprotect(addr, size, prot) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"cudasim: mprotect(0x{addr:x}, {size}) failed")


class DeviceAllocation(mmap.mmap):
    """One guarded mapping (an mmap subclass, so numpy views keep it alive)."""

    # filled in by allocate()
    base_addr: int
    data_addr: int
    nbytes_data: int
    label: str

    @property
    def data_end(self):
        return self.data_addr + self.nbytes_data

    @property
    def map_end(self):
        return self.base_addr + len(self)

    def slack(self):
        """(address, size) of the canary before the data."""
        start = self.base_addr + PAGE
        return start, self.data_addr - start


_registry: dict = {}  # base address -> weakref to DeviceAllocation
_lock = threading.Lock()
_dead: list = []  # bases of freed allocations; weakref callbacks (which may run inside
                  # any allocation, even under _lock) only append here, never lock


def _forget(base):
    def cb(_ref):
        _dead.append(base)
    return cb


def _purge():  # with _lock held
    while _dead:
        _registry.pop(_dead.pop(), None)


def allocate(shape, dtype, label: str | None = None) -> np.ndarray:
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    if any(s < 0 for s in shape):
        raise ValueError(f"cudasim: negative dimension in shape {shape}")
    count = 1
    for s in shape:
        count *= s
    nbytes = count * dtype.itemsize
    data_pages = -(-nbytes // PAGE)
    size = (data_pages + 2) * PAGE
    mm = DeviceAllocation(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
    raw = np.frombuffer(mm, dtype=np.uint8)
    base = raw.ctypes.data
    data_off = PAGE + data_pages * PAGE - nbytes
    raw[PAGE:data_off] = np.resize(CANARY_PAIR, data_off - PAGE)
    raw[data_off:data_off + nbytes] = POISON
    mm.base_addr = base
    mm.data_addr = base + data_off
    mm.nbytes_data = nbytes
    mm.label = label or f"{dtype.name}{list(shape)}"
    mprotect(base, PAGE, 0)
    mprotect(base + (data_pages + 1) * PAGE, PAGE, 0)
    arr = raw[data_off:data_off + nbytes].view(dtype).reshape(shape)
    del raw
    ref = weakref.ref(mm, _forget(base))
    with _lock:
        _purge()
        _registry[base] = ref
    return arr


def allocation_of(a: np.ndarray):
    """The DeviceAllocation an array lives in, or None for ordinary host memory."""
    obj = a
    for _ in range(64):
        if isinstance(obj, DeviceAllocation):
            return obj
        if isinstance(obj, np.ndarray):
            obj = obj.base
        elif isinstance(obj, memoryview):
            obj = obj.obj
        else:
            return None
    return None


def find(addr: int):
    """The live allocation whose mapping (guards included) holds addr, or None."""
    with _lock:
        _purge()
        refs = list(_registry.items())
    for base, ref in refs:
        mm = ref()
        if mm is not None and mm.base_addr <= addr < mm.map_end:
            return mm
    return None


def canary_damage(mm: DeviceAllocation):
    """Byte offsets (relative to the data start, negative) of damaged canary bytes."""
    start, n = mm.slack()
    if n <= 0:
        return []
    buf = (ctypes.c_ubyte * n).from_address(start)
    view = np.frombuffer(buf, dtype=np.uint8)
    want = np.resize(CANARY_PAIR, n)  # slack starts page aligned (even)
    bad = np.flatnonzero(view != want)
    if bad.size:
        view[bad] = want[bad]  # repair so later launches report only their own damage
    return [int(i) - n for i in bad]


def protect_data(mm: DeviceAllocation, writable: bool) -> None:
    """Make the data pages (slack included) read-only or read-write."""
    n = len(mm) - 2 * PAGE
    mprotect(mm.base_addr + PAGE, n, PROT_READ | (PROT_WRITE if writable else 0))
