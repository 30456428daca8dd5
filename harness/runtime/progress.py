"""A progress bar per job, over the images (image x step pairs, for curves and perturbations) that
pass through the model in its current call. Shown only on a terminal unless asked for.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from tqdm import tqdm

from harness.runtime.passes import image_rows


class Progress:
    """One job's bar, removed from the terminal when its `with` block ends. Each tracked call resets
    it; its total is the call's images times the model passes per image that the first call of the
    same kind showed (unknown on that first call).

    Args:
        label: what the job is, e.g. `rise on resnet50/photos`.
        enabled: True or False, or None to show the bar only when stderr is a terminal.
    """

    def __init__(self, label: str, enabled: bool | None = None) -> None:
        show = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(desc=label, unit="img", disable=not show, leave=False, file=sys.stderr)
        self.passes_per_image: dict[str, float] = {}

    @contextmanager
    def call(self, what: str, model: nn.Module, images: int) -> Iterator[None]:
        """Count the images that go through `model` in the block, one call of `what` on `images`."""
        if self.bar.disable:
            yield
            return
        per = self.passes_per_image.get(what)
        self.bar.reset(total=round(per * images) if per else None)
        self.bar.set_postfix_str(what, refresh=False)

        def count(_module: nn.Module, args: tuple[object, ...]) -> None:  # None: the inputs go on as they are
            self.bar.update(image_rows(args))

        handle = model.register_forward_pre_hook(count)
        try:
            yield
        finally:
            handle.remove()
        if per is None and images > 0:  # a whole call only, not one stopped after its first passes
            self.passes_per_image[what] = self.bar.n / images

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()  # and off the terminal
