"""Exports that describe themselves: what a trained ``Net`` needs besides its weights.

A weight file alone does not say how to use it. ``ModelInfo`` holds the rest: the number of
classes and the rule that made them, the input normalisation ``(x - mean) / std`` of pixels
scaled to [0, 1], the input layout and the jaxnet version. It travels:

* in ``.safetensors`` files, as the header's string metadata (``safe_open(p, "np").metadata()``);
* in ``.pt`` files, in the state_dict's ``_metadata`` attribute, under ``_metadata[""]["jaxnet"]``.
  ``_metadata`` is where ``nn.Module.state_dict()`` keeps each module's version, and
  ``load_state_dict`` hands the root entry to the root module, which ignores keys it does not
  know: the file still loads with plain
  ``TorchNet().load_state_dict(torch.load(p, weights_only=True))``, strictly;
* next to a StableHLO export (``jax.export``), as ``<file>.json``.

``jaxnet import``, ``predict`` and ``features`` read it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnet import data
from jaxnet.config import TrainConfig, load_dataset
from jaxnet.convert import WeightFileError, params_from_torch, params_to_torch
from jaxnet.errors import ConfigError
from jaxnet.images import IMAGE_SIZE, IN_CHANNELS
from jaxnet.io import atomic_write
from jaxnet.model import Net
from jaxnet.workdir import import_params, load_params

__all__ = [
    "LAYOUT_JAX",
    "LAYOUT_TORCH",
    "ModelInfo",
    "export_stablehlo",
    "import_weights",
    "jaxnet_version",
    "load_stablehlo",
    "model_info",
    "read_weights",
    "run_info",
    "save_weights",
    "stablehlo_inference",
]

LAYOUT_TORCH = "NCHW (N, 1, 32, 32) float32"
"""The input of the tutorial's PyTorch ``Net`` (``TorchNet``), which the weight files are for."""
LAYOUT_JAX = "NHWC (N, 32, 32, 1) float32"
"""The input of ``jaxnet.Net`` and of the StableHLO export."""
PIXELS = "one grey channel, 32x32, scaled to [0, 1] (uint8 / 255), then (x - mean) / std"

_TORCH_KEY = "jaxnet"  # the entry of _metadata[""] that holds ModelInfo in a .pt file


def jaxnet_version() -> str:
    """The installed jaxnet's version (``pyproject.toml`` is the one place that sets it)."""
    try:
        return version("jaxnet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


@dataclass(frozen=True)
class ModelInfo:
    """What a trained ``Net`` needs besides its weights.

    num_classes: the size of the output (logits ``(N, num_classes)``).
    label_rule: how the classes were made: ``"parity"``, ``"low-high"`` (digit data, 2 classes),
      ``"digit"`` (10 classes, the digit itself) or ``"stored"`` (a ``.npz``'s own labels).
    classes: the same as a sentence, e.g. ``"class 0 = even digit, class 1 = odd digit"``.
    mean, std: the input normalisation, ``(x - mean) / std`` of pixels in [0, 1] (the
      training split's statistics).
    data: the training data's ``jaxnet train --data`` value (``"digits"``, a folder, a file).
    layout: the input layout the weights are laid out for (``LAYOUT_TORCH``, ``LAYOUT_JAX``).
    jaxnet_version: the jaxnet that wrote the file.
    """

    num_classes: int
    label_rule: str
    classes: str
    mean: float
    std: float
    data: str = "digits"
    layout: str = LAYOUT_JAX
    pixels: str = PIXELS
    jaxnet_version: str = dataclasses.field(default_factory=jaxnet_version)

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels in [0, 1] -> the network's input, exactly as ``jaxnet.data`` does it."""
        return ((np.asarray(pixels, np.float32) - self.mean) / self.std).astype(np.float32)

    def to_metadata(self) -> dict[str, str]:
        """String key/values (safetensors metadata holds strings only); floats as ``repr``,
        which reads back to the same float."""
        d = dataclasses.asdict(self)
        return {k: repr(v) if isinstance(v, float) else str(v) for k, v in d.items()}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], where: str) -> ModelInfo:
        """The inverse of ``to_metadata`` (values may also be numbers, as in a ``.pt``)."""
        kinds = {"num_classes": int, "mean": float, "std": float}
        try:
            fields = [f.name for f in dataclasses.fields(cls) if f.name in meta]
            return cls(**{k: kinds.get(k, str)(meta[k]) for k in fields})
        except (KeyError, ValueError, TypeError) as e:
            raise WeightFileError(
                f"{where}: its jaxnet metadata is incomplete or damaged ({e!r}); re-export it "
                "with jaxnet export, or pass --mean and --std (and the classes) yourself."
            ) from None


