"""A job's tables (`curves.csv`, `scores.csv`) and arrays (`attributions.npz`)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch

from harness.job.builder import Job
from harness.job.row import params
from metrics import Result, field_name

TOP_K = 5  # predictions per image in scores.csv, for the report's example browser


def tables(
    job: Job, results: dict[str, Result], target: torch.Tensor, probs: torch.Tensor
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`curves.csv` (long: metric curve, image, point, fraction, score) and `scores.csv` (per image:
    label and its name (empty where the image has none), target, its probability, the top-5 classes
    `top<k>`, `top<k>_name`, `top<k>_prob` (fewer for a model of fewer classes), every metric value).
    """
    ids = job.data.ids
    long = []
    for name, result in results.items():
        for key, c in result.curves.items():
            curve, scores, fractions = field_name(name, key), c.scores.cpu(), c.fractions.cpu()
            for i, image in enumerate(ids):
                for p in range(len(fractions)):
                    long.append((curve, image, p, float(fractions[p]), float(scores[i, p])))
    curves_df = pd.DataFrame(long, columns=["metric", "image_id", "point", "fraction", "score"])
    t, names = target.cpu(), job.classifier.class_names
    top = probs.float().cpu().topk(min(TOP_K, probs.shape[1]), dim=1)
    ranked: dict[str, list] = {}
    for k in range(top.indices.shape[1]):
        classes = top.indices[:, k].tolist()
        ranked |= {
            f"top{k + 1}": classes,
            f"top{k + 1}_name": [names[c] for c in classes],
            f"top{k + 1}_prob": top.values[:, k].tolist(),
        }
    labels = job.data.labels.tolist()
    values = {
        field_name(name, key): v.float().cpu().tolist()
        for name, r in results.items()
        for key, v in r.values.items()
    }
    scores_df = pd.DataFrame(
        {
            "image_id": ids,
            "label": labels,
            "label_name": [names[c] if 0 <= c < len(names) else "" if c < 0 else str(c) for c in labels],
            "target": t.tolist(),
            "target_name": [names[i] for i in t.tolist()],
            "target_prob": probs.cpu().gather(1, t[:, None])[:, 0].tolist(),
            **ranked,
            **values,
        }
    )
    return curves_df, scores_df


def maps_arrays(job: Job, maps: torch.Tensor, target: torch.Tensor, key: str) -> dict[str, np.ndarray]:
    """What `attributions.npz` holds: the maps as the method returned them (`[B, 1 or C, H, W]`,
    float32) when the job's `save_maps` is set, else summed over channels in float16 for display
    only; the image ids, labels, targets and their names; the images as displayed (uint8); the
    method and its settings; the ground truth's masks and boxes (`truth_mask`, `truth_box`,
    `[N, H, W]` bool) where the data has it.
    """
    mean = torch.tensor(job.classifier.mean)[:, None, None]
    std = torch.tensor(job.classifier.std)[:, None, None]
    full = job.settings.job.save_maps
    pixels = (job.data.images * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    kept = maps.float() if full else maps.sum(dim=1, keepdim=True).half()
    truth = job.data.ground_truth
    known = (
        {}
        if truth is None
        else {"truth_mask": truth.mask.cpu().numpy(), "truth_box": truth.box.cpu().numpy()}
    )
    return known | {
        "maps": kept.cpu().numpy(),
        "full": np.array(full),
        "ids": np.array(job.data.ids, dtype=str),
        "label": job.data.labels.cpu().numpy(),
        "target": target.cpu().numpy(),
        "target_names": np.array([job.classifier.class_names[i] for i in target.tolist()], dtype=str),
        "images": pixels.numpy(),
        "method": np.array(job.method_name),
        "method_params": np.array(json.dumps(params("method", job.method))),
        "explain_key": np.array(key),
    }
