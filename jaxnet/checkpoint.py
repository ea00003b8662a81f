"""Orbax checkpoints of a training run, in ``<workdir>/checkpoints``.

* ``last/<step>``: the whole ``TrainState`` (step, params, optimizer state) plus a JSON ``meta``
  item (config, history, where in which epoch the run stands). Written after every epoch, and
  mid-epoch when the run is interrupted by SIGINT/SIGTERM; only the newest is kept.
* ``best/<epoch>``: the params of the epoch with the lowest validation loss, plus ``meta``.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a
process killed at any moment leaves the previous checkpoint intact and never a half-written one.
Saves run in the background while training goes on; ``close()`` waits for them. The ``meta``
holds a CRC-32 of every array saved with it (``checksums``), checked on every restore: a
checkpoint whose bytes changed on disk is refused (``CheckpointError``), never used.

``Checkpoints(directory, read_only=True)`` is what readers (``export``, ``features``) use:
it never creates, deletes or cleans up anything, so it can read the checkpoints of a run that
is still saving; a checkpoint that the run replaces while it is being read is read again from
the newest one.

Multi-process runs (``jax.distributed``): every process makes the same calls (orbax
synchronises inside ``save``/``restore``, writes each replicated array once and the metadata from
the primary process); ``restore_last`` with a target whose leaves carry shardings (e.g.
``jaxnet.parallel.abstract_like``) gives every process the state on its devices. ``clear`` removes
the folders from the primary process only and waits for every process.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sys
import traceback
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxnet.errors import EXIT_RUN_FAILED, JaxnetError

__all__ = [
    "FORMAT",
    "CheckpointError",
    "CheckpointWriteError",
    "Checkpoints",
    "checksums",
]

FORMAT = "jaxnet-train/2"
"""Written into every checkpoint's ``meta``; anything not in ``READABLE`` is foreign."""
READABLE = {"jaxnet-train/1": False, FORMAT: True}
"""The formats this version reads, and whether their ``meta`` must hold ``checksums`` (format 1
predates them: its checkpoints are read unchecked)."""

PathLike = str | os.PathLike

_OURS = re.compile(r"^\d+(\.orbax-checkpoint-tmp.*)?$")
"""The entries orbax writes in ``last/`` and ``best/``: steps and their temporary folders."""

_FIXES = {
    errno.ENOSPC: "no space left on device; free space and run again with --resume",
    errno.EDQUOT: "disk quota exceeded; free space and run again with --resume",
    errno.EROFS: "the file system is read-only; make it writable and run again with --resume",
    errno.EACCES: "permission denied; make the workdir writable and run again with --resume",
    errno.EPERM: "permission denied; make the workdir writable and run again with --resume",
}


class CheckpointError(JaxnetError, RuntimeError):
    """A checkpoint folder that is missing, foreign, corrupt or from an incompatible run."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a read-only mount): the run failed; the
    message names the last good checkpoint, which is intact."""

    exit_code = EXIT_RUN_FAILED


def _orbax() -> Any:
    """``orbax.checkpoint``, imported on first use (it is slow to import; ``import jaxnet`` is not).

    orbax logs every save/restore through absl, and a failed background save as an ERROR
    with its traceback; keep the output clean: jaxnet raises every failure as one message.
    """
    import orbax.checkpoint as ocp

    logging.getLogger("absl").setLevel(logging.CRITICAL)
    return ocp


# orbax's message for an array read that did not finish (orbax/checkpoint serialization.py).
_ABANDONED_READ = "Encountered error while reading array index"


def _late_callback(value: BaseException, tb: Any) -> bool:
    """Whether an error is an echo of a failure jaxnet reports itself, printed late through
    ``sys.excepthook``/``sys.unraisablehook``. Two kinds:

    * a tensorstore write that ended after orbax closed the asyncio loop awaiting it: after a
      failed save (a full disk), the writes still in flight fail too, and their completion
      callbacks find the loop closed;
    * an array read of a restore that failed (a live run replaced the step a reader was
      reading): orbax closes the restore's other reads unfinished (``GeneratorExit``) and each
      raises as its coroutine is collected. jaxnet reads the newer step, or reports the error.
    """
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        frames = [f.f_code.co_name for f, _ in traceback.walk_tb(tb)]
        return "call_soon_threadsafe" in frames
    return str(value).startswith(_ABANDONED_READ) and isinstance(value.__cause__, GeneratorExit)


