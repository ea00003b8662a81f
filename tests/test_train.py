"""loss_fn / train_step / eval_step against PyTorch's backward() and torch.optim.SGD."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import (
    JAX_CRITERIA,
    make_targets,
    max_abs_diff_params,
    to_jax_batch,
    torch_criteria,
)

import jaxnet
from jaxnet.torch_reference import make_torch_net


def _torch_grads(torch_net, criterion, x, t):
    torch_net.zero_grad()
    loss = criterion(torch_net(x), t)
    loss.backward()
    return float(loss), {n: p.grad.double().numpy() for n, p in torch_net.named_parameters()}


@pytest.mark.parametrize("loss_name", list(JAX_CRITERIA))
def test_gradients_match_backward(net, images, loss_name, record_property):
    """Every parameter's gradient equals loss.backward()'s, to the float32 noise floor."""
    target = make_targets(loss_name, images.shape[0])
    torch_net = make_torch_net(0)
    params = jaxnet.params_from_torch(torch_net.state_dict())
    (loss, _), grads = jax.value_and_grad(jaxnet.loss_fn, has_aux=True)(
        params, net.apply, to_jax_batch(images, target), JAX_CRITERIA[loss_name]
    )
    torch_loss, torch_grads = _torch_grads(torch_net, torch_criteria()[loss_name], images, target)
    # Noise floor: the same gradients in float64 from the same start.
    t64 = make_torch_net(0, dtype=torch.float64)
    _, grads64 = _torch_grads(
        t64,
        torch_criteria()[loss_name],
        images.double(),
        target.double() if target.is_floating_point() else target,
    )
    ours = jaxnet.params_to_torch(grads, as_numpy=True)
    assert sorted(ours) == sorted(torch_grads)
    diff = max(float(np.abs(ours[k] - torch_grads[k]).max()) for k in ours)
    floor = max(float(np.abs(grads64[k] - torch_grads[k]).max()) for k in ours)
    record_property("max_abs_grad_diff", diff)
    record_property("grad_noise_floor", floor)
    print(f"{loss_name}: grads max |jaxnet - torch| = {diff:.3g}, torch f32-vs-f64 = {floor:.3g}")
    assert float(loss) == pytest.approx(torch_loss, rel=1e-6, abs=1e-7)
    assert diff <= 4 * floor + 1e-9


SGD_CASES = {
    "tutorial": ("l1", {"lr": 0.01}),
    "momentum": ("cross_entropy", {"lr": 0.05, "momentum": 0.9}),
    "nesterov": ("mse", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    "weight_decay": ("cross_entropy", {"lr": 0.05, "weight_decay": 0.1}),
    "dampening": ("kl_div", {"lr": 0.05, "momentum": 0.9, "dampening": 0.5}),
    "maximize": ("l1", {"lr": 0.01, "momentum": 0.5, "maximize": True}),
    "all": ("cross_entropy", {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.01, "nesterov": True}),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_steps_match_torch(net, case, record_property):
    """Params after step 1 (from identical params) and after step 3 (momentum and dampening act
    from step 2 on) equal torch.optim.SGD's."""
    loss_name, hyper = SGD_CASES[case]
    torch_net = make_torch_net(0)
    opt = torch.optim.SGD(torch_net.parameters(), **hyper)
    state = jaxnet.TrainState.create(
        apply_fn=net.apply,
        params=jaxnet.params_from_torch(torch_net.state_dict()),
        tx=jaxnet.optim.sgd(**hyper),
    )
    gen = torch.Generator().manual_seed(11)
    diffs = []
    for step in range(3):
        x = torch.randn(8, 1, 32, 32, generator=gen)
        t = make_targets(loss_name, 8, seed=step)
        opt.zero_grad()
        torch_criteria()[loss_name](torch_net(x), t).backward()
        opt.step()
        state, _ = jaxnet.train_step(state, to_jax_batch(x, t), JAX_CRITERIA[loss_name])
        diffs.append(max(max_abs_diff_params(state.params, torch_net).values()))
    record_property("max_abs_param_diff_step1", diffs[0])
    record_property("max_abs_param_diff_step3", diffs[2])
    print(f"sgd {case}: params max |diff| step 1 = {diffs[0]:.3g}, step 3 = {diffs[2]:.3g}")
    assert int(state.step) == 3
    assert diffs[0] <= 1e-6 and diffs[2] <= 1e-6


