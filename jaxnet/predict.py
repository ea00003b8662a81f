"""``jaxnet predict``: classify new images with a trained ``Net``.

The pipeline: a model (a run's workdir, or a self-describing weight file), images from a
source (an ``.npz`` or ``.npy``, a folder of MNIST IDX files, a PNG/JPEG image or a folder of them),
normalised exactly as in training (``ModelInfo.normalise``), then ``jaxnet.inference.predict``.
The result is written as CSV or JSON, one row per image; with labels, also the accuracy and
the confusion matrix (text and PNG).

A picture a user drew becomes the training data's kind of image by an image rule
(``IMAGE_RULES``; the default follows the data the model was trained on):

1. grey (PIL's ``"L"``: ITU-R 601 luma), transparent pixels composited on white, scaled to
   [0, 1]; inverted when its border is mostly bright, so the digit is white on black as in
   the training data; stretched to span [0, 1];
2. ``"digits"`` (models trained on the default digits): the ink's bounding box (pixels above
   ``INK``) padded to a square, resized to 32x32 (bilinear, antialiased), averaged in 4x4
   blocks to 8x8 (how the UCI digits were made from 32x32 bitmaps) and upsampled back to
   32x32 by ``jaxnet.data.upsample_digits``, exactly as the training images;
   ``"mnist"``: the box scaled to fit 20x20, centred on 28x28 and padded to 32x32 (MNIST's
   layout; MNIST centres by the centre of mass, this by the box);
   ``"resize"``: the whole image resized to 32x32, nothing cropped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import textwrap
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxnet import data, inference
from jaxnet.errors import ConfigError
from jaxnet.export import ModelInfo, read_weights, run_info
from jaxnet.images import IMAGE_SIZE
from jaxnet.io import atomic_write, save_figure

__all__ = [
    "FORMATS",
    "IMAGE_RULES",
    "IMAGE_SUFFIXES",
    "INK",
    "Images",
    "Model",
    "PredictResult",
    "confusion_matrix",
    "image_to_pixels",
    "load_images",
    "load_model",
    "plot_confusion",
    "predict_images",
    "run_predict",
    "write_predictions",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = ("csv", "json")
INK = 0.25
"""A pixel (after inversion and stretching to [0, 1]) above this is ink, not background."""
_CHUNK = 512  # images per inference call: bounded memory, at most two compiled shapes


@dataclass(frozen=True)
class Model:
    """A trained ``Net``'s params, what they need (``info``), and where they came from."""

    params: Any
    info: ModelInfo
    source: str


@dataclass(frozen=True)
class Images:
    """Images to classify: ``pixels`` ``(N, 32, 32, 1)`` float32 in [0, 1] (not yet normalised),
    ``names`` one per image (file name or index), ``labels`` ``(N,)`` int or ``None``."""

    pixels: np.ndarray
    names: list[str]
    labels: np.ndarray | None
    description: str


@dataclass(frozen=True)
class PredictResult:
    """``classes`` ``(N,)``, ``probabilities`` ``(N, C)``; with labels, ``accuracy`` and
    ``confusion`` ``(C, C)`` (rows: true class, columns: predicted class)."""

    images: Images
    classes: np.ndarray
    probabilities: np.ndarray
    accuracy: float | None
    confusion: np.ndarray | None


# --- the model ---------------------------------------------------------------------------------


def load_model(
    workdir: str | os.PathLike | None = None,
    which: str = "best",
    weights: str | os.PathLike | None = None,
    mean: float | None = None,
    std: float | None = None,
) -> Model:
    """The model of a run's ``workdir`` (its ``which`` checkpoint) or of a ``weights`` file.

    ``mean``/``std`` override the normalisation; a weight file without jaxnet metadata (a plain
    ``torch.save(net.state_dict(), p)``) needs them.
    """
    if (workdir is None) == (weights is None):
        raise ConfigError("give either --workdir (a trained run) or --weights (a weight file).")
    if weights is not None:
        params, info = read_weights(weights)
        source = str(weights)
        if info is None:
            if mean is None or std is None:
                raise ConfigError(
                    f"{weights} carries no jaxnet metadata, so its input normalisation is "
                    "unknown; pass --mean and --std (as printed by jaxnet train), or export "
                    "the weights with jaxnet export, which records them."
                )
            n = int(params["fc3"]["bias"].shape[0])
            info = ModelInfo(n, "stored", f"classes 0..{n - 1}", mean, std, data="unknown")
    else:
        params, info = run_info(workdir, which)
        source = f"{workdir} ({which} checkpoint)"
    if mean is not None:
        info = dataclasses.replace(info, mean=float(mean))
    if std is not None:
        info = dataclasses.replace(info, std=float(std))
    if not info.std > 0:
        raise ConfigError(f"the input std must be > 0, got {info.std}.")
    return Model(params, info, source)


# --- images ------------------------------------------------------------------------------------


