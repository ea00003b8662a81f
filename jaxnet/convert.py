"""Everything that differs between PyTorch's and Flax's view of the same ``Net``.

This module is the one place that knows the layout facts:

* images: PyTorch is NCHW ``(N, 1, 32, 32)``, Flax is NHWC ``(N, 32, 32, 1)``;
* convolution kernels: PyTorch OIHW ``(out, in, kh, kw)``, Flax HWIO ``(kh, kw, in, out)``;
* the flatten before ``fc1``: PyTorch flattens the conv2 output in C,H,W order,
  ``jaxnet.Net`` flattens its NHWC activations in H,W,C order. Instead of transposing
  activations at every call, the rows of fc1's kernel are permuted once, here;
* ``nn.Linear`` stores ``(out, in)``; ``flax.linen.Dense`` stores its kernel ``(in, out)``.

The conversion is strict in the style of Hugging Face's PyTorch<->Flax utilities: every
missing key, unexpected key and shape mismatch is reported in one error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxnet.errors import JaxnetError
from jaxnet.images import IMAGE_SIZE, IN_CHANNELS, check_nhwc_images
from jaxnet.io import atomic_write

__all__ = [
    "IMAGE_SIZE",
    "IN_CHANNELS",
    "WeightFileError",
    "check_nhwc_images",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "params_from_torch",
    "read_state_dict",
    "to_nhwc_images",
    "params_to_torch",
    "torch_state_dict_shapes",
]

_CONV2_OUT = (16, 28, 28)  # (C, H, W) of conv2's output for a 32x32 input: VALID 3x3 twice.

PathLike = str | os.PathLike


class WeightFileError(JaxnetError, ValueError):
    """A weight file or state_dict that cannot be read as the tutorial's ``Net``."""


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _permute(x: Any, axes: tuple[int, int, int, int]) -> Any:
    if type(x).__module__.startswith("torch"):
        return x.permute(*axes).contiguous()
    if isinstance(x, np.ndarray):
        # A copy, not a view: with one channel a transposed view keeps strides that torch reads
        # as channels_last, and TorchNet's x.view(...) then fails.
        return x.transpose(axes).copy()
    return x.transpose(axes)


def nchw_to_nhwc(x: Any) -> Any:
    """PyTorch's ``(N, C, H, W)`` batch as the ``(N, H, W, C)`` batch ``jaxnet.Net`` takes.

    Takes numpy or jax arrays and torch tensors; returns the same kind, laid out contiguously.
    """
    return _permute(x, (0, 2, 3, 1))


def nhwc_to_nchw(x: Any) -> Any:
    """``jaxnet``'s ``(N, H, W, C)`` batch as the ``(N, C, H, W)`` batch PyTorch's Net takes.

    Takes numpy or jax arrays and torch tensors; returns the same kind, laid out contiguously.
    """
    return _permute(x, (0, 3, 1, 2))


def to_nhwc_images(x: np.ndarray) -> tuple[np.ndarray, str]:
    """A stack of one-channel 32x32 images as NHWC ``(N, 32, 32, 1)``, and the layout it had.

    Accepts ``(N, 32, 32)`` (``"NHW"``), ``(N, 32, 32, 1)`` (``"NHWC"``) and PyTorch's
    ``(N, 1, 32, 32)`` (``"NCHW"``); the three cannot be confused since 32 != 1. Raises
    ``ValueError`` naming the accepted shapes for anything else.
    """
    s, c = IMAGE_SIZE, IN_CHANNELS
    shape = tuple(x.shape)
    if len(shape) == 3 and shape[1:] == (s, s):
        return x[..., None], "NHW"
    if len(shape) == 4 and shape[1:] == (s, s, c):
        return x, "NHWC"
    if len(shape) == 4 and shape[1:] == (c, s, s):
        return nchw_to_nhwc(x), "NCHW"
    raise ValueError(
        f"images of shape {shape} are not one-channel 32x32 images; expected (N, 32, 32), "
        "(N, 32, 32, 1) (NHWC) or (N, 1, 32, 32) (NCHW). Resize or pad them to 32x32 first "
        "(28x28 MNIST digits: pad 2 pixels on each side)."
    )


# ---------------------------------------------------------------------------------------------
# The mapping table
# ---------------------------------------------------------------------------------------------


def _conv_to_flax(w: np.ndarray) -> np.ndarray:  # OIHW -> HWIO
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _conv_to_torch(k: np.ndarray) -> np.ndarray:  # HWIO -> OIHW
    return np.ascontiguousarray(k.transpose(3, 2, 0, 1))