def test_tutorial_step_changes_params_as_torch(net, images):
    """The tutorial: L1 loss on a random (1, 2) target, one SGD(lr=0.01) step."""
    x, target = images[:1], torch.randn(2, generator=torch.Generator().manual_seed(0)).view(1, -1)
    torch_net = make_torch_net(0)
    before = jaxnet.params_from_torch(torch_net.state_dict())
    state = jaxnet.TrainState.create(apply_fn=net.apply, params=before, tx=jaxnet.optim.sgd(0.01))
    state, metrics = jaxnet.train_step(state, to_jax_batch(x, target), jaxnet.losses.l1_loss)
    torch_net.zero_grad()
    torch.nn.L1Loss()(torch_net(x), target).backward()
    torch.optim.SGD(torch_net.parameters(), lr=0.01).step()
    assert max(max_abs_diff_params(state.params, torch_net).values()) <= 1e-6
    assert not np.array_equal(before["fc3"]["bias"], state.params["fc3"]["bias"])
    with torch.no_grad():
        after_torch = float(torch.nn.L1Loss()(torch_net(x), target))
    after = jaxnet.eval_step(state, to_jax_batch(x, target), jaxnet.losses.l1_loss)["loss"]
    assert float(after) == pytest.approx(after_torch, rel=1e-5)
    assert float(after) < float(metrics["loss"])


