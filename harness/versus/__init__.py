"""Side-by-side benchmarks against the libraries that define a method or metric: each script times
ours against its bound and against the reference's own defaults on the same inputs, alternating the
two, and writes a table (`python -m harness.versus.captum`, `python -m harness.versus.road`,
`python -m harness.versus.cams`, `python -m harness.versus.methods`).
"""

__all__: list[str] = []  # scripts, each run with `python -m harness.versus.<name>`
