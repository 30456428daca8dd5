"""Fill removed pixels from the kept ones: ROAD's noisy linear imputation and a channel-mean fill.

ROAD (Rong, Leemann, Borisov, Kasneci, Kasneci, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022, https://arxiv.org/abs/2202.00449) replaces removed pixels by a value
that carries no information about the removal pattern: each removed pixel becomes the weighted mean of
its 8 neighbours (1/6 for the 4 edge neighbours, 1/12 for the 4 diagonals; neighbours outside the image
are dropped and the remaining weights renormalised), all removed pixels of an image solved together, then
Gaussian noise is added to the removed pixels.

For removed pixel i with in-image neighbours N(i), weights w_ij and d_i = sum_j w_ij, the equation is

    d_i x_i - sum_{j in N(i) removed} w_ij x_j = sum_{j in N(i) kept} w_ij v_j,

one system per image, whose matrix (shared by the channels) is symmetric positive definite as long as
every connected group of removed pixels touches a kept pixel (always, unless no pixel is kept).

The reference code builds the system on the host and calls a sparse direct solver, image by image. Here it
is solved on the images' device by conjugate gradients preconditioned by a symmetric geometric-multigrid
V-cycle (Jacobi smoothing, bilinear prolongation, restriction its transpose, a coarse cell unknown when it
covers no kept pixel, a dense solve on the coarsest grid), started from a full-multigrid guess (the
hierarchy's coarse problems, solved from coarse to fine). Each (image, channel) system stops once the
V-cycle's estimate of its remaining error, `max |M r|`, is within `tol`, confirmed from the residual
recomputed from the field (in float64 arithmetic on the CPU; from differences of neighbours on other
devices), not the CG recurrence.

Two implementations of that one method (`linear_fill(solver=...)`):

- `compiled` (CPU, the default there): loops compiled by numba, each pass over a plane fused into one
  loop, each (image, channel) plane solved on its own on one of torch's CPU threads.
  On this project's 2-core CPU it fills a 224x224 image (3 channels) in about 2.6 ms, a quarter of the
  batched-tensor version's 11 ms, whose CG iteration costs about forty small tensor operations per plane.
- `torch` (any device, the default off the CPU): batched tensor operations over images and channels,
  stencils as shifted adds of slices (never convolutions, so an image's result does not depend on its
  batch), each image's iterate frozen once it has converged; on the CPU the finest grid is worked 2
  images at a time (a pass over memory then stays in cache), the coarse grids for the whole batch.

The package, by concern: `fill` (the functions above, their checks and noise), `stencils` (the
8-neighbour operator and the grid transfers as tensor operations), `multigrid` (the grids, the V-cycle
and the coarsest grid's dense solve), `solver` (the batched preconditioned conjugate gradients), and the
compiled CPU solve (`cpu`, over the numba kernels in `cpu_passes`, `cpu_grids` and `cpu_solve`).
"""

from metrics.imputation.fill import (
    MAX_ITER,
    METHODS,
    SOLVERS,
    TOL,
    channel_mean_impute,
    impute,
    linear_fill,
    mean_fill,
    noisy_linear_impute,
)
from metrics.imputation.solver import ImputationWarning, warn_unconverged

__all__ = [
    "MAX_ITER",
    "METHODS",
    "SOLVERS",
    "TOL",
    "ImputationWarning",
    "channel_mean_impute",
    "impute",
    "linear_fill",
    "mean_fill",
    "noisy_linear_impute",
    "warn_unconverged",
]
