"""jaxnet.data: the default digits, .npz and MNIST IDX files, batches, and every bad-data case."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from jaxnet import nhwc_to_nchw
from jaxnet.data import (
    DataError,
    batches,
    check_source,
    epoch_permutation,
    fingerprint,
    load_data,
    load_mnist_idx,
    load_npz,
    num_batches,
    read_idx,
)
from jaxnet.train import TrainConfig, train_and_evaluate


@pytest.fixture(scope="module")
def digits():
    return load_data()


def test_default_digits_shapes_rule_and_split(digits):
    from sklearn.datasets import load_digits

    assert digits.x_train.shape == (1438, 32, 32, 1) and digits.x_val.shape == (359, 32, 32, 1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
    assert digits.num_classes == 2 and "even" in digits.description
    # Stats come from the training split only: it is exactly standardised, validation is not.
    assert abs(float(digits.x_train.mean())) < 1e-4
    assert abs(float(digits.x_train.std()) - 1.0) < 1e-4
    assert abs(float(digits.x_val.mean())) > 1e-4
    # Even vs odd, and the split is a fixed permutation: the same every time.
    raw = load_digits()
    assert sorted(np.bincount(digits.y_train) + np.bincount(digits.y_val)) == sorted(
        np.bincount(raw.target % 2)
    )
    again = load_data()
    np.testing.assert_array_equal(again.x_val, digits.x_val)
    ten = load_data(num_classes=10)
    assert set(np.unique(ten.y_train)) == set(range(10))
    np.testing.assert_array_equal(ten.y_train % 2, digits.y_train)
    low_high = load_data(label_rule="low-high", limit=100)
    np.testing.assert_array_equal(low_high.y_train, ten.y_train[: len(low_high.y_train)] >= 5)


def test_npz_layouts_are_detected(tmp_path: Path):
    rng = np.random.default_rng(0)
    x = rng.random((20, 32, 32), dtype=np.float32)
    y = rng.integers(0, 2, 20)
    loaded = []
    for name, arr in (("nhw", x), ("nhwc", x[..., None]), ("nchw", nhwc_to_nchw(x[..., None]))):
        np.savez(tmp_path / f"{name}.npz", x=arr, y=y)
        loaded.append(load_npz(tmp_path / f"{name}.npz"))
    for ds in loaded[1:]:
        np.testing.assert_array_equal(ds.x_train, loaded[0].x_train)
        np.testing.assert_array_equal(ds.y_val, loaded[0].y_val)
    assert loaded[0].x_train.shape == (16, 32, 32, 1)
    # Given validation arrays are used as they are; uint8 pixels are scaled by 1/255.
    np.savez(tmp_path / "val.npz", x=(x * 255).astype(np.uint8), y=y, x_val=x[:3], y_val=y[:3])
    ds = load_npz(tmp_path / "val.npz")
    assert len(ds.x_train) == 20 and len(ds.x_val) == 3


def _save(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


GOOD_X = np.zeros((10, 32, 32), np.float32) + np.linspace(0, 1, 32, dtype=np.float32)
GOOD_Y = np.arange(10) % 2


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((10, 28, 28), np.float32), "y": GOOD_Y}, r"\(10, 28, 28\).*pad 2"),
        ({"x": np.zeros((10, 32, 32, 3), np.float32), "y": GOOD_Y}, r"not one-channel 32x32"),
        ({"x": np.where(np.arange(32) == 5, np.nan, GOOD_X), "y": GOOD_Y}, r"NaN or infinite"),
        ({"x": GOOD_X, "y": np.arange(10)}, r"labels must lie in \[0, 2\).*--num-classes"),
        ({"x": GOOD_X, "y": -GOOD_Y - 1}, r"labels must lie in"),
        ({"x": GOOD_X, "y": GOOD_Y[:7]}, r"10 images but 7 labels"),
        ({"x": GOOD_X, "y": GOOD_Y + 0.5}, r"integer class indices"),
        ({"x": GOOD_X}, r"lacks the array\(s\) \['y'\]"),
        ({"images": GOOD_X, "labels": GOOD_Y}, r"lacks the array\(s\) \['x', 'y'\].*np.savez"),
        ({"x": np.zeros((0, 32, 32), np.float32), "y": GOOD_Y[:0]}, r"no images.*empty"),
        ({"x": GOOD_X, "y": GOOD_Y, "x_val": GOOD_X}, r"only one of x_val and y_val"),
    ],
)
def test_bad_npz_gives_a_clear_error(tmp_path: Path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_npz(_save(tmp_path, **arrays))


def test_empty_missing_and_unreadable_files(tmp_path: Path):
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        load_data(str(tmp_path / "empty.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        load_data(str(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match="no data file at"):
        load_data(str(tmp_path / "missing.npz"))


def test_batch_larger_than_data(tmp_path: Path):
    with pytest.raises(DataError, match="batch size 64 is larger than the 8 training examples"):
        num_batches(8, 64)
    np.savez(tmp_path / "d.npz", x=GOOD_X, y=GOOD_Y)
    config = TrainConfig(data=str(tmp_path / "d.npz"), batch_size=64, progress=False)
    with pytest.raises(DataError, match="at most 8"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written for unusable data


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def test_mnist_idx_plain_and_gzipped(tmp_path: Path):
    rng = np.random.default_rng(1)
    images = rng.integers(1, 256, (30, 28, 28)).astype(np.uint8)
    digits = np.arange(30) % 10
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(digits))
    np.testing.assert_array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    ds = load_data(str(tmp_path))
    assert ds.x_train.shape == (24, 32, 32, 1) and ds.x_val.shape == (6, 32, 32, 1)
    raw = ds.x_train * ds.std + ds.mean  # back to [0, 1] pixels
    np.testing.assert_allclose(raw[:, :2], 0.0, atol=1e-6)  # the 2-pixel zero border
    np.testing.assert_allclose(raw[:, -2:], 0.0, atol=1e-6)
    assert set(np.unique(ds.y_train)) <= {0, 1}
    # With a t10k pair, that is the validation split; --num-classes 10 keeps the digits.
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(images[:5]))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(digits[:5])))
    ds10 = load_mnist_idx(tmp_path, num_classes=10)
    assert len(ds10.x_train) == 30
    np.testing.assert_array_equal(ds10.y_val, digits[:5])


def test_bad_mnist_files(tmp_path: Path):
    with pytest.raises(DataError, match="holds no MNIST files"):
        load_data(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.arange(3)))
    with pytest.raises(DataError, match="not an IDX file"):
        load_data(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(np.zeros((4, 28, 28)))[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_data(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(np.zeros((4, 28, 28))))
    with pytest.raises(DataError, match="expected 4 labels"):
        load_data(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        load_data(str(tmp_path))


def test_batches_are_a_pure_function_of_seed_and_epoch():
    x = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1)
    y = np.arange(50)
    first = [b[1] for b in batches(x, y, 8, seed=3, epoch=2)]
    again = [b[1] for b in batches(x, y, 8, seed=3, epoch=2)]
    assert len(first) == 6  # 50 // 8 full batches; the partial one is dropped
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    assert len(set(np.concatenate(first).tolist())) == 48  # no example twice in an epoch
    other = np.concatenate([b[1] for b in batches(x, y, 8, seed=3, epoch=3)])
    assert not np.array_equal(other, np.concatenate(first))
    resumed = [b[1] for b in batches(x, y, 8, seed=3, epoch=2, start=4)]
    np.testing.assert_array_equal(np.concatenate(resumed), np.concatenate(first[4:]))
    np.testing.assert_array_equal(epoch_permutation(3, 2, 50)[:48], np.concatenate(first))


def test_a_npy_file_or_a_zip_of_non_arrays_is_refused_by_name(tmp_path: Path):
    np.save(tmp_path / "x.npy", GOOD_X)
    with pytest.raises(DataError, match=r"x\.npy is not a readable \.npz file.*\.npy file holds"):
        load_data(str(tmp_path / "x.npy"))
    import zipfile

    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as z:
        z.writestr("x.npy", b"not an array")
        z.writestr("y.npy", b"nor this")
    with pytest.raises(DataError, match=r"odd\.npz: the member\(s\) \['x', 'y'\] are not"):
        load_data(str(tmp_path / "odd.npz"))


def test_an_overflowing_idx_header_names_the_file(tmp_path: Path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + (2**31).to_bytes(4, "big") * 3 + bytes(10))
    with pytest.raises(DataError, match=rf"{path.name}: the header announces shape"):
        read_idx(path)


def test_fingerprint_sees_one_changed_label(tmp_path: Path):
    y = GOOD_Y.copy()
    np.savez(tmp_path / "a.npz", x=GOOD_X, y=y)
    y[0] = 1 - y[0]
    np.savez(tmp_path / "b.npz", x=GOOD_X, y=y)
    a, again, b = (load_data(str(tmp_path / n)) for n in ("a.npz", "a.npz", "b.npz"))
    assert fingerprint(a) == fingerprint(again) != fingerprint(b)


def test_check_source_names_missing_data(tmp_path: Path):
    check_source("digits")
    check_source(str(tmp_path))
    with pytest.raises(DataError, match=r"no data at .*none\.npz"):
        check_source(str(tmp_path / "none.npz"))