def _quiet_late_callbacks() -> None:
    """Keep those echoes (tensorstore prints them, one traceback each, through
    ``sys.excepthook`` or ``sys.unraisablehook``) off the user's terminal; every other error
    reaches the hook installed before."""
    if getattr(sys.excepthook, "_jaxnet_quiet", False):
        return
    previous, previous_unraisable = sys.excepthook, sys.unraisablehook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not _late_callback(value, tb):
            previous(kind, value, tb)

    def unraisable_hook(unraisable: Any) -> None:
        if not _late_callback(unraisable.exc_value, unraisable.exc_traceback):
            previous_unraisable(unraisable)

    hook._jaxnet_quiet = True  # type: ignore[attr-defined]
    sys.excepthook, sys.unraisablehook = hook, unraisable_hook


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


def _host(x: Any) -> np.ndarray:
    """This process' copy of a leaf as a C-contiguous numpy array (a replicated array that
    spans processes: its first local shard, which holds all of it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.ascontiguousarray(np.asarray(x))


_CHUNK = 1 << 22
"""Bytes per CRC-32 job: big arrays (fc1's kernel, 25 MB) are summed in parallel chunks."""


def _crc32s(chunks: list[memoryview]) -> list[int]:
    """The CRC-32 of each chunk, over the cores (``zlib`` releases the GIL while it sums)."""
    workers = min(len(chunks), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [zlib.crc32(c) for c in chunks]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(zlib.crc32, chunks))


def checksums(tree: Any) -> dict[str, str]:
    """``{path: checksum}`` of every array leaf of ``tree`` (path: ``jax.tree_util.keystr``).

    A leaf's checksum (8 hex digits) is the CRC-32 of its dtype and shape followed by the
    CRC-32s of its bytes in 4 MiB chunks: equal arrays give equal sums on every machine of the
    same byte order, and any changed byte changes its chunk's CRC."""
    leaves = [
        (jax.tree_util.keystr(path), _host(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]
    spans, chunks = [], []
    for _, a in leaves:
        data = memoryview(a.reshape(-1).view(np.uint8))
        first = len(chunks)
        chunks += [data[i : i + _CHUNK] for i in range(0, len(data), _CHUNK)]
        spans.append((first, len(chunks)))
    crcs = _crc32s(chunks)
    sums = {}
    for (key, a), (lo, hi) in zip(leaves, spans, strict=True):
        head = f"{a.dtype.str}{a.shape}".encode() + np.asarray(crcs[lo:hi], ">u4").tobytes()
        sums[key] = f"{zlib.crc32(head):08x}"
    return sums


def _os_error(e: BaseException) -> int | None:
    """The errno of the ``OSError`` behind ``e`` (orbax and tensorstore wrap them, the latter
    as text), or None."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    for code in _FIXES:
        if os.strerror(code) in text:
            return code
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


class Checkpoints:
    """The ``last`` and ``best`` checkpoints under ``directory`` (``<workdir>/checkpoints``).

    ``read_only``: open them for reading only (``export``, ``features``): nothing is created,
    cleaned up or deleted, and saving is refused.
    """

    def __init__(self, directory: PathLike, read_only: bool = False) -> None:
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        self._managers: dict[str, Any] = {}

    # -- managers ----------------------------------------------------------------------------

    def _options(self) -> Any:
        ocp = _orbax()
        if self.read_only:
            return ocp.CheckpointManagerOptions(
                read_only=True,
                create=False,
                cleanup_tmp_directories=False,
                max_to_keep=None,
                save_interval_steps=0,
                enable_async_checkpointing=False,
            )
        return ocp.CheckpointManagerOptions(
            max_to_keep=1,
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,
        )

    def _manager(self, name: str) -> Any:
        if name not in self._managers:
            ocp = _orbax()
            _quiet_late_callbacks()
            self._managers[name] = ocp.CheckpointManager(
                self.directory / name, options=self._options()
            )
        return self._managers[name]

    def _forget(self, name: str) -> None:
        """Drop ``name``'s manager (a reader's view of the steps is fixed when it is made)."""
        manager = self._managers.pop(name, None)
        if manager is not None:
            manager.close()

    def close(self) -> None:
        """Wait for the saves in flight and stop orbax's threads, for every manager (also
        when one fails); raise ``CheckpointWriteError`` when a save failed."""
        failed: BaseException | None = None
        for name, manager in list(self._managers.items()):
            try:
                manager.close()
            except Exception as e:  # a background save that failed: reported below
                failed = failed or self.write_error(self.directory / name, e)
        self._managers.clear()
        if failed is not None:
            raise failed

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except CheckpointWriteError:
            if exc is None:  # else the error already on its way out says more
                raise

    # -- queries -----------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether anything is in the folder (a jaxnet checkpoint or not)."""
        return self.directory.is_dir() and any(self.directory.iterdir())

    def steps(self, name: str) -> list[int]:
        """The complete ``name`` checkpoints on disk now (orbax's temporaries excluded)."""
        sub = self.directory / name
        if not sub.is_dir():
            return []
        return sorted(int(p.name) for p in sub.iterdir() if p.name.isdigit() and p.is_dir())

    def foreign(self) -> list[str]:
        """The entries of the folder that jaxnet did not write (relative paths)."""
        if not self.directory.is_dir():
            return []
        found = []
        for p in sorted(self.directory.iterdir()):
            if p.name not in ("last", "best") or not p.is_dir():
                found.append(p.name)
                continue
            found += [f"{p.name}/{q.name}" for q in sorted(p.iterdir()) if not _OURS.match(q.name)]
        return found

    def never_completed(self) -> bool:
        """Only jaxnet's own folders, and no complete ``last`` checkpoint in them: the run was
        stopped before its first epoch's checkpoint was finished (orbax leaves temporaries)."""
        return not self.foreign() and not self.steps("last")

    def newest(self, name: str) -> Path | None:
        """The folder of the newest complete ``name`` checkpoint, or None."""
        steps = self.steps(name)
        return self.directory / name / str(steps[-1]) if steps else None

    def _latest(self, name: str) -> int:
        if not self.directory.is_dir():
            raise CheckpointError(
                f"no checkpoints at {self.directory}; train first (jaxnet train)."
            )
        steps = self._listed_steps(name) if (self.directory / name).is_dir() else []
        if not steps:
            found = sorted(p.name for p in self.directory.iterdir())
            raise CheckpointError(
                f"{self.directory} is not a jaxnet checkpoint folder: no complete '{name}' "
                f"checkpoint in it (found {found or 'nothing'}). Point --workdir at a folder "
                "written by `jaxnet train` or `jaxnet import`."
            )
        return max(steps)

    def _listed_steps(self, name: str) -> list[int]:
        """The steps orbax's manager for ``name`` lists. Making a manager lists the folder and
        then stats each step, so a live run deleting an old step in between makes it raise
        ``FileNotFoundError``: that is a newer view to take, not a broken folder."""
        for attempt in range(4):
            try:
                return list(self._manager(name).all_steps())
            except FileNotFoundError as e:
                self._forget(name)
                if attempt == 3:
                    raise CheckpointError(
                        f"{self.directory / name} kept changing while it was read ({e}); "
                        "read it again once the run writing it has saved."
                    ) from e
        raise AssertionError("unreachable")

    def _restore(self, name: str, step: int, **items: Any) -> dict[str, Any]:
        ocp = _orbax()
        try:
            return self._manager(name).restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises many kinds; all mean "cannot use this folder"
            raise _Unreadable(self.directory / name / str(step), e) from e

    def _read(self, name: str, read: Callable[[int], Any]) -> Any:
        """``read(step)`` of the newest ``name`` checkpoint. A reader racing a live run may see
        the step it picked replaced (deleted) by a newer one: then it reads the newer one."""
        for attempt in range(4):
            step = self._latest(name)
            try:
                return read(step)
            except _Unreadable as e:
                replaced = not (self.directory / name / str(step)).is_dir() or (
                    self.read_only and self.steps(name)[-1:] != [step]
                )
                if not replaced or attempt == 3:
                    raise e.error() from e.__cause__
                self._forget(name)
        raise AssertionError("unreachable")

    def _meta(self, name: str, step: int) -> dict[str, Any]:
        meta = self._restore(name, step, meta=_orbax().args.JsonRestore())["meta"]
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt not in READABLE or (READABLE[fmt] and "checksums" not in meta):
            raise CheckpointError(
                f"{self.directory / name / str(step)} is not a jaxnet training checkpoint "
                f"(format {fmt!r}, expected {FORMAT!r}); point --workdir at a run of "
                "`jaxnet train` or `jaxnet import`."
            )
        return meta

    def read_meta(self, name: str = "last") -> tuple[int, dict[str, Any]]:
        """``(step, meta)`` of the newest ``name`` checkpoint, checking it is a jaxnet one."""
        return self._read(name, lambda step: (step, self._meta(name, step)))

    def _verify(self, name: str, step: int, tree: Any, meta: dict[str, Any]) -> None:
        """Raise ``CheckpointError`` when ``tree``'s arrays differ from the checksums saved
        with them (a format-1 checkpoint has none)."""
        want = meta.get("checksums")
        if want is None:
            return
        got = checksums(tree)
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if bad:
            raise CheckpointError(
                f"checkpoint {self.directory / name / str(step)} is corrupt: {len(bad)} of "
                f"{len(want)} arrays differ from the checksums saved with them (first: "
                f"{bad[0]}). Nothing was changed. Restore the folder from a backup, or train "
                "afresh in another --workdir (or with --overwrite, which deletes it)."
            )

    # -- save / restore ----------------------------------------------------------------------

    def write_error(self, what: Path, e: BaseException) -> CheckpointWriteError:
        """The error for a file or checkpoint ``what`` of the run that could not be written
        (``e``: why): the reason and its fix, and the last good checkpoint, which is intact."""
        code = _os_error(e)
        reason = _FIXES.get(code) if code is not None else None
        good = self.newest("last") or self.newest("best")
        kept = (
            f"the last good checkpoint is {good}"
            if good is not None
            else "no checkpoint had been written yet"
        )
        return CheckpointWriteError(
            f"cannot write {what}: {reason or _first_line(e)}; {kept}"
            + ("" if reason else "; fix the cause and run again with --resume")
            + "."
        )

    def _save(self, name: str, step: int, tree: Any, meta: dict[str, Any]) -> None:
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot save.")
        ocp = _orbax()
        try:
            manager = self._manager(name)
            if jax.process_count() > 1:
                # orbax's background finalisation synchronises the processes at barriers whose
                # names are not unique per manager: two managers finalising at once collide
                # ("Barrier ... is already ongoing"). One manager saves at a time.
                for other in self._managers.values():
                    if other is not manager:
                        other.wait_until_finished()
            # Saved in the background (orbax copies the arrays first); the caller keeps
            # changing its history, so the meta is frozen into a copy now.
            frozen = json.loads(
                json.dumps({"format": FORMAT, **meta, "checksums": checksums(tree)})
            )
            if step in manager.all_steps():
                # A resumed run re-saving the step an interrupted one already wrote. The same
                # arrays (the same step: the same position in the run) are kept as they are:
                # deleting them first would lose the only copy if the new write failed.
                if self._saved_checksums(name, step) == frozen["checksums"]:
                    return
                manager.delete(step)
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(frozen)
                ),
            )
        except (OSError, ValueError, RuntimeError) as e:  # a full disk, a read-only mount
            if isinstance(e, JaxnetError):
                raise
            self._settle()
            raise self.write_error(self.directory / name, e) from e

    def _saved_checksums(self, name: str, step: int) -> dict[str, str] | None:
        """The checksums in the meta of ``name/step`` on disk, or None if it has none or
        cannot be read (it is then replaced)."""
        try:
            return self._meta(name, step).get("checksums")
        except (CheckpointError, _Unreadable):
            return None

    def _settle(self) -> None:
        """Let the other saves in flight end (their own errors are not this one's), so that
        the last good checkpoint named in an error is the newest one on disk."""
        for manager in self._managers.values():
            try:
                manager.wait_until_finished()
            except Exception:  # reported by the error being raised
                pass

    def save_last(self, step: int, state_dict: Any, meta: dict[str, Any]) -> None:
        """Save the full training state (``flax.serialization.to_state_dict(state)``)."""
        self._save("last", step, state_dict, meta)

    def save_best(self, epoch: int, params: Any, meta: dict[str, Any]) -> None:
        """Save the params of the best epoch so far."""
        self._save("best", epoch, {"params": params}, meta)

    def wait(self) -> None:
        """Wait until every save in flight is on disk (``CheckpointWriteError`` if one failed)."""
        for name, manager in self._managers.items():
            try:
                manager.wait_until_finished()
            except Exception as e:
                raise self.write_error(self.directory / name, e) from e

    def _restore_state(self, name: str, step: int, abstract: Any) -> tuple[Any, dict[str, Any]]:
        """The whole saved tree of ``name/step`` (restored into ``abstract``) and its meta,
        verified against the meta's checksums."""
        ocp = _orbax()
        meta = self._meta(name, step)
        state = self._restore(name, step, state=ocp.args.StandardRestore(abstract))["state"]
        self._verify(name, step, state, meta)
        return state, meta

    def restore_last(self, target: Any) -> tuple[Any, dict[str, Any]]:
        """The newest full state (shaped like ``target``) and its meta.

        ``target``'s leaves may be arrays or ``jax.ShapeDtypeStruct``s; their shardings, when
        they have any (``jaxnet.parallel.abstract_like(tree, mesh)``: replicated over a mesh),
        are where the restored arrays go, in every process."""
        abstract = _abstract(target)
        return self._read("last", lambda step: self._restore_state("last", step, abstract))

    def _saved_tree(self, name: str, step: int) -> Any:
        """Restore targets for the tree saved in ``name/step``, read off its own metadata."""
        path = self.directory / name / str(step) / "state"
        try:
            return _abstract(_orbax().StandardCheckpointHandler().metadata(path).tree)
        except Exception as e:  # as in _restore: anything here means an unusable folder
            raise _Unreadable(path.parent, e) from e

    def restore_params(self, target: Any, which: str = "best") -> tuple[Any, dict[str, Any]]:
        """``(params, meta)`` of the ``best`` or ``last`` checkpoint; params shaped like
        ``target``. The last checkpoint's params are read without knowing the optimizer's
        state layout (the restore target is the saved tree's own metadata)."""
        if which not in ("best", "last"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}.")

        def read(step: int) -> tuple[Any, dict[str, Any]]:
            saved = self._saved_tree(which, step)
            shapes = jax.tree.map(lambda a: a.shape, saved.get("params"))
            if shapes != jax.tree.map(lambda a: a.shape, target):
                raise CheckpointError(
                    f"{self.directory / which / str(step)} holds params of other shapes than "
                    "its config's Net (another --num-classes?)."
                )
            state, meta = self._restore_state(which, step, saved)
            return state["params"], meta

        return self._read(which, read)

    def clear(self) -> None:
        """Remove every jaxnet checkpoint (``--overwrite``); refuse a folder holding anything
        jaxnet did not write, naming it (nothing is deleted then)."""
        foreign = self.foreign()
        if foreign:
            raise CheckpointError(
                f"{self.directory} holds {', '.join(foreign[:5])}, which jaxnet did not write; "
                "--overwrite deletes only jaxnet's own checkpoints. Move those out of it, or "
                "choose another --workdir."
            )
        self.close()
        if jax.process_index() == 0:
            for name in ("last", "best"):
                if (self.directory / name).exists():
                    shutil.rmtree(self.directory / name)
        if jax.process_count() > 1:
            # No process may create its managers again before the folder is gone.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxnet-clear:{self.directory}")


class _Unreadable(Exception):
    """orbax could not read ``path`` (corrupt, foreign, or deleted by a live run meanwhile)."""

    def __init__(self, path: Path, cause: BaseException) -> None:
        super().__init__(str(path))
        self.path, self.cause = path, cause

    def error(self) -> CheckpointError:
        return CheckpointError(
            f"cannot read checkpoint {self.path}: it is corrupt or was not written by this "
            f"version of jaxnet ({type(self.cause).__name__}: {_first_line(self.cause)}). "
            "Nothing was changed; restore it from a backup, or train afresh in another "
            "--workdir."
        )
