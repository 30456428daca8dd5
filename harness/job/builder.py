"""Building a job: its model, data, method and metrics on its device, each instantiated once.

The config is never written to. What the config leaves to the job (a null `chunk_size`, a method's
`layer` and `layout`, a sanity check's `blocks`, given as `auto` or null) is chosen here and bound to
the method's and metrics' partials: the model's facts as soon as the model is built, the chunk sizes
once the calibration has chosen the model's batch sizes (`chunk_for`). The row records the values
the functions got (`harness.job.row.params`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from harness.config import CHOSEN_BY_JOB, HarnessError, Inapplicable, Settings, as_declared, check_config
from harness.data import Images, held_out, load_data
from harness.models import Classifier
from harness.runtime import (
    Calibration,
    ModelSpeed,
    Progress,
    SpeedOptions,
    Stopwatch,
    available_memory,
    calibrate,
    calibration_facts,
    resolve_device,
)
from methods import MethodTraits
from methods import traits_of as method_traits
from metrics import MetricTraits
from metrics import traits_of as metric_traits
from metrics.sanity import blocks_modules

# What a metric may need that re-runs the method.
RERUNS = {"explain", "explain_with"}


@dataclass
class Job:
    """Everything a job needs, built from its config.

    `model` is what methods and metrics call: the classifier's module, compiled when the device
    settings ask for it (`classifier.module` stays eager); `trained` is a copy of the module as loaded
    (before speed options), kept only for metrics that declare they need it. `clock` started with the
    job and collects where its time goes besides the calls (build, calibration, warm-ups, bound
    loops, profiles). `method` and `metrics` are partials holding every setting they run with;
    `references` names the images held out of the data that a method drawing baselines from the data
    got (bound to its partial), None for other methods.
    """

    settings: Settings
    device: torch.device
    options: SpeedOptions
    classifier: Classifier
    model: torch.nn.Module
    data: Images
    method_name: str
    method: Any
    method_traits: MethodTraits
    metrics: dict[str, Any]
    metric_traits: dict[str, MetricTraits]
    speed: ModelSpeed
    calibration: Calibration
    batchnorms_folded: int
    clock: Stopwatch
    progress: Progress
    trained: torch.nn.Module | None = None
    references: list[str] | None = None

    @property
    def seed(self) -> int:
        """The job's seed."""
        return self.settings.job.seed


