"""Data for ``jaxnet train``: the default digits, user ``.npz`` files and MNIST IDX files.

Every source ends as a :class:`Dataset`: NHWC float32 images ``(N, 32, 32, 1)`` normalised with
the mean and standard deviation of the *training* split only, and int32 class labels ``(N,)``.

* **Default** (``"digits"``): scikit-learn's bundled handwritten digits (1,797 8x8 images, no
  download). Pixels 0..16 are scaled to [0, 1] and upsampled 8x8 -> 32x32 bilinearly
  (``jax.image.resize(..., "linear")``, half-pixel centres, like ``F.interpolate(...,
  mode="bilinear", align_corners=False)``).
* **``.npz``**: arrays ``x`` (``(N, 32, 32)``, ``(N, 32, 32, 1)`` or ``(N, 1, 32, 32)``; the layout
  is detected by ``jaxnet.convert.to_nhwc_images``) and integer ``y`` in ``[0, num_classes)``.
  Optional ``x_val``/``y_val`` give the validation split; otherwise it is split off. Pixels are
  used as stored (uint8 is divided by 255).
* **MNIST IDX** (a folder holding ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte``,
  each optionally ``.gz``; ``t10k-*`` files, when present, are the validation split): 28x28
  images padded with 2 zero pixels on each side to 32x32, pixels divided by 255.

Digit labels (default data and MNIST) become 2 classes by a stated rule (``label_rule``):
``"parity"`` (default): class 0 = even digit, class 1 = odd digit; ``"low-high"``: class 0 =
digits 0-4, class 1 = digits 5-9. With ``num_classes=10`` the digit is the class.

Without a given validation split, a fixed fraction is split off by a permutation drawn from
``split_seed`` (independent of the training seed), so every run sees the same split.

Every problem found in the data raises :class:`DataError` naming it and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from jaxnet.convert import to_nhwc_images
from jaxnet.errors import JaxnetError
from jaxnet.images import IMAGE_SIZE

__all__ = [
    "LABEL_RULES",
    "DataError",
    "Dataset",
    "batches",
    "check_images",
    "check_label_array",
    "digit_classes",
    "epoch_permutation",
    "load_data",
    "load_digits_data",
    "load_mnist_idx",
    "load_npz",
    "num_batches",
    "read_idx",
    "read_mnist_pair",
]

PathLike = str | os.PathLike

LABEL_RULES = {
    "parity": "class 0 = even digit, class 1 = odd digit",
    "low-high": "class 0 = digits 0-4, class 1 = digits 5-9",
}


class DataError(JaxnetError, ValueError):
    """Training data that cannot be used as it is; the message names the problem and the fix."""


@dataclass(frozen=True)
class Dataset:
    """A train/validation split ready for ``jaxnet.Net``.

    Attributes:
      x_train, x_val: float32 NHWC images ``(N, 32, 32, 1)``, normalised as ``(x - mean) / std``.
      y_train, y_val: int32 class labels ``(N,)`` in ``[0, num_classes)``.
      num_classes: number of classes (the size of ``Net``'s output).
      mean, std: the normalisation statistics, from the training split only.
      description: where the data came from and which label rule made the classes.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    mean: float
    std: float
    description: str

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Raw ``(N, 32, 32, 1)`` pixels (scaled like this data set's) -> network input."""
        return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Checks shared by every source
# ---------------------------------------------------------------------------------------------


def check_images(x: np.ndarray, where: str) -> np.ndarray:
    """Raw images of any accepted layout -> float32 NHWC, refusing empty, non-numeric or NaN."""
    if x.dtype == object or not (
        np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
    ):
        raise DataError(f"{where}: images have dtype {x.dtype}; store numbers (uint8 or float).")
    if x.ndim >= 1 and x.shape[0] == 0:
        raise DataError(f"{where}: there are no images (x has shape {x.shape}); the data is empty.")
    try:
        nhwc, _ = to_nhwc_images(x)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if np.issubdtype(nhwc.dtype, np.integer):
        scale = 255.0 if nhwc.dtype == np.uint8 else 1.0
        return nhwc.astype(np.float32) / np.float32(scale)
    nhwc = nhwc.astype(np.float32)
    bad = ~np.isfinite(nhwc)
    if bad.any():
        images = np.flatnonzero(bad.reshape(len(nhwc), -1).any(axis=1))
        raise DataError(
            f"{where}: {int(bad.sum())} pixels are NaN or infinite, in {len(images)} images "
            f"(first at index {int(images[0])}). Remove or repair those images."
        )
    return nhwc


def check_label_array(y: np.ndarray, n: int, num_classes: int, where: str) -> np.ndarray:
    """A data set's labels as int32 ``(n,)`` class indices in ``[0, num_classes)``, or a
    ``DataError`` naming ``where`` and what is wrong (shape, dtype, range)."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{where}: labels y must be a vector (N,), got shape {y.shape}.")
    if len(y) != n:
        raise DataError(f"{where}: {n} images but {len(y)} labels; x and y must have equal length.")
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be integer class indices, got dtype {y.dtype}.")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise DataError(
            f"{where}: labels must lie in [0, {num_classes}) for {num_classes} classes, found "
            f"{np.unique(y[bad])[:10].tolist()} ({int(bad.sum())} labels). Pass the right "
            "--num-classes (num_classes=...) or map the labels to 0..num_classes-1."
        )
    return y.astype(np.int32)


def digit_classes(digits: np.ndarray, num_classes: int, label_rule: str, where: str) -> np.ndarray:
    """Digits 0-9 ``(N,)`` -> int32 class indices: the digit for 10 classes, ``label_rule``
    (a key of ``LABEL_RULES``) for 2; ``DataError`` naming ``where`` otherwise."""
    if num_classes == 10:
        return digits.astype(np.int32)
    if num_classes != 2:
        raise DataError(
            f"{where}: digit data has 10 digits; use num_classes=2 (with a label rule) or 10, "
            f"not {num_classes}."
        )
    if label_rule == "parity":
        return (digits % 2).astype(np.int32)
    if label_rule == "low-high":
        return (digits >= 5).astype(np.int32)
    raise DataError(f"unknown label rule {label_rule!r}; choose one of {sorted(LABEL_RULES)}.")


def _rule_text(num_classes: int, label_rule: str) -> str:
    if num_classes == 10:
        return "10 classes (the digit)"
    return f"2 classes: {LABEL_RULES[label_rule]}"


def _split(
    x: np.ndarray, y: np.ndarray, val_fraction: float, split_seed: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}.")
    n = len(x)
    n_val = round(n * val_fraction)
    if n_val < 1 or n - n_val < 1:
        raise DataError(
            f"{where}: {n} examples are too few to split {val_fraction:.0%} off for validation; "
            "provide more data or x_val/y_val."
        )
    order = np.random.default_rng(split_seed).permutation(n)
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _finish(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    num_classes: int,
    description: str,
    limit: int | None,
) -> Dataset:
    if limit is not None:
        if limit < 2:
            raise DataError(f"limit must be at least 2 examples, got {limit}.")
        # Keep the train/val proportion; both splits are already in random order.
        n_val = max(1, round(limit * len(x_val) / (len(x_train) + len(x_val))))
        x_train, y_train = x_train[: limit - n_val], y_train[: limit - n_val]
        x_val, y_val = x_val[:n_val], y_val[:n_val]
        description += f"; limited to {len(x_train)} train + {len(x_val)} val examples"
    mean = float(np.mean(x_train, dtype=np.float64))
    std = float(np.std(x_train, dtype=np.float64))
    if not std > 0.0:
        raise DataError("the training images are all the same value; nothing to learn from.")
    ds = Dataset(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        num_classes=num_classes,
        mean=mean,
        std=std,
        description=description,
    )
    return Dataset(
        x_train=ds.normalise(x_train),
        y_train=y_train,
        x_val=ds.normalise(x_val),
        y_val=y_val,
        num_classes=num_classes,
        mean=mean,
        std=std,
        description=description,
    )


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def upsample_digits(images: np.ndarray) -> np.ndarray:
    """scikit-learn's ``(N, 8, 8)`` digits (0..16) -> ``(N, 32, 32, 1)`` float32 in [0, 1].

    Bilinear, half-pixel centres (``jax.image.resize(..., "linear")``).
    """
    x = np.asarray(images, np.float32) / np.float32(16.0)
    out = jax.image.resize(x, (len(x), IMAGE_SIZE, IMAGE_SIZE), method="linear")
    return np.asarray(out, np.float32)[..., None]


def load_digits_data(
    num_classes: int = 2,
    label_rule: str = "parity",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    limit: int | None = None,
) -> Dataset:
    """The default data: scikit-learn's bundled digits, 32x32, split 80/20 (see module doc)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = upsample_digits(digits.images)
    y = digit_classes(np.asarray(digits.target), num_classes, label_rule, "digits")
    split = _split(x, y, val_fraction, split_seed, "digits")
    desc = (
        f"scikit-learn digits ({len(x)} images, 8x8 upsampled bilinearly to 32x32), "
        f"{_rule_text(num_classes, label_rule)}, {val_fraction:.0%} held out for validation"
    )
    return _finish(*split, num_classes, desc, limit)


def load_npz(
    path: PathLike,
    num_classes: int = 2,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    limit: int | None = None,
) -> Dataset:
    """A user ``.npz`` with ``x``, ``y`` (optionally ``x_val``, ``y_val``); see module doc."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no data file at {p}.")
    if p.stat().st_size == 0:
        raise DataError(f"{p} is an empty file; write it with np.savez(path, x=images, y=labels).")
    if not zipfile.is_zipfile(p):
        raise DataError(
            f"{p} is not a readable .npz file (not a zip archive of arrays; a .npy file holds "
            "one array); write it with np.savez(path, x=images, y=labels)."
        )
    try:
        # allow_pickle=False: the file is data, an object array naming code is refused.
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DataError(
            f"{p} is not a readable .npz file ({e}); write it with np.savez(path, x=..., y=...)."
        ) from None
    not_arrays = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
    if not_arrays:
        raise DataError(
            f"{p}: the member(s) {not_arrays} are not .npy arrays; write the file with "
            "np.savez(path, x=images, y=labels)."
        )
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(
            f"{p} lacks the array(s) {missing}; found {sorted(arrays) or 'no arrays'}. Save the "
            "images as x and the labels as y: np.savez(path, x=images, y=labels)."
        )
    x = check_images(arrays["x"], f"{p} x")
    y = check_label_array(arrays["y"], len(x), num_classes, f"{p} y")
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"{p} has only one of x_val and y_val; give both or neither.")
    if "x_val" in arrays:
        x_val = check_images(arrays["x_val"], f"{p} x_val")
        y_val = check_label_array(arrays["y_val"], len(x_val), num_classes, f"{p} y_val")
        split = (x, y, x_val, y_val)
        held = "x_val/y_val for validation"
    else:
        split = _split(x, y, val_fraction, split_seed, str(p))
        held = f"{val_fraction:.0%} held out for validation"
    desc = f"{p} ({len(x)} images, {num_classes} classes), {held}"
    return _finish(*split, num_classes, desc, limit)


_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: PathLike) -> np.ndarray:
    """An IDX file (the MNIST format, optionally gzipped) as a numpy array.

    Header: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then
    each dimension as a big-endian uint32; the data follows in C order.
    """
    p = Path(path)
    raw = p.read_bytes()
    if not raw:
        raise DataError(f"{p} is an empty file.")
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{p} is a damaged gzip file ({e}).") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{p} is not an IDX file (bad magic number {raw[:4].hex()}).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header.")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[raw[2]]
    want = math.prod(dims) * dtype.itemsize  # Python ints: a huge header cannot overflow
    if len(raw) - header != want:
        raise DataError(
            f"{p}: the header announces shape {dims} ({want} bytes) but {len(raw) - header} "
            "bytes follow; the file is truncated or not IDX."
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path | None:
    for name in (f"{prefix}-{kind}", f"{prefix}-{kind.replace('-idx', '.idx')}"):
        for suffix in ("", ".gz"):
            if (folder / (name + suffix)).is_file():
                return folder / (name + suffix)
    return None


def read_mnist_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray] | None:
    """``(images (N, 32, 32, 1) float32 in [0, 1], digits (N,))`` of the MNIST IDX pair
    ``{prefix}-images-idx3-ubyte[.gz]`` / ``{prefix}-labels-idx1-ubyte[.gz]`` in ``folder``
    (28x28 padded to 32x32), None if neither file is there; ``DataError`` for one alone or a
    malformed pair."""
    images = _find_idx(folder, prefix, "images-idx3-ubyte")
    labels = _find_idx(folder, prefix, "labels-idx1-ubyte")
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        raise DataError(
            f"{folder}: found only the {prefix} {'labels' if images is None else 'images'} file; "
            f"both {prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz] are needed."
        )
    x = read_idx(images)
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"{images}: MNIST images must be (N, 28, 28), got {x.shape}.")
    if x.dtype != np.uint8:
        raise DataError(f"{images}: MNIST images must be uint8, got {x.dtype}.")
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))  # 28x28 -> 32x32, zero (background) border
    x = check_images(x, str(images))
    digits = read_idx(labels)
    if digits.ndim != 1 or len(digits) != len(x):
        raise DataError(
            f"{labels}: expected {len(x)} labels (one per image), got shape {digits.shape}."
        )
    return x, check_label_array(digits, len(x), 10, str(labels))


def load_mnist_idx(
    folder: PathLike,
    num_classes: int = 2,
    label_rule: str = "parity",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    limit: int | None = None,
) -> Dataset:
    """MNIST-format IDX files from ``folder`` (see module doc)."""
    root = Path(folder)
    train = read_mnist_pair(root, "train")
    if train is None:
        raise DataError(
            f"{root} holds no MNIST files; expected train-images-idx3-ubyte[.gz] and "
            "train-labels-idx1-ubyte[.gz] (and optionally the t10k-* pair for validation)."
        )
    test = read_mnist_pair(root, "t10k")
    x, digits = train
    y = digit_classes(digits, num_classes, label_rule, str(root))
    if test is not None:
        split = (x, y, test[0], digit_classes(test[1], num_classes, label_rule, str(root)))
        held = "t10k files for validation"
    else:
        split = _split(x, y, val_fraction, split_seed, str(root))
        held = f"{val_fraction:.0%} held out for validation"
    desc = (
        f"MNIST IDX {root} (28x28 padded to 32x32), {_rule_text(num_classes, label_rule)}, {held}"
    )
    return _finish(*split, num_classes, desc, limit)


def check_source(source: str | None) -> None:
    """Raise ``DataError`` when ``source`` names no data ``load_data`` could read: neither
    ``"digits"`` nor an existing file or folder (checked before anything is written)."""
    if source in (None, "", "digits") or Path(source).exists():
        return
    raise DataError(
        f"no data at {source}: give 'digits' (the default), a .npz file with x and y, or a "
        "folder of MNIST IDX files."
    )


def fingerprint(ds: Dataset) -> str:
    """SHA-256 of the data set's arrays (train and validation images and labels, as
    ``load_data`` made them): equal only for the same examples, labels and split."""
    h = hashlib.sha256()
    for a in (ds.x_train, ds.y_train, ds.x_val, ds.y_val):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).data)
    return h.hexdigest()


def load_data(
    source: str | None = "digits",
    num_classes: int = 2,
    label_rule: str = "parity",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    limit: int | None = None,
) -> Dataset:
    """The data set ``source`` names: ``"digits"``/``None`` (default), a ``.npz`` file, or a
    folder of MNIST IDX files. ``limit`` keeps only that many examples (quick runs, tests)."""
    if label_rule not in LABEL_RULES:
        raise DataError(f"unknown label rule {label_rule!r}; choose one of {sorted(LABEL_RULES)}.")
    if num_classes < 2:
        raise DataError(f"num_classes must be at least 2, got {num_classes}.")
    if source in (None, "", "digits"):
        return load_digits_data(num_classes, label_rule, val_fraction, split_seed, limit)
    p = Path(source)
    if p.is_dir():
        return load_mnist_idx(p, num_classes, label_rule, val_fraction, split_seed, limit)
    if p.suffix.lower() == ".npz" or p.is_file():
        return load_npz(p, num_classes, val_fraction, split_seed, limit)
    raise DataError(
        f"no data at {p}: give 'digits' (the default), a .npz file with x and y, or a folder of "
        "MNIST IDX files."
    )


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` training examples in ``epoch``: a pure function of (seed, epoch)."""
    key = jax.random.fold_in(jax.random.key(seed), epoch)
    return np.asarray(jax.random.permutation(key, n))


def num_batches(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, so shapes never change)."""
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}.")
    if batch_size > n:
        raise DataError(
            f"batch size {batch_size} is larger than the {n} training examples; "
            f"use a batch size of at most {n}."
        )
    return n // batch_size


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start: int = 0,
    rows: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Shuffled full batches ``(images (B, 32, 32, 1), labels (B,))`` of ``epoch``.

    The order is ``epoch_permutation(seed, epoch, len(x))``, so a resumed run replays exactly
    the same batches; ``start`` skips the first ``start`` batches (resuming mid-epoch).
    ``rows`` (e.g. ``jaxnet.parallel.local_batch_indices``) keeps only those rows of each batch:
    a process of a multi-process run reads just its own share of every global batch.
    """
    steps = num_batches(len(x), batch_size)
    order = epoch_permutation(seed, epoch, len(x))
    for i in range(start, steps):
        idx = order[i * batch_size : (i + 1) * batch_size]
        if rows is not None:
            idx = idx[rows]
        yield x[idx], y[idx]
