"""jaxnet.workdir: a run's params out to PyTorch and back in (``load_params``,
``import_params``), the config's JSON form, and the resume compatibility check."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import SMALL

import jaxnet
from jaxnet import Net, nhwc_to_nchw
from jaxnet.checkpoint import CheckpointError
from jaxnet.config import RESUMABLE_CHANGES, TrainConfig, config_from_json, config_to_json
from jaxnet.data import DataError, load_data
from jaxnet.workdir import (
    WorkdirError,
    check_resumable,
    check_writable,
    import_params,
    load_params,
)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def val_data():
    return load_data(limit=SMALL.limit)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_exported_params_give_torch_the_same_predictions_and_import_back(
    reference_run, val_data, tmp_path: Path, suffix: str
):
    """What `jaxnet export` writes (``params_to_torch`` of ``load_params``) loads strictly into
    the tutorial's TorchNet, predicts what jaxnet predicts, and `jaxnet import`
    (``import_params``) reads it back bit for bit."""
    from jaxnet.torch_reference import TorchNet

    workdir, _ = reference_run
    params, config, meta = load_params(workdir, "best")
    assert config == SMALL and meta["data"]["num_classes"] == 2
    out = tmp_path / f"net{suffix}"
    jaxnet.params_to_torch(params, out, as_numpy=True)
    if suffix == ".pt":
        state_dict = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        state_dict = load_file(out)
    net32 = TorchNet(num_classes=2)
    net32.load_state_dict(state_dict)  # strict: every key and shape must match
    net64 = TorchNet(num_classes=2).double()
    net64.load_state_dict({k: v.double() for k, v in state_dict.items()})

    x = val_data.x_val
    ours = np.asarray(jax.jit(Net().apply)({"params": params}, x), np.float64)
    # The transposed view of a C=1 batch has strides torch reads as channels_last, which the
    # tutorial's x.view(...) rejects; clone into the standard NCHW strides.
    x_torch = torch.from_numpy(nhwc_to_nchw(x)).clone(memory_format=torch.contiguous_format)
    with torch.no_grad():
        theirs32 = net32(x_torch).numpy().astype(np.float64)
        exact = net64(x_torch.double()).numpy()
    np.testing.assert_array_equal(ours.argmax(1), theirs32.argmax(1))
    # Both float32 implementations sit at the float32 noise floor around the float64 result.
    floor = np.abs(theirs32 - exact).max()
    assert np.abs(ours - exact).max() <= 10 * floor + 1e-6, (np.abs(ours - exact).max(), floor)

    # Import reads the file back into a workdir: the same bits as the trained params.
    again = tmp_path / "imported"
    returned = import_params(out, again, TrainConfig(data="digits"))
    imported, config, meta = load_params(again, "best")
    assert config.num_classes == 2 and config.epochs == 0 and meta["source"] == str(out)
    for a, b, c in zip(
        jax.tree.leaves(imported), jax.tree.leaves(params), jax.tree.leaves(returned), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(b))
    with pytest.raises(CheckpointError, match="already holds checkpoints; pass --overwrite"):
        import_params(out, again)  # no silent overwrite
    import_params(out, again, overwrite=True)


def test_import_reads_the_class_count_off_the_weights(tmp_path: Path):
    from jaxnet.torch_reference import make_torch_net

    path = tmp_path / "ten.pt"
    torch.save(make_torch_net(1, num_classes=10).state_dict(), path)
    params = import_params(path, tmp_path / "run")
    assert params["fc3"]["bias"].shape == (10,)
    _, config, _ = load_params(tmp_path / "run")
    assert config.num_classes == 10


def test_load_params_of_a_missing_run_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no checkpoints at"):
        load_params(tmp_path / "none")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a jaxnet checkpoint folder"):
        load_params(tmp_path / "empty")


def test_config_json_round_trip():
    config = TrainConfig(optimizer_kwargs={"betas": (0.8, 0.9)}, schedule_kwargs={"gamma": 0.5})
    d = config_to_json(config)
    assert d["optimizer_kwargs"] == {"betas": (0.8, 0.9)} and isinstance(d["schedule_kwargs"], dict)
    assert config_from_json(d) == config
    assert config_from_json({**d, "from_a_newer_version": 1}) == config  # unknown keys dropped


def test_resume_check_names_every_change():
    config = TrainConfig()
    meta = {"config": config_to_json(config), "data": {"num_train": 1}}
    check_resumable(meta, dataclasses.replace(config, epochs=20, resume=True), {"num_train": 1})
    assert {"epochs", "early_stopping", "resume", "overwrite"} <= RESUMABLE_CHANGES
    changed = dataclasses.replace(config, lr=0.5, seed=3)
    with pytest.raises(
        CheckpointError, match=r"lr: checkpoint 0\.01, now 0\.5; seed: checkpoint 0"
    ):
        check_resumable(meta, changed, {"num_train": 1})
    with pytest.raises(CheckpointError, match="the data differs"):
        check_resumable(meta, config, {"num_train": 2})


def test_import_checks_its_data_before_writing(tmp_path: Path, torch_net):
    weights = tmp_path / "w.pt"
    torch.save(torch_net.state_dict(), weights)
    with pytest.raises(DataError, match=r"no data at .*none\.npz"):
        import_params(weights, tmp_path / "run", TrainConfig(data=str(tmp_path / "none.npz")))
    assert not (tmp_path / "run").exists()


def test_resume_check_compares_the_data_fingerprint():
    config = TrainConfig()
    data = {"num_train": 8, "fingerprint": "aaaa"}
    meta = {"config": config_to_json(config), "data": data}
    check_resumable(meta, config, data)
    with pytest.raises(CheckpointError, match="fingerprint: the run's 'aaaa', now 'bbbb'"):
        check_resumable(meta, config, {**data, "fingerprint": "bbbb"})
    # A format-1 checkpoint has no fingerprint: its data is compared without one.
    old = {"config": config_to_json(config), "data": {"num_train": 8}}
    check_resumable(old, config, {**data, "fingerprint": "bbbb"})


def test_a_checkpoints_file_or_a_workdir_file_is_refused_by_name(tmp_path: Path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(WorkdirError, match=r"--workdir .*f\.txt is a file"):
        check_writable(tmp_path / "f.txt")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(WorkdirError, match=r"run/checkpoints is a file, where jaxnet keeps"):
        check_writable(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints").read_text() == "x"
