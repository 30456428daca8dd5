"""Counting the images that pass through a model, and stopping a call after its first passes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from methods.common import noting_passes


@dataclass
class ForwardCounter:
    """Counts the images that pass through a model's forward, split by whether autograd records, and
    the work a method notes as the model's own again (`methods.common.note_passes`: `noted_forwards`
    and `noted_backwards`, in images' worth).
    """

    forwards: int = 0
    backwards: int = 0
    calls: int = 0
    noted_forwards: float = 0.0
    noted_backwards: float = 0.0

    def hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook: add the batch sizes of the image tensors in the call's arguments."""
        n = image_rows(args)
        self.calls += 1
        if torch.is_grad_enabled():
            self.backwards += n
        else:
            self.forwards += n

    @property
    def images(self) -> int:
        """Images forwarded, with and without autograd."""
        return self.forwards + self.backwards


def image_rows(args: Any) -> int:
    """The images (rows of `[B, C, H, W]` tensors) among a model call's arguments."""
    # Captum's DeepLift calls model((x,), (baseline,)) and joins them in a hook of its own.
    return sum(t.shape[0] for t in _tensors(args) if t.dim() == 4)


def _tensors(args: Any) -> Iterator[torch.Tensor]:
    if isinstance(args, torch.Tensor):
        yield args
    elif isinstance(args, (tuple, list)):
        for a in args:
            yield from _tensors(a)


@contextmanager
def count_forwards(model: nn.Module) -> Iterator[ForwardCounter]:
    """Count images forwarded through `model` inside the block, and the passes methods note; the hook
    is always removed.
    """
    counter = ForwardCounter()
    handle = model.register_forward_pre_hook(counter.hook)
    try:
        with noting_passes() as noted:
            yield counter
    finally:
        handle.remove()
    counter.noted_forwards, counter.noted_backwards = noted


class StopEarly(BaseException):
    """Ends a call at a model pass boundary (see `first_passes`). A BaseException, so that a method's
    own `except Exception` cannot swallow it; every `finally` on the way out still runs.
    """


@dataclass
class Partial:
    """What `first_passes` ran: the model passes and images, and whether the call ran to its end."""

    completed: bool
    counter: ForwardCounter


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )  # fmt: skip


def first_passes(
    fn: Callable[[], Any], model: nn.Module, passes: int | None = None, seconds: float | None = None
) -> Partial:
    """Run `fn` until it is about to call `model` for the `passes + 1`-th time, or for the first
    time after `seconds` have passed (at least one pass runs); then stop it there.

    This is how a warm-up or a profile covers the first passes of an expensive call (RISE forwards
    thousands of masked images per image) instead of a whole call on one image, and it warms the
    very shapes that the call uses. A method stopped this way must leave no hooks on the model: it
    is an error if it does (Captum removes its hooks in `finally` blocks).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> part = first_passes(lambda: [model(torch.ones(2, 3)) for _ in range(5)], model, passes=2)
        >>> part.completed, part.counter.calls
        (False, 2)
    """
    limit = float("inf") if passes is None else passes
    deadline = float("inf") if seconds is None else time.perf_counter() + seconds
    counter, hooks = ForwardCounter(), _hooks(model)

    def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
        if counter.calls >= limit or (counter.calls and time.perf_counter() >= deadline):
            raise StopEarly
        counter.hook(module, args)

    handle = model.register_forward_pre_hook(stop)
    try:
        fn()
        completed = True
    except StopEarly:
        completed = False
    finally:
        handle.remove()
    if _hooks(model) != hooks:
        raise RuntimeError(
            f"a call stopped after {counter.calls} model passes left {_hooks(model) - hooks} hooks on the "
            "model; it must remove its hooks in a `finally` block"
        )
    return Partial(completed, counter)
