"""jaxnet.torch_checkpoint: a trained workdir as the PyTorch tutorials' checkpoint dict, which
torch loads (weights_only) and continues exactly as jaxnet would; and such a dict's optimizer
state back as jaxnet's."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jaxnet import optim
from jaxnet.convert import params_from_torch, params_to_torch
from jaxnet.errors import ConfigError
from jaxnet.torch_checkpoint import (
    opt_state_of_checkpoint,
    read_last_state,
    save_torch_checkpoint,
)

torch = pytest.importorskip("torch")


def test_export_continues_in_torch(reference_run, tmp_path) -> None:
    """The exported dict loads into TorchNet and torch.optim.SGD, and torch's next step equals
    jaxnet's next step from the run's last checkpoint, given the same gradients (float32
    round-off of one step)."""
    from jaxnet.torch_reference import TorchNet

    workdir, _ = reference_run
    out = tmp_path / "run.pt"
    save_torch_checkpoint(workdir, out)
    ckpt = torch.load(out, weights_only=True)
    state, spec, meta = read_last_state(workdir)
    assert ckpt["step"] == int(state.step) > 0 and ckpt["epoch"] == meta["epoch"] - 1 == 2
    assert ckpt["jaxnet"]["torch_class"] == "SGD"

    net = TorchNet()
    net.load_state_dict(ckpt["model_state_dict"])
    opt = torch.optim.SGD(net.parameters(), **ckpt["jaxnet"]["optimizer"]["options"])
    opt.load_state_dict(ckpt["optimizer_state_dict"])
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, 1, 32, 32, generator=gen), torch.randint(0, 2, (16,), generator=gen)
    torch.nn.functional.cross_entropy(net(x), t).backward()
    # jaxnet steps with the same gradients: what is compared is the optimizer state alone.
    grads = params_from_torch({k: p.grad for k, p in net.named_parameters()})
    opt.step()

    updates, _ = optim.transform(spec).update(grads, state.opt_state, state.params)
    ours = params_to_torch(optax.apply_updates(state.params, updates), as_numpy=True)
    for k, p in net.state_dict().items():
        scale = float(np.max(np.abs(p.numpy())))
        assert np.max(np.abs(ours[k] - p.numpy())) <= 1e-6 * scale, k


def test_checkpoint_optimizer_state_back(params0) -> None:
    """A tutorial dict's optimizer state becomes jaxnet's, with the step taken from torch's own
    count, or from ``epoch`` x batches per epoch where torch keeps none and a schedule needs it."""
    ps = [torch.nn.Parameter(t) for t in params_to_torch(params0).values()]
    opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    sched_spec = optim.resolve("sgd", {"lr": 0.1}, "step_lr", {"step_size": 2}, steps_per_epoch=4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    opt.zero_grad(set_to_none=True)
    for _ in range(3):  # epochs completed: the schedule's lr is 0.1 * 0.1 ** (3 // 2)
        opt.step()  # no gradients: nothing moves, but the scheduler sees the order it expects
        sched.step()
    ckpt = {"optimizer_state_dict": opt.state_dict(), "epoch": 3}
    state, step = opt_state_of_checkpoint(ckpt, sched_spec, params0, steps_per_epoch=4)
    assert step == 12 and int(state[-1].count) == 12
    buf = params_from_torch({k: torch.ones_like(v) for k, v in params_to_torch(params0).items()})
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), state[0].trace, buf))
    with pytest.raises(ConfigError, match="no optimizer_state_dict"):
        opt_state_of_checkpoint({"epoch": 1}, sched_spec, params0, steps_per_epoch=4)


def test_import_keeps_and_train_resumes_optimizer_state(params0, tmp_path) -> None:
    """What jaxnet import keeps of a tutorial dict, jaxnet train --resume starts from: the
    torch optimizer's state and step; other settings than the torch run's are refused."""
    from conftest import NET

    from jaxnet.config import TrainConfig, optimizer_spec
    from jaxnet.step import create_train_state
    from jaxnet.torch_checkpoint import keep_optimizer_state, resumed_state

    ps = [torch.nn.Parameter(t) for t in params_to_torch(params0).values()]
    opt = torch.optim.Adam(ps, lr=1e-3)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    assert not keep_optimizer_state({"model_state_dict": {}}, tmp_path)
    assert keep_optimizer_state({"optimizer_state_dict": opt.state_dict(), "epoch": 1}, tmp_path)

    config = TrainConfig(optimizer="adam", lr=1e-3, batch_size=16)
    tx = optim.transform(optimizer_spec(config, 160))
    state = create_train_state(jax.random.key(0), NET, tx, params=params0)
    resumed = resumed_state(tmp_path, config, 160, state)
    assert int(resumed.step) == 2 and int(resumed.opt_state[0].count) == 2
    mu = params_to_torch(resumed.opt_state[0].mu, as_numpy=True)
    np.testing.assert_array_equal(mu["fc1.weight"], opt.state_dict()["state"][4]["exp_avg"])
    other = TrainConfig(optimizer="adam", lr=1e-2, batch_size=16)
    with pytest.raises(ValueError, match=r"lr=0\.001 \(jaxnet's: 0\.01\).*--lr"):
        resumed_state(tmp_path, other, 160, state)
    assert resumed_state(tmp_path / "elsewhere", config, 160, state) is None


def test_cli_round_trip_through_a_torch_checkpoint(reference_run, tmp_path, capsys) -> None:
    """jaxnet export --format torch-checkpoint, then jaxnet import of that dict and train
    --resume: the new run starts from the exported weights, optimizer state and step."""
    from conftest import small

    from jaxnet.cli import main
    from jaxnet.errors import EXIT_BAD_INPUT
    from jaxnet.train import train_and_evaluate
    from jaxnet.workdir import load_params

    workdir, _ = reference_run
    out = tmp_path / "run.pt"
    args = ["export", str(out), "--workdir", str(workdir), "--format", "torch-checkpoint"]
    assert main(args) == 0
    assert "optimizer_state_dict of torch.optim.SGD" in capsys.readouterr().out
    assert main(args) == EXIT_BAD_INPUT  # nothing replaced without --overwrite
    exported = torch.load(out, weights_only=True)

    again = tmp_path / "imported"
    assert main(["import", str(out), "--workdir", str(again)]) == 0
    assert "optimizer state" in capsys.readouterr().out
    assert (again / "torch_optimizer.pt").is_file()
    result = train_and_evaluate(small(epochs=1, resume=True), again)
    steps_per_epoch = 8  # small(): 128 training examples in batches of 16
    assert int(result.state.step) == exported["step"] + steps_per_epoch
    last, _, _ = load_params(again, "last")
    assert not np.array_equal(
        np.asarray(last["fc3"]["bias"]), exported["model_state_dict"]["fc3.bias"]
    )
    # --overwrite deletes the kept optimizer state with the checkpoints it belongs to.
    train_and_evaluate(small(epochs=1, overwrite=True), again)
    assert not (again / "torch_optimizer.pt").exists()