def build(
    cfg: DictConfig,
    device: torch.device | None = None,
    calibration_dir: Path | None = None,
    clock: Stopwatch | None = None,
    settings: Settings | None = None,
) -> Job:
    """Instantiate the job's model, data, method and metrics on its device, with its speed options.

    Every setting that can be checked without the model was checked with the config
    (`harness.config.check_config`: here when `settings` is not given), so that a bad value fails
    before any model work. When `device.batch_size` (plain forwards) or `device.grad_batch_size`
    (forward+backward) is null, the candidate `device.batch_sizes` that fit the memory budget are
    timed and the chunk size is chosen, once per sweep: the first job measures and writes the figures
    to `calibration_dir` (the sweep's folder), the others read them (see `harness.runtime.calibration`).
    """
    settings = settings or check_config(cfg)
    clock = clock or Stopwatch()
    name = function_name(cfg.method)
    method = instantiate(as_declared(cfg.method))
    traits = _method_traits(method, name)
    metrics = _metric_functions(cfg)
    device = device or resolve_device(settings.device.name)
    options = SpeedOptions.from_settings(settings.device)
    options.apply_backend_flags()
    with clock("build"):
        clf: Classifier = instantiate(as_declared(cfg.model))
        data = load_data(cfg.data, clf.input_size, clf.mean, clf.std, clf.class_names)
        facts: dict[str, Any] = {"layer": clf.cam_layer, "layout": clf.cam_layout, "blocks": clf.blocks}
        facts["pixel_range"] = clf.pixel_range  # the z-box rule's box (LRP)
        if clf.tokens is not None:  # a transformer's token layout (the attention methods)
            facts["prefix_tokens"], facts["grid"] = clf.tokens[0], clf.tokens[1:]
        method, metrics = filled(method, facts), {m: filled(fn, facts) for m, fn in metrics.items()}
        references = None
        if traits.references:  # images held out of the explained ones, bound to the method
            count = int(settings_of(method)["n_references"])
            refs = held_out(cfg.data, count, clf.input_size, clf.mean, clf.std, clf.class_names)
            method, references = partial(method, references=refs.images.to(device)), refs.ids
        _check_model_and_data(metrics, traits, name, clf, data)
        _check_scores(method, traits, name, metrics, clf)
        needs = {n for fn in metrics.values() for n in metric_traits(fn).needs}
        trained = copy.deepcopy(clf.module).to(device) if "trained" in needs else None
        probe = data.images[:2].to(device)
        if traits.check_settings is not None:  # settings that must fit the images, bound ones included
            try:
                traits.check_settings(settings_of(method), probe[:1])
            except ValueError as e:
                raise HarnessError(f"method {name}: {e}") from None
        check_deterministic(clf.module.to(device), clf.name, probe)
        if traits.check_model is not None:  # what the method cannot handle, before any timed work
            try:
                traits.check_model(clf.module, probe[:1])
            except ValueError as e:
                raise Inapplicable(f"method {name} on model {clf.name}: {e}") from None
        folded = options.prepare(clf.module, probe, keep={clf.cam_layer})
        model = options.compiled(clf.module)
    speed = ModelSpeed(model, data.images, device, options.memory_format)
    with clock("calibration"), options.autocast(device):
        calibration = calibrate(
            speed, clf.module, calibration_facts(cfg.model, device, settings.device),
            pass_kinds(traits, metrics, settings.job.phase), available_memory(device), calibration_dir,
        )  # fmt: skip
    method = filled(method, {"chunk_size": chunk_for(speed, traits.forward_only)})
    metrics = {
        m: filled(fn, {"chunk_size": chunk_for(speed, forward_only=True)}) for m, fn in metrics.items()
    }
    progress = Progress(f"{name} on {clf.name}/{data.name}", settings.job.progress)
    declared = {m: metric_traits(fn) for m, fn in metrics.items()}
    return Job(
        settings, device, options, clf, model, data, name, method, traits, metrics, declared, speed,
        calibration, folded, clock, progress, trained, references,
    )  # fmt: skip


def function_name(node: DictConfig) -> str:
    """The name of the function a node's `_target_` names (the row's `method`, `model`, ...)."""
    return str(node._target_).rsplit(".", 1)[-1]


def filled(fn: Any, chosen: Mapping[str, Any]) -> Any:
    """`fn` (a partial) with each keyword that its config left to the job (null or `auto`) bound to
    the value the job chose for it; keywords it does not take, or that the config set, stay as they are.
    """
    keywords = settings_of(fn)
    fill = {
        k: v
        for k, v in chosen.items()
        if k in CHOSEN_BY_JOB and k in keywords and keywords[k] in (None, "auto")
    }
    return partial(fn, **fill) if fill else fn


def settings_of(fn: Any) -> dict[str, Any]:
    """Every keyword a partial binds, through partials of partials (Hydra's are not flattened), the
    outermost's value winning, in the order of the innermost's (the config's).
    """
    keywords: dict[str, Any] = {}
    while isinstance(fn, partial):
        keywords = {**fn.keywords, **keywords}
        fn = fn.func
    return keywords


def chunk_for(speed: ModelSpeed, forward_only: bool) -> int | None:
    """A call's chunk size: the model's batch size for plain forwards (forward-only methods, every
    metric), its forward+backward batch size for methods that backpropagate.
    """
    return speed.batch_size if forward_only else speed.grad_batch_size


