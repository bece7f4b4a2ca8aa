"""``python -m gpuconv`` and the ``gpuconv`` console script: info, selftest, bench.

    python -m gpuconv                  # info and a short help
    python -m gpuconv info [--json]
    python -m gpuconv selftest [--backend numpy|cupy|cudasim] [--seed N]
    python -m gpuconv bench [--quick] [--backend B] [--json FILE] [--plot FILE.png]

See :func:`gpuconv._cli.main` (re-exported here as :func:`main`).
"""
import sys

from gpuconv._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