def _linear_to_flax(w: np.ndarray) -> np.ndarray:  # (out, in) -> (in, out)
    return np.ascontiguousarray(w.T)


def _linear_to_torch(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T)


def _fc1_to_flax(w: np.ndarray) -> np.ndarray:
    # torch rows of the transposed kernel are indexed c*H*W + h*W + w; Net flattens (h, w, c).
    c, h, wd = _CONV2_OUT
    out = w.shape[0]
    return np.ascontiguousarray(
        w.T.reshape(c, h, wd, out).transpose(1, 2, 0, 3).reshape(c * h * wd, out)
    )


def _fc1_to_torch(k: np.ndarray) -> np.ndarray:
    c, h, wd = _CONV2_OUT
    out = k.shape[1]
    return np.ascontiguousarray(
        k.reshape(h, wd, c, out).transpose(2, 0, 1, 3).reshape(c * h * wd, out).T
    )


def _identity(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


@dataclass(frozen=True)
class _Entry:
    torch_key: str
    flax_path: tuple[str, str]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


_TABLE: tuple[_Entry, ...] = (
    _Entry("conv1.weight", ("conv1", "kernel"), _conv_to_flax, _conv_to_torch),
    _Entry("conv1.bias", ("conv1", "bias"), _identity, _identity),
    _Entry("conv2.weight", ("conv2", "kernel"), _conv_to_flax, _conv_to_torch),
    _Entry("conv2.bias", ("conv2", "bias"), _identity, _identity),
    _Entry("fc1.weight", ("fc1", "kernel"), _fc1_to_flax, _fc1_to_torch),
    _Entry("fc1.bias", ("fc1", "bias"), _identity, _identity),
    _Entry("fc2.weight", ("fc2", "kernel"), _linear_to_flax, _linear_to_torch),
    _Entry("fc2.bias", ("fc2", "bias"), _identity, _identity),
    _Entry("fc3.weight", ("fc3", "kernel"), _linear_to_flax, _linear_to_torch),
    _Entry("fc3.bias", ("fc3", "bias"), _identity, _identity),
)


def torch_state_dict_shapes(num_classes: int = 2) -> dict[str, tuple[int, ...]]:
    """The shapes of the tutorial ``Net``'s PyTorch ``state_dict``, key by key."""
    flat = int(np.prod(_CONV2_OUT))
    return {
        "conv1.weight": (6, IN_CHANNELS, 3, 3),
        "conv1.bias": (6,),
        "conv2.weight": (16, 6, 3, 3),
        "conv2.bias": (16,),
        "fc1.weight": (512, flat),
        "fc1.bias": (512,),
        "fc2.weight": (64, 512),
        "fc2.bias": (64,),
        "fc3.weight": (num_classes, 64),
        "fc3.bias": (num_classes,),
    }


def _flax_shapes(num_classes: int) -> dict[tuple[str, str], tuple[int, ...]]:
    shapes = torch_state_dict_shapes(num_classes)
    return {
        e.flax_path: tuple(e.to_flax(np.empty(shapes[e.torch_key], np.float32)).shape)
        for e in _TABLE
    }


# ---------------------------------------------------------------------------------------------
# Reading and writing files
# ---------------------------------------------------------------------------------------------


def _plain_tensor(t: Any, key: str) -> Any:
    """``t`` when it is a dense tensor holding values; ``WeightFileError`` naming the fix for
    a sparse, meta (no values) or float8 one."""
    import torch

    if t.layout != torch.strided:
        raise WeightFileError(
            f"{key!r} is a sparse tensor ({t.layout}); save it dense (t.to_dense())."
        )
    if t.is_meta:
        raise WeightFileError(
            f"{key!r} is a meta tensor: it has a shape but no values (a model built on the "
            "'meta' device); save the weights of a model that holds real values."
        )
    if t.dtype.is_floating_point and t.dtype.itemsize == 1:
        raise WeightFileError(
            f"{key!r} has dtype {t.dtype} (float8); jaxnet reads float16/bfloat16/float32/"
            "float64 weights: save them with t.float()."
        )
    return t


def _to_numpy(value: Any, key: str) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        import torch

        if not isinstance(value, torch.Tensor):
            raise WeightFileError(f"{key!r} is a {type(value).__name__}, not a tensor.")
        t = _plain_tensor(value, key).detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()  # numpy has no bfloat16; float32 holds every bfloat16 exactly
        return t.numpy()
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        a = np.asarray(value)
        if a.dtype.name == "bfloat16":  # ml_dtypes' (safetensors.numpy reads bf16 as it)
            return a.astype(np.float32)  # exact, as for a bfloat16 torch.Tensor
        if a.dtype.name.startswith("float8"):
            raise WeightFileError(
                f"{key!r} has dtype {a.dtype} (float8); jaxnet reads float16/bfloat16/float32/"
                "float64 weights: save them as float32."
            )
        return a
    raise WeightFileError(
        f"{key!r} is a {type(value).__name__}; expected a torch.Tensor or a numpy array."
    )


def _load_pt(path: Path) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dev dependency
        raise WeightFileError(
            f"Reading {path} needs PyTorch (pip install torch==2.13.0), "
            "or save the weights as .safetensors instead."
        ) from e
    try:
        # weights_only=True: the file is data; a pickle that names code is refused, not run.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightFileError(
            f"{path} is not a PyTorch state_dict file that can be loaded safely "
            f"(torch.load(..., weights_only=True) failed: {why}). "
            "Save it with torch.save(net.state_dict(), path), not the whole module."
        ) from e
    if not isinstance(obj, Mapping):
        raise WeightFileError(
            f"{path} holds a {type(obj).__name__}, not a state_dict; "
            "save it with torch.save(net.state_dict(), path)."
        )
    return obj


