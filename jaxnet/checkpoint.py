"""Orbax checkpoints of a training run, in ``<workdir>/checkpoints``.

* ``last/<step>``: the whole ``TrainState`` (step, params, optimizer state) plus a JSON ``meta``
  item (config, history, where in which epoch the run stands). Written after every epoch, and
  mid-epoch when the run is interrupted by SIGINT/SIGTERM; only the newest is kept.
* ``best/<epoch>``: the params of the epoch with the lowest validation loss, plus ``meta``.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
process killed at any moment leaves the previous checkpoint intact and never a half-written one.
Saves run in the background while training goes on; ``close()`` waits for them.

Multi-process runs (``jax.distributed``): every process makes the same calls (orbax
synchronises inside ``save``/``restore``, writes each replicated array once and the metadata from
the primary process); ``restore_last`` with a target whose leaves carry shardings (e.g.
``jaxnet.parallel.abstract_like``) gives every process the state on its devices. ``clear`` removes
the folder from the primary process only and waits for every process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax

from jaxnet.errors import JaxnetError

__all__ = ["FORMAT", "CheckpointError", "Checkpoints"]

FORMAT = "jaxnet-train/1"
"""Written into every checkpoint's ``meta``; anything else is a foreign checkpoint."""

PathLike = str | os.PathLike


class CheckpointError(JaxnetError, RuntimeError):
    """A checkpoint folder that is missing, foreign, corrupt or from an incompatible run."""


def _orbax() -> Any:
    """``orbax.checkpoint``, imported on first use (it is slow to import; ``import jaxnet`` is not).

    orbax logs every save/restore through absl; keep the training output clean.
    """
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.ERROR)
    return ocp