def _box(x: np.ndarray) -> np.ndarray:
    """The ink's bounding box of a ``(H, W)`` image in [0, 1], padded with 0 to a square."""
    rows, cols = np.flatnonzero((x > INK).any(1)), np.flatnonzero((x > INK).any(0))
    box = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = box.shape
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return np.pad(box, ((top, side - h - top), (left, side - w - left)))


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(jax.image.resize(x, (size, size), "linear", antialias=True), np.float32)


def _digits_rule(x: np.ndarray) -> np.ndarray:
    # The UCI digits: 32x32 bitmaps counted in 4x4 blocks (0..16); training upsamples those.
    x32 = _resize(_box(x), IMAGE_SIZE)
    blocks = x32.reshape(8, 4, 8, 4).mean(axis=(1, 3)) * 16.0
    return data.upsample_digits(blocks[None])[0, ..., 0]


def _mnist_rule(x: np.ndarray) -> np.ndarray:
    x20 = _resize(_box(x), 20)
    return np.pad(x20, 6)  # 20 -> 28 (MNIST) -> 32 (as jaxnet.data pads MNIST)


def _resize_rule(x: np.ndarray) -> np.ndarray:
    return _resize(x, IMAGE_SIZE)


IMAGE_RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "digits": _digits_rule,
    "mnist": _mnist_rule,
    "resize": _resize_rule,
}
"""How a drawn picture, grey in [0, 1] with white ink, becomes a 32x32 input (module doc)."""


def default_image_rule(info: ModelInfo) -> str:
    """The rule that matches the data ``info``'s model was trained on."""
    if info.data in ("digits", "", "None"):
        return "digits"
    return "mnist" if Path(info.data).suffix.lower() != ".npz" else "resize"


def _stretch(x: np.ndarray) -> np.ndarray:
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


def image_to_pixels(image: Any, rule: str = "digits") -> np.ndarray:
    """A PIL image of any size and mode -> ``(32, 32)`` float32 in [0, 1], white ink on black
    (see the module doc for the steps)."""
    from PIL import Image

    if rule not in IMAGE_RULES:
        raise ConfigError(f"unknown image rule {rule!r}; choose one of {sorted(IMAGE_RULES)}.")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    x = np.asarray(image.convert("L"), np.float32) / 255.0
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    if np.median(border) > 0.5:  # dark ink on a bright background
        x = 1.0 - x
    x = _stretch(x)
    if not (x > INK).any():
        raise ConfigError("the image is blank (one colour): there is nothing to classify.")
    return np.clip(_stretch(IMAGE_RULES[rule](x)), 0.0, 1.0).astype(np.float32)


def _image_files(paths: Sequence[Path], rule: str) -> Images:
    from PIL import Image, UnidentifiedImageError

    pixels = []
    for p in paths:
        try:
            with Image.open(p) as im:
                pixels.append(image_to_pixels(im, rule))
        except (UnidentifiedImageError, OSError) as e:
            raise ConfigError(f"{p} is not a readable PNG/JPEG image ({e}).") from None
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    x = np.stack(pixels)[..., None]
    return Images(x, [p.name for p in paths], None, f"{len(x)} image file(s), rule {rule!r}")