def pass_kinds(traits: MethodTraits, metrics: Mapping[str, Any], phase: str) -> list[str]:
    """The kinds of model pass the job times and sizes: plain forwards always; forward+backward when
    its method backpropagates, or a metric re-runs a method that does (saved maps run no method).
    """
    runs_method = not traits.forward_only and phase != "evaluate"
    reruns = not traits.forward_only and any(RERUNS & metric_traits(fn).needs for fn in metrics.values())
    return ["forward"] + (["forward_backward"] if runs_method or reruns else [])


def _check_model_and_data(
    metrics: Mapping[str, Any], traits: MethodTraits, method: str, clf: Classifier, data: Images
) -> None:
    """What needs the model and the data but no model pass: ground truth where a metric or the
    method needs it, and the blocks a sanity check re-initialises.
    """
    for name, fn in metrics.items():
        needs = metric_traits(fn).needs
        if "ground_truth" in needs and data.ground_truth is None:
            raise HarnessError(
                f"metric {name} needs ground truth (object masks or boxes), which data {data.name} does "
                "not have; use data=shapes, or image_folder with data.boxes=<VOC folder or CSV file>"
            )
        if "trained" in needs and "blocks" in settings_of(fn):
            try:
                blocks_modules(clf.module, settings_of(fn)["blocks"])
            except ValueError as e:
                raise HarnessError(f"metric.{name}: {e} (model {clf.name})") from None
    if traits.ground_truth:
        if data.ground_truth is None:
            raise HarnessError(f"method {method} needs ground truth, which data {data.name} does not have")
        rerun = [n for n, fn in metrics.items() if RERUNS & metric_traits(fn).needs]
        if rerun:
            raise HarnessError(
                f"method {method} draws its maps from the ground truth of the job's images, so metric "
                f"{rerun[0]} cannot re-run it on other inputs or models; leave {rerun[0]} out"
            )


def _check_scores(
    method: Any, traits: MethodTraits, name: str, metrics: Mapping[str, Any], clf: Classifier
) -> None:
    """No softmax score of a model with one logit: a softmax over one class is 1 for every input,
    so every map would score alike.
    """
    if len(clf.class_names) > 1:
        return
    users = [f"method {name}"] if traits.softmax or settings_of(method).get("score") == "softmax" else []
    users += [f"metric {m}" for m, fn in metrics.items() if settings_of(fn).get("score") == "softmax"]
    if users:
        raise HarnessError(
            f"model {clf.name} returns one logit, and {users[0]} scores its softmax, which is 1 for every "
            "input; set its score=logit, or give the model two logits (one per class)"
        )


@torch.no_grad()
def check_deterministic(module: torch.nn.Module, name: str, probe: torch.Tensor) -> None:
    """The same logits for the same input twice (`probe`, on the module's device): a model whose
    dropout (or another random layer) stays on in eval mode changes every score from call to call, so
    it is refused.
    """
    first, second = module(probe).float(), module(probe).float()
    change = float((first - second).abs().max())
    if change > 1e-4 * (1.0 + float(first.abs().max())):
        raise HarnessError(
            f"model {name} gives different logits for the same input (by up to {change:.3g}): "
            "a dropout or other random layer is active in eval mode; make its forward deterministic"
        )


def _method_traits(method: Any, name: str) -> MethodTraits:
    try:
        return method_traits(method)
    except TypeError as e:
        raise HarnessError(f"method {name}: {e}") from None


def _metric_functions(cfg: DictConfig) -> dict[str, Any]:
    """The selected metrics, each instantiated once (their settings were checked with the config,
    `harness.config.check_config`), each marked as a metric.
    """
    built = {}
    for name, node in cfg.metric.items():
        built[str(name)] = fn = instantiate(as_declared(node))
        try:
            metric_traits(fn)
        except TypeError as e:
            raise HarnessError(f"metric {name}: {e}") from None
    return built
