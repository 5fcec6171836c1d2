"""Loader benchmark (DALI vs the PyTorch/PIL loader, images/s side by side): a thin script.

    python benchmarks/bench_loader.py [options]     # same options as `fastmask bench --loader`

The benchmark itself lives in `fastmask.bench.loader`.
"""
import sys

from fastmask.bench.loader import main

if __name__ == "__main__":
    sys.exit(main())
