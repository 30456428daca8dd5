"""Names the user gives, checked against the model before any work: layers, channels and classes.

Each check raises `HarnessError` with one line that names the bad value and what would be right.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from harness.config import HarnessError


def conv_layers(model: nn.Module) -> list[str]:
    """The qualified names of the model's 2-D convolutions, in definition order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def layer(model: nn.Module, name: str, what: str = "layer") -> nn.Module:
    """The submodule called `name`; an unknown name lists the convolution layers."""
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise HarnessError(
            f"unknown {what} {name!r}; the model's convolution layers: {', '.join(conv_layers(model))}"
        )
    return modules[name]


def conv_layer(model: nn.Module, name: str) -> nn.Conv2d:
    """The convolution called `name` (filter grids need one)."""
    module = layer(model, name, "convolution layer")
    if not isinstance(module, nn.Conv2d):
        raise HarnessError(
            f"layer {name!r} is a {type(module).__name__}, not a convolution; filter grids need one of: "
            f"{', '.join(conv_layers(model))}"
        )
    return module


def check_units(units: Sequence[int], count: int, what: str) -> list[int]:
    """Channel or class indices, each in `[0, count)`."""
    out = []
    for u in units:
        if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < count:
            raise HarnessError(f"{what} {u!r} is out of range: expected an integer from 0 to {count - 1}")
        out.append(u)
    return out


def class_index(spec: int | str, names: Sequence[str]) -> int:
    """A class given by index or by name: a name matches exactly (any case) or, failing that, as
    part of one class name; none or several matches is an error that lists candidates.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        return check_units([spec], len(names), "class")[0]
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        return check_units([int(text)], len(names), "class")[0]
    exact = [i for i, n in enumerate(names) if n.lower() == text.lower()]
    found = exact or [i for i, n in enumerate(names) if text.lower() in n.lower()]
    if len(found) == 1:
        return found[0]
    if not found:
        raise HarnessError(f"class {text!r} matches no class name of the model (give an index or a name)")
    shown = ", ".join(f"{i}: {names[i]}" for i in found[:10]) + (", ..." if len(found) > 10 else "")
    raise HarnessError(
        f"class {text!r} matches {len(found)} class names ({shown}); give the index or the full name"
    )
