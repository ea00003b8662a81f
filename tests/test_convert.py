"""PyTorch <-> Flax weight exchange: outputs equal, bitwise round trips, strict errors, files."""

from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxnet
from jaxnet.convert import WeightFileError, torch_state_dict_shapes
from jaxnet.model import init_params
from jaxnet.torch_reference import TorchNet, make_torch_net


def test_outputs_match_torch(net, torch_net, images, record_property):
    params = jaxnet.params_from_torch(torch_net.state_dict())
    with torch.no_grad():
        expected = torch_net(images).numpy()
    got = np.asarray(jax.jit(net.apply)({"params": params}, jaxnet.nchw_to_nhwc(images.numpy())))
    diff = float(np.abs(got - expected).max())
    record_property("max_abs_output_diff", diff)
    print(f"outputs: max |jaxnet - torch| = {diff:.3g} (float32, CPU)")
    assert got.shape == expected.shape == (images.shape[0], 2)
    assert diff <= 1e-5


def test_outputs_match_torch_ten_classes():
    torch_net = make_torch_net(3, num_classes=10)
    params = jaxnet.params_from_torch(torch_net.state_dict())  # num_classes read off fc3
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch_net(x).numpy()
    got = jaxnet.Net(num_classes=10).apply({"params": params}, jaxnet.nchw_to_nhwc(x.numpy()))
    assert np.abs(np.asarray(got) - expected).max() <= 1e-5


def test_round_trips_are_bitwise_exact(net, torch_net):
    sd = torch_net.state_dict()
    back = jaxnet.params_to_torch(jaxnet.params_from_torch(sd))
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    params = init_params(net, jax.random.key(1))
    again = jaxnet.params_from_torch(jaxnet.params_to_torch(params))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_torch_loads_converted_params(net, images):
    params = init_params(net, jax.random.key(2))
    torch_net = TorchNet()
    torch_net.load_state_dict(jaxnet.params_to_torch(params), strict=True)
    with torch.no_grad():
        expected = torch_net(images).numpy()
    got = jax.jit(net.apply)({"params": params}, jaxnet.nchw_to_nhwc(images.numpy()))
    assert np.abs(np.asarray(got) - expected).max() <= 1e-5
    # A {"params": ...} dict is accepted too.
    torch_net.load_state_dict(jaxnet.params_to_torch({"params": params}), strict=True)


def test_numpy_state_dict_and_numpy_output(torch_net):
    sd = {k: v.numpy() for k, v in torch_net.state_dict().items()}
    params = jaxnet.params_from_torch(sd)
    back = jaxnet.params_to_torch(params, as_numpy=True)
    assert all(isinstance(v, np.ndarray) and np.array_equal(v, sd[k]) for k, v in back.items())


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_files_round_trip(tmp_path, torch_net, suffix):
    path = tmp_path / f"net{suffix}"
    params = jaxnet.params_from_torch(torch_net.state_dict())
    jaxnet.params_to_torch(params, path)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary left behind
    for source in (path, str(path)):
        loaded = jaxnet.params_from_torch(source)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
            assert np.array_equal(a, b)
    if suffix != ".safetensors":
        fresh = TorchNet()
        fresh.load_state_dict(torch.load(path, weights_only=True))
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in torch_net.state_dict().items())


def test_reads_files_written_by_torch(tmp_path, torch_net):
    from safetensors.torch import save_file

    torch.save(torch_net.state_dict(), tmp_path / "a.pt")
    save_file(torch_net.state_dict(), tmp_path / "a.safetensors")
    a = jaxnet.params_from_torch(tmp_path / "a.pt")
    b = jaxnet.params_from_torch(tmp_path / "a.safetensors")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(x, y)


