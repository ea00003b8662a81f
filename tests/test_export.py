"""jaxnet.export: weight files that carry what using them needs (classes, normalisation,
layout, version), read back by import/predict; the docs' PyTorch snippet; the StableHLO
serving artifact, checked against ``Net.apply`` bit for bit."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxnet
from jaxnet import inference
from jaxnet.cli import main
from jaxnet.convert import WeightFileError
from jaxnet.export import (
    LAYOUT_TORCH,
    ModelInfo,
    jaxnet_version,
    read_weights,
    run_info,
    save_weights,
    stablehlo_inference,
)
from jaxnet.workdir import load_params

torch = pytest.importorskip("torch")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"


@pytest.fixture(scope="module")
def run_model(reference_run):
    """The reference run's best params and its ``ModelInfo``."""
    workdir, _ = reference_run
    return run_info(workdir)


def test_run_info_is_what_training_used(reference_run, run_model):
    workdir, _ = reference_run
    _, info = run_model
    _, _, meta = load_params(workdir)
    assert (info.num_classes, info.label_rule, info.data) == (2, "parity", "digits")
    assert info.classes == "class 0 = even digit, class 1 = odd digit"
    assert (info.mean, info.std) == (meta["data"]["mean"], meta["data"]["std"])
    assert info.jaxnet_version == jaxnet_version() == jaxnet.__version__


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_exported_files_carry_their_metadata(reference_run, run_model, tmp_path, suffix, capsys):
    workdir, _ = reference_run
    params, info = run_model
    out = tmp_path / f"net{suffix}"
    assert main(["export", str(out), "--workdir", str(workdir)]) == 0
    printed = capsys.readouterr().out
    assert f"inputs are (x - {info.mean:.6f}) / {info.std:.6f}" in printed
    assert info.classes in printed
    assert main(["export", str(out), "--workdir", str(workdir)]) == 2  # not replaced ...
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(out), "--workdir", str(workdir), "--overwrite"]) == 0  # ... unless
    assert main(["export", str(out), "--workdir", str(workdir)]) == 2  # not replaced, unless:
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(out), "--workdir", str(workdir), "--overwrite"]) == 0
    read, back = read_weights(out)
    assert back == dataclasses.replace(info, layout=LAYOUT_TORCH)  # floats exact: repr
    for a, b in zip(jax.tree.leaves(read), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if suffix == ".pt":  # still a plain state_dict for torch, loaded strictly
        from jaxnet.torch_reference import TorchNet

        state = torch.load(out, weights_only=True)
        assert TorchNet(2).load_state_dict(state, strict=True).missing_keys == []
        assert state._metadata[""]["jaxnet"]["num_classes"] == 2
    else:
        from safetensors import safe_open

        with safe_open(str(out), "np") as f:
            meta = f.metadata()
        assert meta["format"] == "pt" and float(meta["mean"]) == info.mean


def test_import_reads_the_metadata_back(run_model, tmp_path, capsys):
    params, info = run_model
    info = dataclasses.replace(info, mean=0.25, std=0.5, label_rule="low-high", classes="x")
    path = save_weights(params, tmp_path / "net.safetensors", info)
    assert main(["import", str(path), "--workdir", str(tmp_path / "run")]) == 0
    assert "inputs are (x - 0.250000) / 0.500000" in capsys.readouterr().out
    _, config, meta = load_params(tmp_path / "run")
    assert config.label_rule == "low-high" and meta["data"]["mean"] == 0.25
    _, again = run_info(tmp_path / "run")
    assert (again.mean, again.std, again.label_rule) == (0.25, 0.5, "low-high")


def test_plain_and_damaged_files(run_model, tmp_path):
    params, info = run_model
    plain = tmp_path / "plain.pt"
    torch.save(jaxnet.params_to_torch(params), plain)  # no metadata
    assert read_weights(plain)[1] is None
    bad = save_weights(params, tmp_path / "bad.safetensors", dataclasses.replace(info, std=0.5))
    from safetensors.numpy import load_file, save_file

    meta = {"format": "pt", "num_classes": "2", "mean": "zero"}  # damaged
    save_file(load_file(str(bad)), str(bad), metadata=meta)
    with pytest.raises(WeightFileError, match="metadata is incomplete or damaged"):
        read_weights(bad)
    other = save_weights(params, tmp_path / "n.pt", dataclasses.replace(info, num_classes=10))
    with pytest.raises(WeightFileError, match="says 10 classes but fc3 has 2"):
        read_weights(other)


def _docs_python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", DOCS.read_text(), re.DOTALL | re.MULTILINE)


def test_the_docs_pytorch_snippet_runs_and_agrees(reference_run, run_model, tmp_path, monkeypatch):
    """docs/training.md's PyTorch-only inference: on an exported file it gives jaxnet's classes
    and, to float32 round-off, its logits."""
    workdir, _ = reference_run
    params, info = run_model
    (snippet,) = [b for b in _docs_python_blocks() if "TorchNet" in b]
    monkeypatch.chdir(tmp_path)
    assert main(["export", "runs/default/net.pt", "--workdir", str(workdir)]) == 0
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(snippet, "docs/training.md", "exec"), namespace)
    pixels = namespace["pixels"].numpy()
    ours = inference.predict(params, info.normalise(jaxnet.nchw_to_nhwc(pixels)))
    logits = namespace["logits"].numpy()
    np.testing.assert_array_equal(logits.argmax(1), ours.classes)
    np.testing.assert_allclose(logits, ours.logits, rtol=1e-5, atol=1e-5)