def _abstract(tree: Any) -> Any:
    """Restore targets (``jax.ShapeDtypeStruct``) for the arrays of ``tree`` (arrays, structs
    or orbax's array metadata): a leaf's own ``jax.sharding.Sharding`` where it has one, else
    this process' first device. Never the sharding recorded in the checkpoint: a checkpoint
    written on another set of devices (8 devices, 2 processes) must still restore here."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x: Any) -> Any:
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, jax.sharding.Sharding):
            sharding = device
        return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


class Checkpoints:
    """The ``last`` and ``best`` checkpoints under ``directory`` (``<workdir>/checkpoints``)."""

    def __init__(self, directory: PathLike) -> None:
        self.directory = Path(directory).absolute()
        self._managers: dict[str, Any] = {}

    # -- managers ----------------------------------------------------------------------------

    def _manager(self, name: str) -> Any:
        ocp = _orbax()
        if name not in self._managers:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=1,
                enable_async_checkpointing=True,
                create=True,
                cleanup_tmp_directories=True,
            )
            self._managers[name] = ocp.CheckpointManager(self.directory / name, options=options)
        return self._managers[name]

    def close(self) -> None:
        for m in self._managers.values():
            m.close()
        self._managers.clear()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries -----------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether anything is in the folder (a jaxnet checkpoint or not)."""
        return self.directory.is_dir() and any(self.directory.iterdir())

    def never_completed(self) -> bool:
        """Only jaxnet's own folders, and no complete ``last`` checkpoint in them: the run was
        stopped before its first epoch's checkpoint was finished (orbax leaves temporaries)."""
        if not self.directory.is_dir():
            return True
        entries = list(self.directory.iterdir())
        last = self.directory / "last"
        return all(p.name in ("last", "best") and p.is_dir() for p in entries) and not (
            last.is_dir() and any(p.name.isdigit() for p in last.iterdir())
        )

    def _latest(self, name: str) -> int:
        if not self.directory.is_dir():
            raise CheckpointError(
                f"no checkpoints at {self.directory}; train first (jaxnet train)."
            )
        sub = self.directory / name
        steps = self._manager(name).all_steps() if sub.is_dir() else []
        if not steps:
            found = sorted(p.name for p in self.directory.iterdir())
            raise CheckpointError(
                f"{self.directory} is not a jaxnet checkpoint folder: no complete '{name}' "
                f"checkpoint in it (found {found or 'nothing'}). Point --workdir at a folder "
                "written by `jaxnet train`, or start afresh with --overwrite."
            )
        return max(steps)

    def _restore(self, name: str, step: int, **items: Any) -> dict[str, Any]:
        ocp = _orbax()
        try:
            return self._manager(name).restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many kinds; all mean "cannot use this folder"
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot read checkpoint {self.directory / name / str(step)}: it is corrupt or "
                f"was not written by this version of jaxnet ({type(e).__name__}: {msg[:300]}). "
                "Delete it or start afresh with --overwrite."
            ) from e

    def read_meta(self, name: str = "last") -> tuple[int, dict[str, Any]]:
        """``(step, meta)`` of the newest ``name`` checkpoint, checking it is a jaxnet one."""
        step = self._latest(name)
        meta = self._restore(name, step, meta=_orbax().args.JsonRestore())["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            fmt = meta.get("format") if isinstance(meta, dict) else None
            raise CheckpointError(
                f"{self.directory / name / str(step)} is not a jaxnet training checkpoint "
                f"(format {fmt!r}, expected {FORMAT!r})."
            )
        return step, meta

    # -- save / restore ----------------------------------------------------------------------

    def _save(self, name: str, step: int, tree: Any, meta: dict[str, Any]) -> None:
        ocp = _orbax()
        manager = self._manager(name)
        if jax.process_count() > 1:
            # orbax's background finalisation synchronises the processes at barriers whose
            # names are not unique per manager: two managers finalising at once collide
            # ("Barrier ... is already ongoing"). One manager saves at a time.
            for other in self._managers.values():
                if other is not manager:
                    other.wait_until_finished()
        if step in manager.all_steps():
            # A resumed run re-saving what an interrupted one already wrote (same bits).
            manager.delete(step)
        # Saved in the background (orbax copies the arrays first); the caller keeps changing
        # its history, so the meta is frozen into a copy now.
        frozen = json.loads(json.dumps({"format": FORMAT, **meta}))
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(frozen)
            ),
        )

    def save_last(self, step: int, state_dict: Any, meta: dict[str, Any]) -> None:
        """Save the full training state (``flax.serialization.to_state_dict(state)``)."""
        self._save("last", step, state_dict, meta)

    def save_best(self, epoch: int, params: Any, meta: dict[str, Any]) -> None:
        """Save the params of the best epoch so far."""
        self._save("best", epoch, {"params": params}, meta)

    def restore_last(self, target: Any) -> tuple[Any, dict[str, Any]]:
        """The newest full state (shaped like ``target``) and its meta.

        ``target``'s leaves may be arrays or ``jax.ShapeDtypeStruct``s; their shardings, when
        they have any (``jaxnet.parallel.abstract_like(tree, mesh)``: replicated over a mesh),
        are where the restored arrays go, in every process."""
        ocp = _orbax()
        step, meta = self.read_meta("last")
        abstract = _abstract(target)
        state = self._restore("last", step, state=ocp.args.StandardRestore(abstract))["state"]
        return state, meta

    def restore_params(self, target: Any, which: str = "best") -> tuple[Any, dict[str, Any]]:
        """``(params, meta)`` of the ``best`` or ``last`` checkpoint; params shaped like
        ``target``."""
        if which not in ("best", "last"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}.")
        ocp = _orbax()
        step, meta = self.read_meta(which)
        if which == "best":
            abstract = {"params": _abstract(target)}
            return self._restore(which, step, state=ocp.args.StandardRestore(abstract))["state"][
                "params"
            ], meta
        # The last checkpoint's params, read without knowing the optimizer's state layout: the
        # target is the saved tree's own metadata.
        path = self.directory / which / str(step) / "state"
        try:
            saved = ocp.StandardCheckpointHandler().metadata(path).tree
        except Exception as e:  # as in _restore: anything here means an unusable folder
            raise CheckpointError(
                f"cannot read checkpoint {path}: it is corrupt or was not written by this "
                f"version of jaxnet ({type(e).__name__}). Delete it or start afresh with "
                "--overwrite."
            ) from e
        abstract = _abstract(saved)
        restored = self._restore(which, step, state=ocp.args.StandardRestore(abstract))["state"]
        params = restored["params"]
        shapes = jax.tree.map(lambda a: a.shape, params)
        want = jax.tree.map(lambda a: a.shape, target)
        if shapes != want:
            raise CheckpointError(f"{self.directory / which} holds params of other shapes.")
        return params, meta

    def clear(self) -> None:
        """Remove every checkpoint (``--overwrite``)."""
        self.close()
        if jax.process_index() == 0 and self.directory.exists():
            shutil.rmtree(self.directory)
        if jax.process_count() > 1:
            # No process may create its managers again before the folder is gone.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxnet-clear:{self.directory}")