class _Payload:
    """Unpickling this runs code; weights_only=True must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, as expected
def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Payload()}, f)
    with pytest.raises(WeightFileError, match="weights_only"):
        jaxnet.params_from_torch(path)


def test_whole_module_file_is_refused(tmp_path, torch_net):
    path = tmp_path / "module.pt"
    torch.save(torch_net, path)
    with pytest.raises(WeightFileError, match=r"state_dict\(\)"):
        jaxnet.params_from_torch(path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_corrupt_files(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(b"\x00not a weight file at all" * 10)
    with pytest.raises(WeightFileError, match=str(path.name)):
        jaxnet.params_from_torch(path)


def test_foreign_file_types_and_missing_files(tmp_path, torch_net):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(WeightFileError, match="unknown weight file type"):
        jaxnet.params_from_torch(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError):
        jaxnet.params_from_torch(tmp_path / "absent.pt")
    params = jaxnet.params_from_torch(torch_net.state_dict())
    with pytest.raises(WeightFileError, match="unknown weight file type"):
        jaxnet.params_to_torch(params, tmp_path / "w.h5")
    assert not (tmp_path / "w.h5").exists()
    with pytest.raises(TypeError, match="state_dict"):
        jaxnet.params_from_torch(torch_net)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightFileError, match="not a state_dict"):
        jaxnet.params_from_torch(tmp_path / "list.pt")


def test_strict_keys_lists_every_problem(torch_net):
    sd = dict(torch_net.state_dict())
    del sd["conv2.bias"]
    del sd["fc2.weight"]
    sd["fc1.weight"] = torch.zeros(512, 100)
    sd["extra.weight"] = torch.zeros(3)
    sd["bn.running_mean"] = torch.zeros(3)
    with pytest.raises(WeightFileError) as info:
        jaxnet.params_from_torch(sd)
    msg = str(info.value)
    for needle in (
        "missing keys (2): conv2.bias, fc2.weight",
        "unexpected keys (2): extra.weight, bn.running_mean",
        "fc1.weight: got (512, 100), expected (512, 12544)",
    ):
        assert needle in msg, msg


def test_data_parallel_prefix_hint(torch_net):
    sd = {f"module.{k}": v for k, v in torch_net.state_dict().items()}
    with pytest.raises(WeightFileError, match=r"module\.state_dict"):
        jaxnet.params_from_torch(sd)


def test_bad_values_and_dtypes(torch_net):
    sd = dict(torch_net.state_dict())
    sd["fc2.bias"] = sd["fc2.bias"].clone()
    sd["fc2.bias"][3] = float("nan")
    with pytest.raises(WeightFileError, match=r"fc2\.bias holds NaN"):
        jaxnet.params_from_torch(sd)
    sd = dict(torch_net.state_dict())
    sd["fc3.bias"] = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(WeightFileError, match=r"fc3\.bias has dtype int64"):
        jaxnet.params_from_torch(sd)
    sd = dict(torch_net.state_dict())
    sd["fc3.bias"] = "zeros"
    with pytest.raises(WeightFileError, match=r"not a tensor|expected a torch\.Tensor"):
        jaxnet.params_from_torch(sd)


def test_params_to_torch_is_strict(params0):
    params = dict(params0)
    params.pop("fc2")
    params["conv1"] = {"kernel": jnp.zeros((3, 3, 1, 7)), "bias": jnp.zeros(6)}
    with pytest.raises(WeightFileError) as info:
        jaxnet.params_to_torch(params)
    msg = str(info.value)
    assert "fc2/kernel" in msg and "fc2/bias" in msg and "conv1/kernel: got (3, 3, 1, 7)" in msg


def test_state_dict_shape_table_matches_torch():
    for n in (2, 10):
        ref = {k: tuple(v.shape) for k, v in TorchNet(n).state_dict().items()}
        assert torch_state_dict_shapes(n) == ref


def test_layout_helpers_invert_each_other(torch_net):
    x = np.arange(2 * 1 * 32 * 32, dtype=np.float32).reshape(2, 1, 32, 32)
    assert jaxnet.nchw_to_nhwc(x).shape == (2, 32, 32, 1)
    assert np.array_equal(jaxnet.nhwc_to_nchw(jaxnet.nchw_to_nhwc(x)), x)
    assert np.array_equal(jaxnet.nhwc_to_nchw(jnp.asarray(jaxnet.nchw_to_nhwc(x))), x)
    t = torch.from_numpy(x)
    assert torch.equal(jaxnet.nhwc_to_nchw(jaxnet.nchw_to_nhwc(t)), t)
    # A batch converted back for torch feeds TorchNet directly (its forward uses x.view).
    with torch.no_grad():
        torch_net(torch.from_numpy(jaxnet.nhwc_to_nchw(jaxnet.nchw_to_nhwc(x))))


def test_written_files_get_the_umask_mode(tmp_path, torch_net):
    path = tmp_path / "net.safetensors"
    jaxnet.params_to_torch(jaxnet.params_from_torch(torch_net.state_dict()), path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_pytorch_checkpoint_dicts_load_their_model_weights(tmp_path, torch_net):
    """The PyTorch tutorials' ``{"epoch", "model_state_dict", "optimizer_state_dict", ...}``
    and Lightning's ``{"state_dict": ...}``: the weights under the key, which is named."""
    from jaxnet.convert import read_state_dict

    sd = torch_net.state_dict()
    want = jaxnet.params_from_torch(sd)
    opt = torch.optim.SGD(torch_net.parameters(), lr=0.1, momentum=0.9)
    saved = {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict()}
    for key, whole in [
        ("model_state_dict", {**saved, "loss": 0.25}),
        ("state_dict", {"state_dict": sd}),
    ]:
        path = tmp_path / f"{key}.pt"
        torch.save(whole, path)
        _got, used, read = read_state_dict(path)
        assert used == key and set(read) == set(whole)
        jax.tree.map(np.testing.assert_array_equal, jaxnet.params_from_torch(path), want)
    torch.save({"epoch": 3, "weights": sd}, tmp_path / "other.pt")
    with pytest.raises(WeightFileError, match=r"keys \['epoch', 'weights'\].*model_state_dict"):
        jaxnet.params_from_torch(tmp_path / "other.pt")


def test_bfloat16_safetensors_load_like_bfloat16_pt(tmp_path, torch_net):
    from safetensors.torch import save_file

    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in torch_net.state_dict().items()}
    save_file(bf16, tmp_path / "w.safetensors")
    torch.save(bf16, tmp_path / "w.pt")
    from_st = jaxnet.params_from_torch(tmp_path / "w.safetensors")
    jax.tree.map(
        np.testing.assert_array_equal, from_st, jaxnet.params_from_torch(tmp_path / "w.pt")
    )


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t: t.to_sparse(), "sparse tensor"),
        (lambda t: t.to(torch.float8_e4m3fn), "float8"),
        (lambda t: torch.empty(t.shape, device="meta"), "meta tensor"),
    ],
)
def test_sparse_float8_and_meta_tensors_are_refused_by_name(torch_net, make, message):
    sd = dict(torch_net.state_dict())
    sd["fc2.bias"] = make(sd["fc2.bias"])
    with pytest.raises(WeightFileError, match=rf"'fc2\.bias'.*{message}"):
        jaxnet.params_from_torch(sd)


def test_an_empty_pt_file_is_refused_by_name(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(WeightFileError, match=r"empty\.pt is not a PyTorch state_dict file"):
        jaxnet.params_from_torch(tmp_path / "empty.pt")
