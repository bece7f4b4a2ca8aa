"""The CUDA emulator, re-exported under its documented name.

It lives in :mod:`gpuconv._runtimes.cudasim` (it is one of the device runtimes
the CUDA backend runs on); ``from gpuconv.testing.cudasim import SimRuntime``
keeps working.
"""
from gpuconv._runtimes.cudasim import *  # noqa: F401,F403
from gpuconv._runtimes.cudasim import __all__, __doc__ as _runtime_doc  # noqa: F401

__doc__ = __doc__ + "\n" + _runtime_doc