def _rule(config: TrainConfig) -> tuple[str, str]:
    """``(label_rule, classes sentence)`` of the data a run was trained on."""
    source = config.data or "digits"
    digit_data = source == "digits" or Path(source).is_dir() or not source.endswith(".npz")
    if not digit_data:
        return "stored", f"the labels y of {source}, 0..{config.num_classes - 1}"
    if config.num_classes == 10:
        return "digit", "class = the digit 0-9"
    return config.label_rule, data.LABEL_RULES[config.label_rule]


def model_info(config: TrainConfig, data_meta: Mapping[str, Any]) -> ModelInfo:
    """The ``ModelInfo`` of a run: its config and the ``data`` entry of its checkpoint meta."""
    rule, classes = _rule(config)
    return ModelInfo(
        num_classes=int(config.num_classes),
        label_rule=rule,
        classes=classes,
        mean=float(data_meta["mean"]),
        std=float(data_meta["std"]),
        data=str(config.data),
    )


def run_info(workdir: str | os.PathLike, which: str = "best") -> tuple[Any, ModelInfo]:
    """``(params, ModelInfo)`` of the run in ``workdir`` (``which``: ``"best"`` or ``"last"``).

    A workdir imported from a weight file without metadata has no normalisation recorded; it is
    then recomputed from the run's data (what training would have used).
    """
    params, config, meta = load_params(workdir, which)
    data_meta = meta.get("data")
    if not data_meta:
        ds = load_dataset(config)
        data_meta = {"mean": ds.mean, "std": ds.std}
    return params, model_info(config, data_meta)


# --- weight files ----------------------------------------------------------------------------


def save_weights(params: Any, path: str | os.PathLike, info: ModelInfo) -> Path:
    """Write ``params`` as the PyTorch ``TorchNet`` state_dict (``.pt``/``.pth`` or
    ``.safetensors``, atomically), with ``info`` (layout ``LAYOUT_TORCH``) as its metadata."""
    path = Path(path)
    arrays = params_to_torch(params, as_numpy=True)
    meta = dataclasses.replace(info, layout=LAYOUT_TORCH)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import save_file

        strings = {"format": "pt", **meta.to_metadata()}
        atomic_write(path, lambda tmp: save_file(dict(arrays), tmp, metadata=strings))
    elif suffix in (".pt", ".pth"):
        import torch

        state = OrderedDict((k, torch.from_numpy(a)) for k, a in arrays.items())
        # The module versions state_dict() records, plus ours on the root module's entry.
        versions: dict[str, dict[str, Any]] = {
            layer: {"version": 1} for layer in ("conv1", "conv2", "fc1", "fc2", "fc3")
        }
        state._metadata = OrderedDict(  # type: ignore[attr-defined]
            [("", {"version": 1, _TORCH_KEY: dataclasses.asdict(meta)}), *versions.items()]
        )
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    else:
        raise WeightFileError(
            f"{path}: unknown weight file type {suffix!r}; use .pt, .pth or .safetensors."
        )
    return path


def _file_metadata(path: Path) -> Mapping[str, Any] | None:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        return meta if "num_classes" in meta else None
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    root = (getattr(obj, "_metadata", None) or {}).get("", {})
    meta = root.get(_TORCH_KEY) if isinstance(root, Mapping) else None
    return meta if isinstance(meta, Mapping) else None


