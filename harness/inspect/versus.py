"""What batching and stopping at the layer buy activation maximisation, measured side by side.

    python -m harness.inspect.versus [--layer blocks.8.expand.0] [--channels 16] [--steps 100]
                                     [--repeats 3] [--out DIR]

On EfficientNet-Lite0 at 224 with the default ascent settings of `conf/inspect.yaml`, times:

- `batched`: the channels optimised together (`harness.inspect.actmax.maximise`) in chunks of the
  fastest batch size, chosen as `python -m harness.inspect` chooses it, on the model as the harness
  runs it (channels-last, paddings and BatchNorms folded but the layer's own output kept), the
  forward stopped at the layer;
- `bound`: the same number of forward+backward passes of that objective (images x steps), run at
  its best batch size (of 1, 2, 4, 8, 16);
- `one_at_a_time`: the same code, one channel after another;
- `flashtorch_way`: one channel after another on the model as loaded (parameters requiring
  gradients, contiguous, paddings and BatchNorms as they are) with the whole model run at every
  step, as FlashTorch's `GradientAscent` does.

The four run in turn, `--repeats` rounds (this machine's speed drifts by a fifth or more from one
minute to the next). Writes `actmax_speed.md` and `.csv` into `--out`: each round's times and
ratios, and their medians.
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from harness.inspect.actmax import Ascent, Objective, best_chunk, maximise, pass_times
from harness.models import efficientnet_lite0
from harness.runtime import SpeedOptions, machine_id, timed

CPU = torch.device("cpu")
log = logging.getLogger(__name__)


def _settings(steps: int) -> Ascent:
    a = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "inspect.yaml").actmax
    return Ascent(
        steps=steps, lr=a.lr, init_std=a.init_std, lp=a.lp, lp_weight=a.lp_weight, tv_weight=a.tv_weight,
        jitter=a.jitter, blur_every=a.blur_every, blur_sigma=a.blur_sigma, scale_every=a.scale_every,
        scales=tuple(a.scales), seed=0,
    )  # fmt: skip


def _passes(objective: Objective, units: list[int], size: int, batch: int, passes: int) -> float:
    """Seconds for `passes` forward+backward image passes of `objective`, `batch` images at a time
    (after one warm-up pass).
    """
    x = torch.rand(batch, 3, size, size, device=CPU, requires_grad=True)
    target = torch.tensor([units[i % len(units)] for i in range(batch)], device=CPU)
    objective(x, target).sum().backward()

    def run() -> None:
        for _ in range(-(-passes // batch)):
            x.grad = None
            objective(x, target).sum().backward()

    return timed(run, CPU)[1] / 1e3


def _timed(objective: Objective, units: list[int], size: int, settings: Ascent, chunk: int) -> float:
    return timed(lambda: maximise(objective, units, size, settings, CPU, chunk_size=chunk), CPU)[1] / 1e3


def measure(layer: str, channels: int, steps: int, size: int = 224, repeats: int = 3) -> pd.DataFrame:
    """The four timings (seconds) and their ratios, one row per round; the rounds interleave the four
    runs, so that a slow spell of the machine falls on all of them rather than on one.
    """
    clf = efficientnet_lite0()
    model = clf.module.eval()
    fast = copy.deepcopy(model)
    SpeedOptions(channels_last=True, fold_batchnorm=True, fold_padding=True).prepare(
        fast, torch.rand(2, 3, size, size), keep={layer}
    )
    for p in fast.parameters():
        p.requires_grad_(False)
    units, settings = list(range(channels)), _settings(steps)
    objective = Objective(fast, layer, clf.mean, clf.std)
    sizes = [1, 2, 4, 8, 16]
    per_image = pass_times(objective, units, size, CPU, sizes)
    chunk = best_chunk(per_image, CPU)  # as the app chooses it
    batch = min(per_image, key=per_image.__getitem__)
    flashtorch = Objective(model, layer, clf.mean, clf.std, stop=False)  # parameters keep requires_grad
    rows = []
    for round_ in range(1, repeats + 1):
        bound = _passes(objective, units, size, batch, channels * steps)
        batched = _timed(objective, units, size, settings, chunk)
        one_at_a_time = _timed(objective, units, size, settings, 1)
        flashtorch_way = _timed(flashtorch, units, size, settings, 1)
        rows.append({
            "machine": machine_id(), "round": round_, "layer": layer, "channels": channels, "steps": steps,
            "size": size, "threads": torch.get_num_threads(), "bound_batch": batch, "chunk": chunk,
            "bound_s": bound, "batched_s": batched, "one_at_a_time_s": one_at_a_time,
            "flashtorch_way_s": flashtorch_way, "batched_over_bound": batched / bound,
            "one_at_a_time_over_batched": one_at_a_time / batched,
            "flashtorch_way_over_batched": flashtorch_way / batched,
        })  # fmt: skip
        log.info("round %d: bound %.1f s, batched %.1f s, one at a time %.1f s, FlashTorch's way %.1f s",
                 round_, bound, batched, one_at_a_time, flashtorch_way)  # fmt: skip
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    """Command line: measure and write the table."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.inspect.versus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--layer", default="blocks.8.expand.0")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the four runs, interleaved")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = measure(args.layer, args.channels, args.steps, repeats=args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "actmax_speed.csv", index=False)
    timed = [c for c in table.columns if c.endswith("_s") or "_over_" in c]
    shown = table[["round", *timed]].copy()
    medians = shown[timed].median().to_frame().T.assign(round="median")
    text = pd.concat([shown, medians]).to_markdown(index=False, floatfmt=".2f")
    setting = table.iloc[0]
    (args.out / "actmax_speed.md").write_text(
        "# Activation maximisation: batched against one at a time\n\n"
        f"{setting['machine']}, {setting['threads']} threads: {setting['channels']} channels of "
        f"`{setting['layer']}`, {setting['steps']} steps at {setting['size']}; ours in chunks of "
        f"{setting['chunk']}, the bound at batches of {setting['bound_batch']}.\n\n" + text + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