def _load_safetensors(path: Path) -> Mapping[str, Any]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise WeightFileError(
            f"{path} is not a readable safetensors file ({e}). "
            "Write one with jaxnet.params_to_torch(params, path) or safetensors.torch.save_file."
        ) from e


_STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "net")
"""Where checkpoint dicts keep the model's ``state_dict``: PyTorch's tutorials save
``{"epoch", "model_state_dict", "optimizer_state_dict", "loss"}``, Lightning ``state_dict``."""


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return all(hasattr(v, "shape") and not isinstance(v, Mapping) for v in obj.values())


def read_state_dict(
    path: PathLike,
) -> tuple[Mapping[str, Any], str | None, Mapping[str, Any]]:
    """``(state_dict, key, whole)`` of a weight file: a ``.safetensors`` or ``.pt``/``.pth``
    ``state_dict`` (``key`` None), or a ``.pt`` checkpoint dict whose model weights sit under
    one of ``_STATE_DICT_KEYS`` (``key`` names it; ``whole`` is the whole dict, e.g. for its
    ``optimizer_state_dict``). ``.pt`` files are read with ``weights_only=True``."""
    whole = _load(path)
    if _is_state_dict(whole):
        return whole, None, whole
    for key in _STATE_DICT_KEYS:
        inner = whole.get(key)
        if isinstance(inner, Mapping) and _is_state_dict(inner):
            return inner, key, whole
    raise WeightFileError(
        f"{path} holds a dict with keys {sorted(map(str, whole))[:8]} but no model state_dict "
        f"under any of {list(_STATE_DICT_KEYS)}; save torch.save(net.state_dict(), path), or "
        "the dict with the weights under 'model_state_dict'."
    )


def _load(path: PathLike) -> Mapping[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"No weight file at {p}.")
    suffix = p.suffix.lower()
    if suffix in (".pt", ".pth", ".bin"):
        return _load_pt(p)
    if suffix == ".safetensors":
        return _load_safetensors(p)
    raise WeightFileError(
        f"{p}: unknown weight file type {suffix!r}; use .pt/.pth (torch.save of a state_dict) "
        "or .safetensors."
    )


# ---------------------------------------------------------------------------------------------
# The two directions
# ---------------------------------------------------------------------------------------------


def _infer_num_classes(state_dict: Mapping[str, Any]) -> int:
    w = state_dict.get("fc3.weight")
    shape = tuple(getattr(w, "shape", ()))
    return int(shape[0]) if len(shape) == 2 else 2


