"""Compile (and cache) the harness's numba code (ROAD's imputation, FullGrad's terms, Guided IG's
selection) once, so that no run pays for it: `python -m metrics.compile`.

`make` runs it after installing. numba keeps the machine code in `metrics/imputation/__pycache__` and
`methods/__pycache__`, keyed by the kernels' sources and the CPU; an edited kernel or another machine
compiles again on first use.
"""

from __future__ import annotations

import time


def main() -> None:
    """Compile or load the numba code and say how long it took."""
    start = time.perf_counter()
    from methods import full_grad_cpu, path_ig_cpu
    from metrics.imputation import cpu

    cpu.warm()
    full_grad_cpu.warm()
    path_ig_cpu.warm()
    took = time.perf_counter() - start
    print(f"the numba kernels (ROAD, FullGrad, Guided IG) compiled or loaded from cache in {took:.1f} s")


if __name__ == "__main__":
    main()
