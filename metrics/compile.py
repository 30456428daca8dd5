"""Compile (and cache) the harness's numba code once, so that no run pays for it: `python -m metrics.compile`.

`make` runs it after installing. numba keeps the machine code in `metrics/imputation/__pycache__`,
keyed by the kernels' sources and the CPU; an edited kernel or another machine compiles again on
first use.
"""

from __future__ import annotations

import time


def main() -> None:
    """Compile or load the numba code and say how long it took."""
    start = time.perf_counter()
    from metrics.imputation import cpu

    cpu.warm()
    print(f"ROAD's CPU imputation compiled or loaded from its cache in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
