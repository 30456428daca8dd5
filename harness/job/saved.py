"""`phase=evaluate`: the maps an earlier sweep saved (`save_maps=true`) for this job, found by the
job's explain key (`harness.config.explain_key`), and put back on the job's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from harness.config import HarnessError, JobSettings, explain_key, weights_sha256
from harness.data import Images
from harness.results import complete_jobs, read_maps


@dataclass
class SavedMaps:
    """The job of an earlier sweep whose maps this job scores.

    Attributes:
        folder: its folder.
        row: its results row (the method's fields come from it).
        arrays: its `attributions.npz`.
    """

    folder: Path
    row: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def on(self, data: Images, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The maps and their targets on `device`, and the source row's method fields; the saved
        maps must be of the job's images.
        """
        ids = [str(i) for i in self.arrays["ids"]]
        if ids != list(data.ids):
            raise HarnessError(
                f"{self.folder} saved maps of images {ids}; this job's data has {list(data.ids)}"
            )
        maps = torch.from_numpy(self.arrays["maps"]).to(device)
        target = torch.from_numpy(self.arrays["target"]).to(device)
        fields = {k: v for k, v in self.row.items() if k.startswith("method") and k != "method"}
        return maps, target, fields


@cache
def _complete_jobs(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The finished sweep's complete jobs, read once per process: the jobs of an evaluate sweep that
    share a process (basic and joblib launchers) would otherwise each read every `run.json`.
    """
    return complete_jobs(root)


def _name(node: DictConfig) -> str:
    return str(node._target_).rsplit(".", 1)[-1]


def saved_maps(cfg: DictConfig, job: JobSettings, key: str, device: torch.device) -> SavedMaps:
    """The job in `maps_from` whose maps this job (config `cfg`, explain key `key`) scores."""
    if not job.maps_from:
        raise HarnessError("phase=evaluate needs maps_from=<folder of a sweep run with save_maps=true>")
    root = Path(job.maps_from)
    if not root.is_dir():
        raise HarnessError(f"maps_from={root}: no such folder; expected the folder of an earlier sweep")
    jobs = _complete_jobs(root)
    found = [(folder, row) for folder, row in jobs if row.get("explain_key") == key]
    any_weights = explain_key(cfg, device.type, weights=False)
    other = [r for _, r in jobs if r.get("explain_key_any_weights") == any_weights]
    if not found and other:
        ours = weights_sha256(OmegaConf.to_container(cfg.model, resolve=True))
        raise HarnessError(
            f"maps_from={root} holds maps of {other[0]['model']} with weights sha256 "
            f"{other[0].get('weights_sha256')}; this job's weights ({cfg.model.get('weights')}) have sha256 "
            f"{ours}: the checkpoint changed since those maps were made; run phase=all"
        )
    if not found:
        model = cfg.model.get("arch") or _name(cfg.model)
        this = f"{model}/{_name(cfg.data)}/{_name(cfg.method)} seed {job.seed}"
        there = sorted({f"{r['model']}/{r['data']}/{r['method']} seed {r['seed']}" for _, r in jobs})
        raise HarnessError(
            f"maps_from={root} holds no maps of {this} with these method, data, device and precision "
            f"settings; it holds: {', '.join(there) or 'no complete job'}"
        )
    folder, row = found[0]
    arrays = read_maps(folder)
    if not bool(arrays["full"]):
        raise HarnessError(f"{folder} kept display maps only (save_maps=false); run it with save_maps=true")
    return SavedMaps(folder, row, arrays)
