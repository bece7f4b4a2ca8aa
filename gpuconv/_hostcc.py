"""The host C++ compiler: finding it, and building shared libraries into a cache keyed by
content (used by the CUDA emulator and by the native CPU kernels).

The cache root is ``$GPUCONV_CACHE_DIR`` or ``~/.cache/gpuconv`` (``$XDG_CACHE_HOME``).
Builds write under a temporary name and rename, so concurrent builds are safe.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path


@functools.lru_cache(maxsize=None)
def compiler_info(cmd: str, env_hint: str):
    """(path, version text) of the C++ compiler `cmd`, or (None, reason)."""
    path = shutil.which(cmd)
    if path is None:
        return None, f"no C++ compiler: {cmd!r} not found on PATH (set {env_hint})"
    try:
        out = subprocess.run([path, "-dumpfullversion", "-dumpversion"], capture_output=True,
                             text=True, timeout=30)
        ver = out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"
        return path, f"{Path(path).name} {ver}"
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        return None, f"C++ compiler {path} does not run: {e}"


def cache_root() -> Path:
    base = os.environ.get("GPUCONV_CACHE_DIR")
    return Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME",
                                                       Path.home() / ".cache")) / "gpuconv"


def cache_subdir(name: str) -> Path:
    d = cache_root() / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def content_hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def run_compiler(cmd, what, error=RuntimeError, prefix="gpuconv"):
    """Run a compiler command; raise `error` with its output (at most 80 lines) on failure."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        raise error(f"{prefix}: {what} failed to run: {e}") from e
    if r.returncode != 0:
        out = (r.stderr or r.stdout).strip().splitlines()
        if len(out) > 80:
            out = out[:80] + [f"... ({len(out) - 80} more lines)"]
        raise error(f"{prefix}: {what} failed (exit {r.returncode}):\n"
                    + "\n".join(out) + f"\ncommand: {' '.join(map(str, cmd))}")
    return r.stdout