def _strict_check(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str
) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [
        f"{k}: got {found[k]}, expected {expected[k]}"
        for k in expected
        if k in found and tuple(found[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{what} does not match the tutorial's Net:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if all(k.startswith("module.") for k in unexpected):
            lines.append(
                "  (the keys carry the 'module.' prefix of nn.DataParallel/DDP: "
                "save net.module.state_dict() or strip the prefix)"
            )
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
    raise WeightFileError("\n".join(lines))


def params_from_torch(
    state_dict_or_path: Mapping[str, Any] | PathLike,
    *,
    num_classes: int | None = None,
    dtype: Any = np.float32,
) -> dict[str, dict[str, jax.Array]]:
    """Convert the tutorial ``Net``'s PyTorch weights to ``jaxnet.Net`` params.

    Args:
      state_dict_or_path: a ``state_dict`` (values ``torch.Tensor`` or numpy arrays), or the path
        of a ``.pt``/``.pth`` file written by ``torch.save(net.state_dict(), path)`` (read with
        ``weights_only=True``: no pickled code is ever run) or of a ``.safetensors`` file.
      num_classes: size of fc3's output. ``None`` reads it off ``fc3.weight``.
      dtype: floating dtype of the returned params (float32 by default, like ``torch.nn``).

    Returns:
      ``{"conv1": {"kernel": (3, 3, 1, 6), "bias": (6,)}, ..., "fc3": {...}}``, to be used as
      ``net.apply({"params": params}, x_nhwc)``.

    Raises:
      WeightFileError: listing every missing and unexpected key and every shape mismatch, or
        naming a non-float or non-finite tensor, or an unreadable file.
    """
    if isinstance(state_dict_or_path, str | os.PathLike):
        state_dict, key, _ = read_state_dict(state_dict_or_path)
        source = str(state_dict_or_path) + (f" [{key!r}]" if key else "")
    elif isinstance(state_dict_or_path, Mapping):
        state_dict = state_dict_or_path
        source = "The state_dict"
    else:
        raise TypeError(
            "params_from_torch takes a state_dict or the path of a .pt/.safetensors file, "
            f"not a {type(state_dict_or_path).__name__}; for a torch module pass net.state_dict()."
        )
    if num_classes is None:
        num_classes = _infer_num_classes(state_dict)
    arrays = {str(k): _to_numpy(v, str(k)) for k, v in state_dict.items()}
    _strict_check(
        {k: tuple(a.shape) for k, a in arrays.items()}, torch_state_dict_shapes(num_classes), source
    )
    params: dict[str, dict[str, jax.Array]] = {}
    for e in _TABLE:
        a = arrays[e.torch_key]
        if not np.issubdtype(a.dtype, np.floating):
            raise WeightFileError(f"{source}: {e.torch_key} has dtype {a.dtype}, expected float.")
        if not np.all(np.isfinite(a)):
            raise WeightFileError(f"{source}: {e.torch_key} holds NaN or infinite values.")
        layer, name = e.flax_path
        params.setdefault(layer, {})[name] = jax.numpy.asarray(e.to_flax(a.astype(dtype)))
    return params


def params_to_torch(
    params: Mapping[str, Any],
    path: PathLike | None = None,
    *,
    as_numpy: bool = False,
) -> dict[str, Any]:
    """Convert ``jaxnet.Net`` params to the tutorial ``Net``'s PyTorch ``state_dict``.

    Args:
      params: ``variables["params"]`` of ``jaxnet.Net`` (a ``{"params": ...}`` dict is accepted).
      path: if given, also write the state_dict there, atomically: ``.pt``/``.pth`` via
        ``torch.save`` or ``.safetensors``.
      as_numpy: return numpy arrays instead of ``torch.Tensor`` (no torch needed).

    Returns:
      An ordered ``{"conv1.weight": (6, 1, 3, 3), ...}`` dict that
      ``torch_net.load_state_dict`` accepts. The round trip through ``params_from_torch`` is
      bitwise exact.
    """
    if set(params) == {"params"}:
        params = params["params"]
    found: dict[str, tuple[int, ...]] = {}
    leaves: dict[tuple[str, str], np.ndarray] = {}
    for layer, sub in params.items():
        if not isinstance(sub, Mapping):
            found[str(layer)] = tuple(np.shape(sub))
            continue
        for name, value in sub.items():
            key = f"{layer}/{name}"
            leaves[(str(layer), str(name))] = np.array(jax.device_get(value))
            found[key] = tuple(leaves[(str(layer), str(name))].shape)
    kernel = leaves.get(("fc3", "kernel"))
    num_classes = int(kernel.shape[1]) if kernel is not None and kernel.ndim == 2 else 2
    expected = {"/".join(p): s for p, s in _flax_shapes(num_classes).items()}
    _strict_check(found, expected, "The params")

    arrays = {e.torch_key: e.to_torch(leaves[e.flax_path]) for e in _TABLE}
    if path is not None:
        _save(arrays, Path(path))
    if as_numpy:
        return arrays
    import torch

    return {k: torch.from_numpy(a) for k, a in arrays.items()}


def _save(arrays: Mapping[str, np.ndarray], path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import save_file

        atomic_write(path, lambda tmp: save_file(dict(arrays), tmp))
    elif suffix in (".pt", ".pth"):
        import torch

        tensors = {k: torch.from_numpy(a) for k, a in arrays.items()}
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    else:
        raise WeightFileError(
            f"{path}: unknown weight file type {suffix!r}; use .pt, .pth or .safetensors."
        )
