"""Following, through a model's forward, which tensors depend on its input: the base of the torch
function modes that give some calls a rule of their own (DeepLIFT's rescale pass, `methods.rescale`;
LRP's residual sums and means, `methods.lrp`), and the name of a call as the model's code reads it.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten


def method_name(func: Any) -> str | None:
    """The name of a Tensor method (`add`, `__len__`; `__get__` for attribute reads), or None."""
    name = getattr(func, "__name__", None)
    owner = getattr(func, "__objclass__", None)
    if name is None:
        return None
    if getattr(torch.Tensor, name, None) is func or (
        isinstance(owner, type) and issubclass(owner, torch._C.TensorBase)
    ):
        return name
    return name if type(func).__name__ == "method-wrapper" else None


def call_name(func: Any) -> str:
    """`Tensor.mul`, `softmax`, `layer_norm`: a call as the model's code reads."""
    method = method_name(func)
    return f"Tensor.{method}" if method else getattr(func, "__name__", repr(func))


class Following(TorchFunctionMode):
    """A torch function mode that knows which tensors depend on `start`: each call's outputs do when
    one of its tensors does (`follow`), by identity, through weak references.
    """

    def __init__(self, start: torch.Tensor) -> None:
        super().__init__()
        self.derived: dict[int, weakref.ref[torch.Tensor]] = {}
        self.follow(start)

    def follow(self, out: Any) -> None:
        """Mark every tensor in `out` (a call's result) as depending on the input."""
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.derived[id(t)] = weakref.ref(t)

    def depends(self, t: Any) -> bool:
        """Whether `t` is a tensor that depends on the input."""
        seen = self.derived.get(id(t)) if isinstance(t, torch.Tensor) else None
        return seen is not None and seen() is t

    def dependent(self, args: tuple, kwargs: dict) -> int:
        """How many of a call's tensors depend on the input."""
        return sum(self.depends(t) for t in tree_flatten((args, kwargs))[0])
