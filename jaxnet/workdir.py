"""A training run's folder: trained params in and out of it, and whether a run can resume.

``<workdir>/checkpoints`` is ``jaxnet.checkpoint.Checkpoints``; ``metrics.jsonl`` and
``curves.png`` are written by ``jaxnet.train``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jaxnet.checkpoint import CheckpointError, Checkpoints
from jaxnet.config import RESUMABLE_CHANGES, TrainConfig, config_from_json, config_to_json
from jaxnet.convert import params_from_torch
from jaxnet.model import Net, abstract_params

__all__ = ["check_resumable", "checkpoints_of", "import_params", "load_params"]


def checkpoints_of(workdir: str | os.PathLike) -> Checkpoints:
    """The checkpoints of the run in ``workdir``."""
    return Checkpoints(Path(workdir) / "checkpoints")


def load_params(
    workdir: str | os.PathLike, which: str = "best"
) -> tuple[Any, TrainConfig, dict[str, Any]]:
    """``(params, config, meta)`` of the ``best`` (lowest val loss) or ``last`` checkpoint."""
    with checkpoints_of(workdir) as ckpts:
        _, meta = ckpts.read_meta(which)
        config = config_from_json(meta["config"])
        target = abstract_params(Net(num_classes=config.num_classes))
        params, meta = ckpts.restore_params(target, which)
    return params, config, meta


def import_params(
    weights: str | os.PathLike,
    workdir: str | os.PathLike,
    config: TrainConfig | None = None,
    overwrite: bool = False,
) -> Any:
    """Read a PyTorch ``state_dict`` (``.pt``/``.safetensors``) into ``workdir``'s ``best``
    checkpoint, for ``jaxnet export``/``features``; ``config`` names the data it belongs to."""
    params = params_from_torch(weights)
    num_classes = int(params["fc3"]["bias"].shape[0])
    config = dataclasses.replace(config or TrainConfig(), num_classes=num_classes, epochs=0)
    with checkpoints_of(workdir) as ckpts:
        if ckpts.exists():
            if not overwrite:
                raise CheckpointError(
                    f"{ckpts.directory} already holds checkpoints; pass --overwrite to replace "
                    "them or choose another --workdir."
                )
            ckpts.clear()
        ckpts.save_best(0, params, {"config": config_to_json(config), "source": str(weights)})
    return params


def check_resumable(
    meta: Mapping[str, Any], config: TrainConfig, data_meta: Mapping[str, Any]
) -> None:
    """Raise ``CheckpointError`` naming every setting (or the data) that differs between the
    run recorded in ``meta`` and ``config``; only ``RESUMABLE_CHANGES`` may differ."""
    saved = meta.get("config", {})
    now = json.loads(json.dumps(config_to_json(config)))  # as it reads back (tuples -> lists)
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
        for k in now
        if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]
    ]
    if diffs:
        raise CheckpointError(
            "cannot resume: the run in the workdir was made with other settings ("
            + "; ".join(diffs)
            + "). Use the same settings to resume (only --epochs and --early-stopping may "
            "change), or a new --workdir."
        )
    if meta.get("data") != data_meta:
        raise CheckpointError(
            "cannot resume: the data differs from the run's in the workdir "
            f"(checkpoint {meta.get('data')}, now {dict(data_meta)})."
        )
