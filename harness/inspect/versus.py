"""What batching and stopping at the layer buy activation maximisation, measured side by side.

    python -m harness.inspect.versus [--layer blocks.8.expand.0] [--channels 16] [--steps 100] [--out DIR]

On EfficientNet-Lite0 at 224 with the default ascent settings of `conf/inspect.yaml`, times:

- `batched`: the channels optimised together (`harness.inspect.actmax.maximise`) in chunks of the
  fastest batch size, chosen as `python -m harness.inspect` chooses it, on the model as the harness
  runs it (channels-last, BatchNorm folded), the forward stopped at the layer;
- `bound`: the same number of forward+backward passes of that objective (images x steps) at its
  best batch size (of 1, 2, 4, 8, 16), timed just before and just after `batched` (the faster kept);
- `one_at_a_time`: the same code, one channel after another;
- `flashtorch_way`: one channel after another on the model as loaded (parameters requiring
  gradients, contiguous, BatchNorm unfolded) with the whole model run at every step, as FlashTorch's
  `GradientAscent` does.

Writes `actmax_speed.md` and `.csv` into `--out` with each time and the ratios.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from harness.device import SpeedOptions
from harness.inspect.actmax import Ascent, Objective, maximise, pass_times
from harness.model_speed import fastest
from harness.models import efficientnet_lite0
from harness.timing import machine_id

CPU = torch.device("cpu")


def _settings(steps: int) -> Ascent:
    a = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "inspect.yaml").actmax
    return Ascent(
        steps=steps, lr=a.lr, init_std=a.init_std, lp=a.lp, lp_weight=a.lp_weight, tv_weight=a.tv_weight,
        jitter=a.jitter, blur_every=a.blur_every, blur_sigma=a.blur_sigma, scale_every=a.scale_every,
        scales=tuple(a.scales), seed=0,
    )  # fmt: skip


def _bound(objective: Objective, units: list[int], size: int, passes: int) -> tuple[float, int]:
    """Seconds for `passes` forward+backward image passes at the best batch size, and that size."""
    per_image = pass_times(objective, units, size, CPU, [1, 2, 4, 8, 16])
    best = min(per_image, key=per_image.__getitem__)
    return per_image[best] * passes, best


def measure(layer: str, channels: int, steps: int, size: int = 224) -> pd.DataFrame:
    """The four timings (seconds) and their ratios, in one table."""
    clf = efficientnet_lite0()
    model = clf.module.eval()
    fast = copy.deepcopy(model)
    SpeedOptions(channels_last=True, fold_batchnorm=True).prepare(fast, torch.rand(2, 3, size, size))
    for p in fast.parameters():
        p.requires_grad_(False)
    units, settings = list(range(channels)), _settings(steps)
    objective = Objective(fast, layer, clf.mean, clf.std)
    before, batch = _bound(objective, units, size, channels * steps)
    chunk = fastest(pass_times(objective, units, size, CPU, [1, 2, 4, 8, 16]), largest=True)  # as the app
    started = time.perf_counter()
    maximise(objective, units, size, settings, CPU, chunk_size=chunk)
    batched = time.perf_counter() - started
    after, _ = _bound(objective, units, size, channels * steps)
    started = time.perf_counter()
    maximise(objective, units, size, settings, CPU, chunk_size=1)
    one_at_a_time = time.perf_counter() - started
    flashtorch = Objective(model, layer, clf.mean, clf.std, stop=False)  # parameters keep requires_grad
    started = time.perf_counter()
    maximise(flashtorch, units, size, settings, CPU, chunk_size=1)
    flashtorch_way = time.perf_counter() - started
    bound = min(before, after)
    return pd.DataFrame([{
        "machine": machine_id(), "layer": layer, "channels": channels, "steps": steps, "size": size,
        "threads": torch.get_num_threads(), "bound_batch": batch, "chunk": chunk, "bound_s": bound,
        "batched_s": batched,
        "one_at_a_time_s": one_at_a_time, "flashtorch_way_s": flashtorch_way,
        "batched_over_bound": batched / bound, "one_at_a_time_over_batched": one_at_a_time / batched,
        "flashtorch_way_over_batched": flashtorch_way / batched,
    }])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Command line: measure and write the table."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.inspect.versus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--layer", default="blocks.8.expand.0")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    table = measure(args.layer, args.channels, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "actmax_speed.csv", index=False)
    text = table.T.rename(columns={0: "value"}).to_markdown()
    (args.out / "actmax_speed.md").write_text(
        "# Activation maximisation: batched against one at a time\n\n" + text + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