def _npz(path: Path) -> Images:
    """An ``.npz`` with ``x`` (and optional labels ``y``), or a ``.npy`` of images only."""
    try:
        loaded = np.load(path, allow_pickle=False)  # the file is data: no pickled objects
        if isinstance(loaded, np.ndarray):
            arrays = {"x": loaded}
        else:
            with loaded:
                arrays = {k: loaded[k] for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(
            f"{path} is not a readable .npz/.npy file ({e}); write it with "
            "np.savez(path, x=images, y=labels)."
        ) from None
    if "x" not in arrays:
        raise ConfigError(f"{path} has no array x (found {sorted(arrays)}); save the images as x.")
    x = data.check_images(arrays["x"], f"{path} x")  # as training reads them: uint8 / 255
    y = arrays.get("y")
    names = [str(i) for i in range(len(x))]
    return Images(x, names, None if y is None else np.asarray(y), f"{path} ({len(x)} images)")


def _idx(folder: Path, info: ModelInfo) -> Images:
    pair = data.read_mnist_pair(folder, "t10k") or data.read_mnist_pair(folder, "train")
    if pair is None:
        raise ConfigError(f"{folder} holds no MNIST IDX files and no PNG/JPEG images.")
    x, digits = pair
    rule = info.label_rule if info.label_rule in data.LABEL_RULES else "parity"
    y = data.digit_classes(digits, info.num_classes, rule, str(folder))
    names = [str(i) for i in range(len(x))]
    return Images(x, names, y, f"MNIST IDX {folder} ({len(x)} images)")


def load_images(source: str | os.PathLike, info: ModelInfo, rule: str | None = None) -> Images:
    """The images at ``source`` (an ``.npz`` with ``x`` and optional ``y``, an MNIST IDX folder,
    a PNG/JPEG file or a folder of them), as pixels in [0, 1] like ``info``'s training data."""
    p = Path(source)
    rule = rule or default_image_rule(info)
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return _image_files([p], rule)
    if p.is_file():
        return _npz(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        return _image_files(files, rule) if files else _idx(p, info)
    raise ConfigError(
        f"no images at {p}: give an .npz (x, optional y), a folder of MNIST IDX files, "
        "or a PNG/JPEG image or a folder of them."
    )


# --- prediction ----------------------------------------------------------------------------------


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """``(C, C)`` int64 counts: row = true class, column = predicted class."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    return m


def predict_images(model: Model, images: Images) -> PredictResult:
    """Normalise ``images`` as in training and classify them (``jaxnet.inference.predict``)."""
    x = model.info.normalise(images.pixels)
    parts = [inference.predict(model.params, x[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]
    classes = np.concatenate([p.classes for p in parts])
    probabilities = np.concatenate([p.probabilities for p in parts])
    accuracy = confusion = None
    if images.labels is not None:
        y = data.check_label_array(images.labels, len(x), model.info.num_classes, "labels y")
        accuracy = float(np.mean(classes == y))
        confusion = confusion_matrix(y, classes, model.info.num_classes)
    return PredictResult(images, classes, probabilities, accuracy, confusion)


def _rows(result: PredictResult) -> list[dict[str, Any]]:
    labels = result.images.labels
    rows = []
    for i, name in enumerate(result.images.names):
        row: dict[str, Any] = {"image": name, "predicted": int(result.classes[i])}
        if labels is not None:
            row["label"] = int(labels[i])
        row.update({f"p{c}": float(p) for c, p in enumerate(result.probabilities[i])})
        rows.append(row)
    return rows


def write_predictions(
    result: PredictResult, path: str | os.PathLike, info: ModelInfo, fmt: str | None = None
) -> Path:
    """Write one row per image (``image``, ``predicted``, ``label`` when known, ``p0..pC-1``) as
    CSV, or as JSON (``{"model": ..., "accuracy": ..., "predictions": [...]}``); the format is
    ``fmt`` or the file's suffix. Atomic."""
    path = Path(path)
    fmt = fmt or ("json" if path.suffix.lower() == ".json" else "csv")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {FORMATS}.")
    rows = _rows(result)
    if fmt == "json":
        doc = {"model": info.__dict__, "accuracy": result.accuracy, "predictions": rows}
        text = json.dumps(doc, indent=1) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(
            {k: f"{v:.6f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows
        )
        text = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def plot_confusion(confusion: np.ndarray, path: str | os.PathLike, title: str = "") -> Path:
    """The confusion matrix as a PNG: counts in the cells, rows true, columns predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = len(confusion)
    fig, ax = plt.subplots(figsize=(max(4.4, 1.8 + 0.55 * c), max(3.8, 1.6 + 0.5 * c)))
    im = ax.imshow(confusion, cmap="Blues")
    high = confusion.max() / 2 if confusion.size else 0
    for (i, j), n in np.ndenumerate(confusion):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > high else "black")
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(textwrap.fill(title or "confusion matrix", 48), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return Path(path)


def summary_text(result: PredictResult, info: ModelInfo) -> str:
    """What ``jaxnet predict`` prints: counts per class, and accuracy and confusion if labelled."""
    n, c = len(result.classes), info.num_classes
    counts = np.bincount(result.classes, minlength=c)
    lines = [
        f"{n} image(s): {result.images.description}",
        f"classes: {info.classes}",
        "predicted: " + ", ".join(f"class {k}: {counts[k]}" for k in range(c)),
    ]
    if n <= 10:
        for name, k, p in zip(
            result.images.names, result.classes, result.probabilities, strict=True
        ):
            lines.append(f"  {name}: class {k} (p = {p[k]:.3f})")
    if result.accuracy is not None and result.confusion is not None:
        correct = int(np.trace(result.confusion))
        lines.append(f"accuracy: {result.accuracy:.2%} ({correct} of {n})")
        lines.append("confusion matrix (rows: true class, columns: predicted class):")
        width = max(len(str(int(result.confusion.max()))), 3)
        lines.append("      " + " ".join(f"{k:>{width}}" for k in range(c)))
        for k, row in enumerate(result.confusion):
            lines.append(f"  {k:>3} " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def run_predict(
    model: Model,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fmt: str | None = None,
    rule: str | None = None,
    confusion_png: str | os.PathLike | None = None,
) -> tuple[PredictResult, list[Path]]:
    """Classify the images at ``source``, write ``out`` (and, with labels, ``confusion_png``);
    returns the result and the files written."""
    images = load_images(source, model.info, rule)
    result = predict_images(model, images)
    written = [write_predictions(result, out, model.info, fmt)]
    if result.confusion is not None and confusion_png is not None:
        n = len(result.classes)
        title = f"accuracy {result.accuracy:.2%} on {n} images; model {model.source}"
        written.append(plot_confusion(result.confusion, confusion_png, title))
    return result, written
