"""jaxnet.predict and ``jaxnet predict``: images from every source, normalised as in training,
classified by the shared inference core; CSV/JSON, accuracy and confusion matrix; a picture a
user drew."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from jaxnet import data, inference
from jaxnet.cli import main
from jaxnet.errors import ConfigError
from jaxnet.export import run_info, save_weights
from jaxnet.predict import (
    confusion_matrix,
    image_to_pixels,
    load_images,
    load_model,
    predict_images,
)


@pytest.fixture(scope="module")
def model(reference_run):
    workdir, _ = reference_run
    return load_model(workdir)


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """40 of the digits as raw uint8 pixels would be stored, with parity labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = data.upsample_digits(d.images[:40])[..., 0]  # (40, 32, 32) in [0, 1]
    y = (d.target[:40] % 2).astype(np.int64)
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    np.savez(path, x=x, y=y)
    return path, x, y


def _drawn_zero(size=(200, 240), ink=0, paper=255, mode="L") -> Image.Image:
    """A "0" a user drew: dark ink on white paper, larger than 32x32."""
    im = Image.new(mode, size, paper)
    ImageDraw.Draw(im).ellipse((50, 30, 150, 210), outline=ink, width=18)
    return im


def test_normalisation_is_trainings(model, digits_npz):
    """``ModelInfo.normalise`` is ``jaxnet.data``'s, bit for bit, with the run's statistics."""
    _, x, _ = digits_npz
    ds = data.Dataset(x, x, x, x, 2, model.info.mean, model.info.std, "")
    np.testing.assert_array_equal(model.info.normalise(x), ds.normalise(x))


def test_predict_npz_with_labels_end_to_end(reference_run, model, digits_npz, tmp_path, capsys):
    workdir, _ = reference_run
    path, x, y = digits_npz
    out = tmp_path / "p.csv"
    argv = ["predict", "--workdir", str(workdir), "--data", str(path), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    want = inference.predict(model.params, model.info.normalise(x[..., None]))
    rows = list(csv.DictReader(out.open()))
    assert [int(r["predicted"]) for r in rows] == want.classes.tolist()
    assert [int(r["label"]) for r in rows] == y.tolist()
    np.testing.assert_allclose([float(r["p1"]) for r in rows], want.probabilities[:, 1], atol=1e-6)
    accuracy = float(np.mean(want.classes == y))
    assert f"accuracy: {accuracy:.2%} ({int(np.sum(want.classes == y))} of 40)" in printed
    matrix = confusion_matrix(y, want.classes, 2)
    assert f"    0 {matrix[0, 0]:>3} {matrix[0, 1]:>3}" in printed
    assert (tmp_path / "p.confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing the user has is replaced without --overwrite.
    before = out.read_bytes()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*argv, "--overwrite", "--format", "json"]) == 0
    doc = json.loads(out.read_text())
    assert doc["accuracy"] == accuracy and doc["model"]["mean"] == model.info.mean


def test_a_picture_a_user_drew(reference_run, model, tmp_path, capsys):
    """A 200x240 black-on-white PNG becomes a 32x32 white-on-black image like the training
    digits, the same whichever way round it was drawn, and is classified."""
    workdir, _ = reference_run
    drawn = _drawn_zero()
    pixels = image_to_pixels(drawn)
    assert pixels.shape == (32, 32) and pixels.dtype == np.float32
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    # As the training digits: the ink spans the height; a narrower 0 leaves dark sides; a hole.
    assert pixels[:, 16].max() == pytest.approx(1.0, abs=0.05) and pixels[16, 16] < 0.2
    assert pixels[:, :2].max() < 0.1 and pixels[:, -2:].max() < 0.1
    np.testing.assert_allclose(image_to_pixels(ImageOps.invert(drawn)), pixels, atol=1e-6)
    rgba = _drawn_zero(ink=(0, 0, 0, 255), paper=(0, 0, 0, 0), mode="RGBA")  # transparent
    np.testing.assert_allclose(image_to_pixels(rgba), pixels, atol=1e-6)
    path = tmp_path / "zero.png"
    drawn.save(path)
    out = tmp_path / "p.json"
    argv = ["predict", "--workdir", str(workdir), "--data", str(path), "--out", str(out)]
    assert main(argv) == 0
    assert "zero.png: class " in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["predictions"]
    want = inference.predict(model.params, model.info.normalise(pixels[None, ..., None]))
    assert row["image"] == "zero.png" and row["predicted"] == int(want.classes[0])
    assert row["p0"] + row["p1"] == pytest.approx(1.0, abs=1e-6)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_weights_file_and_idx_folder(model, tmp_path):
    """An exported file (its metadata: classes, normalisation) on MNIST IDX files, whose digits
    are mapped to classes by the model's label rule; a folder of pictures; bad input."""
    weights = save_weights(model.params, tmp_path / "net.safetensors", model.info)
    from_file = load_model(weights=weights)
    assert from_file.info.mean == model.info.mean and from_file.info.classes == model.info.classes
    rng = np.random.default_rng(0)
    folder = tmp_path / "mnist"
    folder.mkdir()
    digits = np.arange(6)
    _write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (6, 28, 28)))
    _write_idx(folder / "t10k-labels-idx1-ubyte", digits)
    images = load_images(folder, from_file.info)
    assert images.pixels.shape == (6, 32, 32, 1) and images.labels.tolist() == [0, 1, 0, 1, 0, 1]
    result = predict_images(from_file, images)
    assert result.confusion.sum() == 6 and result.accuracy == np.mean(
        result.classes == images.labels
    )
    pictures = tmp_path / "drawn"
    pictures.mkdir()
    _drawn_zero().save(pictures / "a.png")
    _drawn_zero().convert("RGB").save(pictures / "b.jpg")
    (pictures / "notes.txt").write_text("not an image")
    assert load_images(pictures, model.info).names == ["a.png", "b.jpg"]
    np.save(tmp_path / "x.npy", images.pixels[..., 0])  # images alone, no labels
    assert load_images(tmp_path / "x.npy", model.info).labels is None
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match=r"not a readable \.npz/\.npy file"):
        load_images(tmp_path / "bad.npz", model.info)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("neither", "either --workdir"),
        ("blank", "blank"),
        ("missing", "no images at"),
        ("plain weights", "--mean and --std"),
    ],
)
def test_bad_input_exits_2_with_the_fix(reference_run, model, tmp_path, capsys, case, needle):
    import torch

    import jaxnet

    workdir, _ = reference_run
    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    plain = tmp_path / "plain.pt"
    torch.save(jaxnet.params_to_torch(model.params), plain)
    source = ["--workdir", str(workdir)]
    argv = {
        "neither": ["--data", str(blank)],
        "blank": [*source, "--data", str(blank)],
        "missing": [*source, "--data", str(tmp_path / "none")],
        "plain weights": ["--weights", str(plain), "--data", str(blank)],
    }[case]
    assert main(["predict", *argv, "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxnet predict: error: ") and needle in err, err
    assert not (tmp_path / "p.csv").exists()


def test_run_info_of_a_workdir_equals_the_models(reference_run, model):
    workdir, _ = reference_run
    assert run_info(workdir)[1] == model.info
