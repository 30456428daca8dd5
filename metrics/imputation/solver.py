"""The batched solver: conjugate gradients for all images and channels at once, preconditioned by the
multigrid V-cycle (`metrics.imputation.multigrid`), started from a full-multigrid guess, each system
frozen once its error estimate is within `tol`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from functools import partial

import torch

from metrics.imputation.multigrid import Blur, Hierarchy, Plan
from metrics.imputation.stencils import blur, box, laplacian, prolong

FMG_SWEEPS = 2  # Jacobi sweeps on each coarse grid of the full-multigrid start
CPU_GROUP = 2  # images whose finest-grid work runs together on CPU, so that a pass stays in cache


class ImputationWarning(RuntimeWarning):
    """The linear imputation stopped at `max_iter` before every image reached `tol`."""


class Residual:
    """`laplacian` on the finest grid for a group of images, in preallocated buffers."""

    def __init__(self, n: int, c: int, h: int, w: int, like: torch.Tensor) -> None:
        new = partial(torch.zeros, dtype=like.dtype, device=like.device)
        self.u, self.ey, self.t = new(n, c, h, w), new(n, c, h, w), new(n, c, h, w)
        self.dx = new(n, c, h, w + 1)  # horizontal differences, zero beyond the edges
        self.ex = new(n, c, h + 2, w)  # horizontal second differences, zero rows above and below
        self.dy = new(n, c, h + 1, w)

    def __call__(self, known: torch.Tensor, x: torch.Tensor, off: torch.Tensor, out: torch.Tensor) -> None:
        """`out = 12 * off * sum_j w_ij (u_j - u_i)` with `u = known + x` (`off` is unknown / 12)."""
        n = len(x)
        u, ey, t = self.u[:n], self.ey[:n], self.t[:n]
        dx, ex, dy = self.dx[:n], self.ex[:n], self.dy[:n]
        torch.add(known, x, out=u)
        torch.sub(u[..., 1:], u[..., :-1], out=dx[..., 1:-1])
        torch.sub(dx[..., 1:], dx[..., :-1], out=ex[..., 1:-1, :])
        torch.sub(u[..., 1:, :], u[..., :-1, :], out=dy[..., 1:-1, :])
        torch.sub(dy[..., 1:, :], dy[..., :-1, :], out=ey)
        torch.add(ex[..., :-2, :], ex[..., 2:, :], out=t).add_(ex[..., 1:-1, :], alpha=2).add_(ey, alpha=4)
        t[..., :1].sub_(ey[..., :1])
        t[..., -1:].sub_(ey[..., -1:])
        torch.mul(t, off, out=out)


class Solver:
    """Preconditioned conjugate gradients for all images and channels at once, frozen per system.

    The finest grid's work runs a group of images at a time (on CPU, 2, so that a pass over memory stays
    in cache), the coarser grids' for the whole batch at once (to spread the per-operation overhead).
    Groups whose systems have all converged are skipped.
    """

    def __init__(self, images: torch.Tensor, removed: torch.Tensor, tol: float, max_iter: int) -> None:
        self.tol, self.max_iter = tol, max_iter
        b, c, h, w = images.shape
        self.unknown = removed.unsqueeze(1).to(images.dtype)
        self.known = images * (1 - self.unknown)
        group = min(b, b if images.device.type != "cpu" else CPU_GROUP)
        self.groups = [slice(lo, min(lo + group, b)) for lo in range(0, b, group)]
        self.hier = Hierarchy(self.unknown, c, group)
        self.scratch = images.new_empty(group, c, h, w)
        self.laplacian = Residual(group, c, h, w, images)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The true residual `b - A x` of the fine system, computed without cancellation, by groups."""
        out = torch.empty_like(x)
        off = self.hier.grids[0].off if self.hier.grids else self.unknown / 12
        for g in self.groups:
            self.laplacian(self.known[g], x[g], off[g], out[g])
        return out

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`[n, C]` inner products."""
        return torch.mul(a, b, out=self.scratch[: len(a)]).sum(dim=(2, 3))

    def fmg(self) -> torch.Tensor:
        """A full-multigrid start: each coarse grid's own problem (its kept cells hold the mean of their
        kept pixels) is solved exactly on the coarsest grid, then from each grid's answer, prolonged to
        the next finer grid, by `FMG_SWEEPS` Jacobi sweeps there; the finest grid gets the prolongation.
        """
        hier = self.hier
        sums, counts = [self.known], [1 - self.unknown]
        for _ in hier.grids:
            sums.append(box(sums[-1]))
            counts.append(box(counts[-1]))
        k = len(hier.grids)
        u = sums[k] / counts[k].clamp(min=1)
        u = u + hier.solve_coarsest(laplacian(u).mul_(hier.coarsest))
        for k in range(len(hier.grids) - 1, 0, -1):
            grid, plan = hier.grids[k], hier.plans[k - 1]
            u = (sums[k] / counts[k].clamp(min=1)).addcmul_(
                grid.unknown, prolong(u, grid.h, grid.w), value=1 / 16
            )
            u += plan.pre_smooth(grid.off * blur(u) - grid.diag * u, FMG_SWEEPS)
        return prolong(u, *self.known.shape[-2:]).mul_(self.unknown).mul_(1 / 16)

    def precondition(
        self, plans: list[Plan], views: list[tuple], on: list[bool]
    ) -> Iterator[torch.Tensor | None]:
        """`z = M r` per group (None for groups that are off), each valid until the next is made (the
        finest grid's buffers are shared by the groups). The V-cycle, split around the coarse grids'
        batched part: a Jacobi sweep from 0 and the restricted residual (per group), the coarse V-cycle
        (whole batch), then the coarse correction and a second Jacobi sweep (per group).
        """
        for plan, (_, r_g, _, _), live in zip(plans, views, on, strict=True):
            if live:
                torch.mul(plan.inv, r_g, out=plan.e)
                plan.restrict(r_g)
        self.hier.vcycle(1)
        for plan, (_, r_g, _, _), live in zip(plans, views, on, strict=True):
            if live:
                torch.mul(plan.inv, r_g, out=plan.e)
                plan.correct()
                yield plan.smooth_from(r_g)
            else:
                yield None

    def estimate(self, z: torch.Tensor) -> torch.Tensor:
        """`[n, C]` the error estimate `max |z|` of `z = M r`."""
        return torch.abs(z, out=self.scratch[: len(z)]).amax(dim=(2, 3))

    def run(self) -> torch.Tensor:
        """The filled images: CG from the full-multigrid start, each (image, channel) frozen once its
        error estimate `max |M r|` is within `tol` (its step sizes become 0), then confirmed from the
        true residual.
        """
        if not self.hier.grids:  # small enough for the dense solve
            return self.known + self.hier.solve_coarsest(self.residual(torch.zeros_like(self.known)))
        cg = _Iteration(self)
        fresh = True  # `r` is the true residual
        for _ in range(self.max_iter):
            if not bool(cg.active.any()):
                if fresh:
                    break
                cg.confirm()  # from the true residual; go on where it disagrees
                fresh = True
                if not bool(cg.active.any()):
                    break
            fresh = False
            cg.step()
        else:
            if not fresh:
                cg.confirm()
            warn_unconverged(cg.est, self.tol, self.max_iter)
        return cg.x.add_(self.known)


class _Iteration:
    """The state of one run of `Solver`: the iterate `x`, residual `r` and direction `p`, worked a group
    of images at a time (`views`, `plans`), and per (image, channel) `r.z`, the error estimate `est`
    and whether the system is still `active`.
    """

    def __init__(self, solver: Solver) -> None:
        self.solver = s = solver
        fine, below = s.hier.grids[0], s.hier.below[0]
        self.plans = [fine.plan(g, below) for g in s.groups]
        b, c, h, w = s.known.shape
        p_padded = s.known.new_zeros(b, c, h + 2, w + 2)
        p = p_padded[..., 1:-1, 1:-1]
        self.x = s.fmg()
        self.r = s.residual(self.x)
        self.views = [
            (
                self.x[g],
                self.r[g],
                p[g],
                Blur(p_padded[g], fine.rows[: g.stop - g.start], fine.blurred[: g.stop - g.start]),
            )
            for g in s.groups
        ]
        self.rz = self.r.new_empty(b, c)
        self.est = self.r.new_empty(b, c)
        self.restart()

    def restart(self) -> None:
        """The direction `p = M r`, its `r.z` and error estimate, from the residual now in `r`."""
        s = self.solver
        everyone = [True] * len(s.groups)
        for g, z, (_, r_g, p_g, _) in zip(
            s.groups, s.precondition(self.plans, self.views, everyone), self.views, strict=True
        ):
            assert z is not None
            p_g.copy_(z)
            self.rz[g] = s.dot(r_g, z)
            self.est[g] = s.estimate(z)
        self.active = self.est > s.tol

    def confirm(self) -> None:
        """Restart from the true residual, recomputed from the iterate (not the CG recurrence)."""
        self.r.copy_(self.solver.residual(self.x))
        self.restart()

    def step(self) -> None:
        """One CG step of the active systems, skipping groups with none."""
        s, active, rz = self.solver, self.active, self.rz
        live = [bool(active[g].any()) for g in s.groups]
        for g, (x_g, r_g, p_g, blurred), plan, on in zip(s.groups, self.views, self.plans, live, strict=True):
            if on:
                q = torch.mul(plan.diag, p_g, out=plan.start).addcmul_(plan.off, blurred(), value=-1)
                alpha = torch.where(active[g], rz[g] / s.dot(p_g, q), 0.0)[..., None, None]
                x_g.addcmul_(alpha, p_g)
                r_g.addcmul_(alpha, q, value=-1)
        for g, z, (_, r_g, p_g, _) in zip(
            s.groups, s.precondition(self.plans, self.views, live), self.views, strict=True
        ):
            if z is not None:
                rz_new = s.dot(r_g, z)
                beta = torch.where(active[g], rz_new / rz[g], 0.0)[..., None, None]
                torch.addcmul(z, beta, p_g, out=p_g)
                rz[g] = torch.where(active[g], rz_new, rz[g])
                self.est[g] = torch.where(active[g], s.estimate(z), self.est[g])
                active[g] &= self.est[g] > s.tol


def warn_unconverged(estimates: torch.Tensor, tol: float, max_iter: int) -> None:
    """Warn (`ImputationWarning`) about the (image, channel) systems whose error estimate exceeds `tol`."""
    failed = estimates > tol
    if bool(failed.any()):
        warnings.warn(
            f"linear imputation: {int(failed.sum())} of {failed.numel()} (image, channel) systems did "
            f"not reach tol={tol:g} in max_iter={max_iter} iterations (largest error estimate "
            f"{estimates.max().item():.2g}); their fill may be off by more than the stated error",
            ImputationWarning,
            stacklevel=5,
        )