def _flat(arrays):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["cross_entropy", "l1"])
def test_20_step_trajectory_within_float32_noise(net, loss_name, record_property):
    """Relative L2 distance of all params after 20 steps: jaxnet-vs-torch(float32) stays below
    2x the distance torch(float32)-vs-torch(float64) from the same start (measured: ~0.1x)."""
    hyper = {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    t32, t64 = make_torch_net(0), make_torch_net(0, dtype=torch.float64)
    o32 = torch.optim.SGD(t32.parameters(), **hyper)
    o64 = torch.optim.SGD(t64.parameters(), **hyper)
    state = jaxnet.TrainState.create(
        apply_fn=net.apply,
        params=jaxnet.params_from_torch(t32.state_dict()),
        tx=jaxnet.optim.sgd(**hyper),
    )
    gen = torch.Generator().manual_seed(5)
    crit = torch_criteria()[loss_name]
    for step in range(20):
        x = torch.randn(16, 1, 32, 32, generator=gen)
        t = make_targets(loss_name, 16, seed=100 + step)
        for tn, opt, dtype in ((t32, o32, torch.float32), (t64, o64, torch.float64)):
            opt.zero_grad()
            crit(tn(x.to(dtype)), t.to(dtype) if t.is_floating_point() else t).backward()
            opt.step()
        state, _ = jaxnet.train_step(state, to_jax_batch(x, t), JAX_CRITERIA[loss_name])
    ref = _flat(v.numpy() for v in t64.state_dict().values())
    f32 = _flat(v.numpy() for v in t32.state_dict().values())
    ours = _flat(jaxnet.params_to_torch(state.params, as_numpy=True).values())
    floor = np.linalg.norm(f32 - ref) / np.linalg.norm(ref)
    drift = np.linalg.norm(ours - f32) / np.linalg.norm(ref)
    record_property("rel_l2_drift", drift)
    record_property("rel_l2_noise_floor", floor)
    print(f"20 steps {loss_name}: jaxnet-vs-torch32 {drift:.3g}, torch32-vs-torch64 {floor:.3g}")
    assert 0 < floor and drift <= 2 * floor


def test_train_step_compiles_once(net):
    params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    state = jaxnet.TrainState.create(apply_fn=net.apply, params=params, tx=jaxnet.optim.sgd(0.01))
    batch = (jnp.zeros((4, 32, 32, 1)), jnp.zeros((4,), jnp.int32))
    state, _ = jaxnet.train_step(state, batch, jaxnet.losses.cross_entropy)
    before = jaxnet.train_step._cache_size()
    for i in range(5):
        images = jax.random.normal(jax.random.key(i), (4, 32, 32, 1))
        state, _ = jaxnet.train_step(state, (images, batch[1]), jaxnet.losses.cross_entropy)
    assert jaxnet.train_step._cache_size() == before
    # A new batch shape is one more compilation, as expected.
    jaxnet.train_step(
        state, (jnp.zeros((2, 32, 32, 1)), jnp.zeros((2,), jnp.int32)), jaxnet.losses.cross_entropy
    )
    assert jaxnet.train_step._cache_size() == before + 1


def test_eval_step_and_metrics(net):
    params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    state = jaxnet.create_train_state(jax.random.key(0), net, jaxnet.optim.sgd(0.1), params=params)
    images = jax.random.normal(jax.random.key(1), (6, 32, 32, 1))
    logits = net.apply({"params": params}, images)
    labels = jnp.argmax(logits, -1).at[0].set(1 - jnp.argmax(logits[0]))
    metrics = jaxnet.eval_step(state, (images, labels), jaxnet.losses.cross_entropy)
    assert float(metrics["accuracy"]) == pytest.approx(5 / 6)
    assert float(metrics["loss"]) == pytest.approx(
        float(jaxnet.losses.cross_entropy(logits, labels)), rel=1e-6
    )
    regression = jaxnet.eval_step(state, (images, jnp.zeros((6, 2))), jaxnet.losses.mse_loss)
    assert set(regression) == {"loss"}


def test_train_step_rejects_out_of_range_labels(net):
    params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    state = jaxnet.TrainState.create(apply_fn=net.apply, params=params, tx=jaxnet.optim.sgd(0.1))
    batch = (jnp.zeros((3, 32, 32, 1)), jnp.array([0, 1, 7]))
    with pytest.raises(Exception, match=r"labels must lie in \[0, 2\)"):
        jax.block_until_ready(jaxnet.train_step(state, batch, jaxnet.losses.cross_entropy))
    with pytest.raises(Exception, match=r"labels must lie in \[0, 2\)"):
        jax.block_until_ready(jaxnet.eval_step(state, batch, jaxnet.losses.cross_entropy))


# A criterion partial with its own ignore_index: module level, so the static argument is the
# same object in every call.
CE_IGNORING_5 = functools.partial(jaxnet.losses.cross_entropy, ignore_index=5)


def test_label_guard_follows_the_criterions_ignore_index(net):
    from jaxnet.train import CRITERIA, ignored_label

    assert ignored_label(jaxnet.losses.cross_entropy) == -100
    assert ignored_label(CE_IGNORING_5) == 5
    assert ignored_label(functools.partial(CE_IGNORING_5, label_smoothing=0.1)) == 5
    assert ignored_label(CRITERIA["mse"]) is None
    params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    state = jaxnet.TrainState.create(apply_fn=net.apply, params=params, tx=jaxnet.optim.sgd(0.1))
    images = jax.random.normal(jax.random.key(1), (4, 32, 32, 1))
    # With ignore_index=5 a 2-class net may get label 5: skipped by the loss, allowed by the
    # guard, left out of the accuracy.
    labels = jnp.array([0, 5, 1, 5])
    metrics = jaxnet.eval_step(state, (images, labels), CE_IGNORING_5)
    jax.block_until_ready(jaxnet.train_step(state, (images, labels), CE_IGNORING_5))
    logits = net.apply({"params": params}, images)
    hits = np.asarray(jnp.argmax(logits, -1) == labels)[[0, 2]]
    assert float(metrics["accuracy"]) == pytest.approx(hits.mean())
    # -100 is torch's default only: with ignore_index=5 it is out of range.
    with pytest.raises(Exception, match=r"labels must lie in \[0, 2\)"):
        batch = (images, jnp.array([0, -100, 0, 1]))
        jax.block_until_ready(jaxnet.train_step(state, batch, CE_IGNORING_5))
    # mse on labels has no ignore_index: -100 would silently become an all-zero one-hot target.
    with pytest.raises(Exception, match=r"labels must lie in \[0, 2\)"):
        batch = (images, jnp.array([0, -100, 0, 1]))
        jax.block_until_ready(jaxnet.train_step(state, batch, CRITERIA["mse"]))


def test_train_step_rejects_wrong_target_shape(net):
    params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    state = jaxnet.TrainState.create(apply_fn=net.apply, params=params, tx=jaxnet.optim.sgd(0.1))
    with pytest.raises(ValueError, match="differs"):
        jaxnet.train_step(
            state, (jnp.zeros((3, 32, 32, 1)), jnp.zeros((3,))), jaxnet.losses.l1_loss
        )
    with pytest.raises(ValueError, match="one target row per image"):
        jaxnet.train_step(
            state,
            (jnp.zeros((3, 32, 32, 1)), jnp.zeros((4,), jnp.int32)),
            jaxnet.losses.cross_entropy,
        )
    with pytest.raises(ValueError, match="NCHW"):
        jaxnet.train_step(
            state, (jnp.zeros((3, 1, 32, 32)), jnp.zeros((3, 2))), jaxnet.losses.l1_loss
        )


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": -1.0},
        {"momentum": -0.1},
        {"weight_decay": -1.0},
        {"nesterov": True},
        {"momentum": 0.9, "dampening": 0.1, "nesterov": True},
    ],
)
def test_sgd_rejects_what_torch_rejects(bad):
    kwargs = {"lr": 0.1, **bad}
    with pytest.raises(ValueError):
        jaxnet.optim.sgd(**kwargs)
    with pytest.raises(ValueError):
        torch.optim.SGD(make_torch_net(0).parameters(), **kwargs)