def read_weights(path: str | os.PathLike) -> tuple[Any, ModelInfo | None]:
    """``(params, ModelInfo or None)`` of a ``.pt``/``.safetensors`` state_dict; ``None`` when
    the file carries no jaxnet metadata (a plain ``torch.save(net.state_dict(), p)``)."""
    params = params_from_torch(path)  # every check of the weights themselves
    info_meta = _file_metadata(Path(path))
    if info_meta is None:
        return params, None
    info = ModelInfo.from_metadata(info_meta, str(path))
    found = int(params["fc3"]["bias"].shape[0])
    if info.num_classes != found:
        raise WeightFileError(
            f"{path}: its metadata says {info.num_classes} classes but fc3 has {found} outputs; "
            "the file was edited after export. Re-export it with jaxnet export."
        )
    return params, info


def import_weights(
    weights: str | os.PathLike,
    workdir: str | os.PathLike,
    data_source: str | None = None,
    overwrite: bool = False,
) -> ModelInfo | None:
    """Read a weight file into ``workdir``'s ``best`` checkpoint with what its metadata says
    (classes, label rule, normalisation); ``data_source`` overrides the data it names."""
    params, info = read_weights(weights)
    num_classes = int(params["fc3"]["bias"].shape[0])
    fields: dict[str, Any] = {"num_classes": num_classes}
    if info is not None:
        fields["data"] = info.data
        if info.label_rule in data.LABEL_RULES:
            fields["label_rule"] = info.label_rule
    if data_source is not None:
        fields["data"] = data_source
    elif "data" in fields:
        try:
            data.check_source(fields["data"])
        except data.DataError:
            raise ConfigError(
                f"{weights} was trained on {fields['data']}, which is not here; pass --data "
                "with where that data is (or 'digits')."
            ) from None
    config = TrainConfig(**fields)
    data_meta = None
    if info is not None:
        data_meta = {"mean": info.mean, "std": info.std, "num_classes": num_classes}
    import_params(weights, workdir, config, overwrite, data_meta=data_meta)
    return info


# --- StableHLO ---------------------------------------------------------------------------------


def stablehlo_inference(
    params: Any, num_classes: int, platforms: tuple[str, ...] = ("cpu",)
) -> Any:
    """``jax.export`` of ``Net``'s logits with ``params`` as constants: a
    ``jax.export.Exported`` taking normalised NHWC images ``(n, 32, 32, 1)`` float32 with a
    symbolic batch ``n``, returning the logits ``(n, num_classes)``."""
    net = Net(num_classes=num_classes)
    frozen = jax.tree.map(jnp.asarray, params)

    def logits(images: jax.Array) -> jax.Array:
        return net.apply({"params": frozen}, images)

    (batch,) = jax.export.symbolic_shape("n")
    spec = jax.ShapeDtypeStruct((batch, IMAGE_SIZE, IMAGE_SIZE, IN_CHANNELS), jnp.float32)
    try:
        return jax.export.export(jax.jit(logits), platforms=platforms)(spec)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(f"cannot export for the platforms {platforms}: {e}") from None


def export_stablehlo(
    params: Any,
    info: ModelInfo,
    path: str | os.PathLike,
    platforms: tuple[str, ...] = ("cpu",),
) -> Path:
    """Write ``stablehlo_inference`` serialized (``Exported.serialize``), atomically.

    Load it with ``jax.export.deserialize(path.read_bytes()).call(x)``: no jaxnet needed.
    ``<path>.json`` holds ``info`` (layout ``LAYOUT_JAX``: the normalisation, the classes).
    """
    path = Path(path)
    exported = stablehlo_inference(params, info.num_classes, platforms)
    blob = exported.serialize()  # a flatbuffer (the flatbuffers package, a dependency)
    sidecar = {**dataclasses.asdict(dataclasses.replace(info, layout=LAYOUT_JAX))}
    sidecar["platforms"] = list(platforms)
    text = json.dumps(sidecar, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(blob))
    atomic_write(_sidecar(path), lambda tmp: Path(tmp).write_text(text))
    return path


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def load_stablehlo(path: str | os.PathLike) -> tuple[Any, ModelInfo]:
    """``(jax.export.Exported, ModelInfo)`` of a file ``export_stablehlo`` wrote."""
    path = Path(path)
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    meta = json.loads(_sidecar(path).read_text())
    return exported, ModelInfo.from_metadata(meta, str(path))