def test_stablehlo_inference_equals_net_apply(run_model):
    """One export serves every batch size (the batch is symbolic); its logits are
    ``Net.apply``'s on CPU: bit for bit over 32 images, and to float32 round-off up to 32,
    where ``Net.apply`` sums fc1's product in another order (kernels.dense_dot_general)."""
    params, _ = run_model
    exported = stablehlo_inference(params, 2)
    assert str(exported.in_avals[0].shape[0]) == "n" and exported.platforms == ("cpu",)
    apply = jax.jit(jaxnet.Net().apply)
    rng = np.random.default_rng(0)
    for n in (1, 33):
        x = rng.standard_normal((n, 32, 32, 1), dtype=np.float32)
        got = np.asarray(exported.call(x))
        want = np.asarray(apply({"params": params}, x))
        if n > 32:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cli_stablehlo_file_deserializes_and_agrees(reference_run, run_model, tmp_path):
    workdir, _ = reference_run
    params, info = run_model
    out = tmp_path / "net.stablehlo"
    args = ["export", str(out), "--workdir", str(workdir), "--platforms", "cpu"]
    assert main(args) == 0
    exported = jax.export.deserialize(bytearray(out.read_bytes()))  # no jaxnet model code
    x = np.random.default_rng(1).standard_normal((33, 32, 32, 1), dtype=np.float32)
    want = jax.jit(jaxnet.Net().apply)({"params": params}, x)  # over 32: bit for bit
    np.testing.assert_array_equal(np.asarray(exported.call(x)), np.asarray(want))
    sidecar = json.loads((tmp_path / "net.stablehlo.json").read_text())
    assert sidecar["mean"] == info.mean and sidecar["layout"].startswith("NHWC")


def test_model_info_round_trips_through_strings():
    info = ModelInfo(10, "digit", "class = the digit 0-9", 0.1 + 0.2, 1 / 3, data="mnist/")
    assert ModelInfo.from_metadata(info.to_metadata(), "x") == info


def test_import_of_weights_trained_on_data_that_is_not_here(run_model, tmp_path, capsys):
    params, info = run_model
    path = save_weights(
        params, tmp_path / "n.pt", dataclasses.replace(info, data=str(tmp_path / "gone.npz"))
    )
    argv = ["import", str(path), "--workdir", str(tmp_path / "run")]
    assert main(argv) == 2
    assert "gone.npz, which is not here; pass --data" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([*argv, "--data", "digits"]) == 0
    assert load_params(tmp_path / "run")[1].data == "digits"
