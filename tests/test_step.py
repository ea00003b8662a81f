"""jaxnet.step: loss_fn / compute_grads / apply_gradients / train_step and its variants /
eval_step / per_example_grad_norms, against PyTorch's backward() and torch.optim.SGD.

The steps are jitted with the state's ``apply_fn`` and ``tx`` static: the tests share one
``Net`` (conftest's ``NET``), one optimizer (``SGD``) and batches of ``B`` examples, so most of
them reuse a compiled step instead of compiling their own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CRITERIA,
    NET,
    SGD,
    labels,
    max_abs_diff_params,
    to_jax_batch,
)

import jaxnet
from jaxnet import losses
from jaxnet.criteria import criterion
from jaxnet.step import _after_gradients, apply_gradients, compute_grads
from jaxnet.torch_reference import make_torch_net

B = 8  # examples per batch, wherever the check does not depend on the size


def _data(n: int = B, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal((n, 32, 32, 1), dtype=np.float32)),
        jnp.asarray(rng.integers(0, 2, n).astype(np.int32)),
    )


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _state(params, tx=SGD, net=NET) -> jaxnet.TrainState:
    return jaxnet.create_train_state(None, net, tx, params)


def _assert_same_bits(a, b) -> None:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------
# Gradients and steps against PyTorch
# ---------------------------------------------------------------------------------------------


def _torch_grads(torch_net, crit, x, t):
    torch_net.zero_grad()
    loss = crit(torch_net(x), t)
    loss.backward()
    return loss.item(), {n: p.grad.double().numpy() for n, p in torch_net.named_parameters()}


# Jitted once per criterion and batch shape, shared by the tests below.
_compute_grads = jax.jit(compute_grads, static_argnames=("apply_fn", "criterion"))
_apply_gradients = jax.jit(apply_gradients)
_apply_in_place = jax.jit(functools.partial(apply_gradients, in_place=True))


@pytest.mark.parametrize("loss_name", CRITERIA)
def test_gradients_match_backward(net, images, loss_name, record_property):
    """Every parameter's gradient equals loss.backward()'s, to the float32 noise floor."""
    crit = criterion(loss_name)
    images = images[:B]  # B, as the SGD cases below: they reuse this compiled gradient
    target = labels(B)
    torch_net = make_torch_net(0)
    params = jaxnet.params_from_torch(torch_net.state_dict())
    grads, loss, _ = _compute_grads(params, net.apply, to_jax_batch(images, target), crit)
    torch_loss, torch_grads = _torch_grads(torch_net, crit.torch, images, target)
    # Noise floor: the same gradients in float64 from the same start.
    t64 = make_torch_net(0, dtype=torch.float64)
    _, grads64 = _torch_grads(t64, crit.torch, images.double(), target)
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
    "weight_decay": ("kl_div_smoothed", {"lr": 0.05, "weight_decay": 0.1}),
    "dampening": ("kl_div", {"lr": 0.05, "momentum": 0.9, "dampening": 0.5}),
    "maximize": ("l1", {"lr": 0.01, "momentum": 0.5, "maximize": True}),
    "all": ("cross_entropy", {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.01, "nesterov": True}),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd_steps_match_torch(net, case, record_property):
    """Params after step 1 (from identical params) and after step 3 (momentum and dampening act
    from step 2 on) equal torch.optim.SGD's.

    The step is train_step's two halves, ``compute_grads`` then ``apply_gradients`` (equal to
    it bit for bit: test_compute_grads_and_apply_gradients_are_train_step_bit_for_bit), so the
    gradient's compilation is the one test_gradients_match_backward made for the criterion and
    only each optimizer's update is compiled here."""
    loss_name, hyper = SGD_CASES[case]
    crit = criterion(loss_name)
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
        x = torch.randn(B, 1, 32, 32, generator=gen)
        t = labels(B, seed=step)
        opt.zero_grad()
        crit.torch(torch_net(x), t).backward()
        opt.step()
        grads, _, _ = _compute_grads(state.params, state.apply_fn, to_jax_batch(x, t), crit)
        state = _apply_gradients(state, grads)
        diffs.append(max(max_abs_diff_params(state.params, torch_net).values()))
    record_property("max_abs_param_diff_step1", diffs[0])
    record_property("max_abs_param_diff_step3", diffs[2])
    print(f"sgd {case}: params max |diff| step 1 = {diffs[0]:.3g}, step 3 = {diffs[2]:.3g}")
    assert int(state.step) == 3
    assert diffs[0] <= 1e-6 and diffs[2] <= 1e-6


def _torch_step(net, x, y, lr=0.01):
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    xt = torch.from_numpy(jaxnet.nhwc_to_nchw(np.array(x)).copy())
    xt = xt.to(next(net.parameters()).dtype)
    opt.zero_grad()
    out = net(xt)
    loss = F.cross_entropy(out, torch.from_numpy(np.array(y)).long())
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in net.named_parameters()}
    opt.step()
    return out.detach(), loss.detach(), grads, net.state_dict()


@pytest.fixture(scope="module")
def torch_step_reference():
    """One SGD(0.01, momentum 0.9) step of torch's Net from seed 3 on ``_data()``, in float32
    and (the noise floor) float64: ``(params before, float32 results, float64 results)``."""
    x, y = _data()
    tnet, tnet64 = make_torch_net(3), make_torch_net(3, dtype=torch.float64)
    params = jaxnet.params_from_torch(tnet.state_dict())
    return params, _torch_step(tnet, x, y), _torch_step(tnet64, x, y)


@pytest.mark.parametrize("step", ["train_step", "train_step_donated"])
def test_train_step_matches_pytorch(step, torch_step_reference):
    x, y = _data()
    params, (t_out, t_loss, t_grads, t_after), (t64_out, _, g64, _) = torch_step_reference
    state = _state(params)

    grads, loss, out = _compute_grads(state.params, state.apply_fn, (x, y), losses.cross_entropy)
    state, metrics = getattr(jaxnet, step)(state, (x, y))

    # The float32 noise floor: torch float32 against torch float64 from the same start.
    floor_out = _max_abs(t_out, t64_out)
    assert _max_abs(out, t_out) <= max(1e-6, 10 * floor_out)
    assert abs(float(loss) - float(t_loss)) <= 1e-6
    assert abs(float(metrics["loss"]) - float(t_loss)) <= 1e-6

    g_as_torch = jaxnet.params_to_torch(grads, as_numpy=True)
    for k, g in g_as_torch.items():
        scale = float(t_grads[k].abs().max()) + 1e-12
        floor = _max_abs(t_grads[k], g64[k]) / scale
        assert _max_abs(g, t_grads[k]) / scale <= max(1e-5, 10 * floor), k
    new_as_torch = jaxnet.params_to_torch(state.params, as_numpy=True)
    for k, v in new_as_torch.items():
        assert _max_abs(v, t_after[k]) <= 1e-6, k


# ---------------------------------------------------------------------------------------------
# The pieces and the variants: equal to train_step
# ---------------------------------------------------------------------------------------------


def test_compute_grads_and_apply_gradients_are_train_step_bit_for_bit(params0):
    batch = _data()
    state = _state(params0)
    new, metrics = jaxnet.train_step(state, batch)
    grads, loss, logits = _compute_grads(state.params, NET.apply, batch, losses.cross_entropy)
    assert logits.shape == (B, 2)
    np.testing.assert_array_equal(loss, metrics["loss"])
    for in_place in (False, True):
        stepped = (_apply_gradients if not in_place else _apply_in_place)(state, grads)
        _assert_same_bits(stepped.params, new.params)
        _assert_same_bits(stepped.opt_state, new.opt_state)
        assert int(stepped.step) == int(new.step) == 1
    # compute_grads guards the labels as train_step does.
    bad = (batch[0], batch[1].at[0].set(7))
    with pytest.raises(Exception, match=r"labels must lie in \[0, 2\)"):
        jax.block_until_ready(_compute_grads(state.params, NET.apply, bad, losses.cross_entropy))


def test_train_step_donated_consumes_the_old_state(params0):
    batch = _data()
    state = _state(params0)
    kept = jaxnet.train_step(state, batch)[0]
    # A copy: donation deletes the state's buffers, and params0 is shared with other tests.
    state = state.replace(params=jax.tree.map(jnp.copy, state.params))
    old_kernel = state.params["fc1"]["kernel"]
    new, _ = jaxnet.train_step_donated(state, batch)
    assert old_kernel.is_deleted()
    jax.tree.map(np.testing.assert_array_equal, new.params, kept.params)


STEPS = 3


def _stacked(steps: int = STEPS) -> tuple[np.ndarray, np.ndarray]:
    batches = [_data(seed=s) for s in range(steps)]
    return np.stack([b[0] for b in batches]), np.stack([b[1] for b in batches])


def test_train_steps_equals_step_by_step_loop(params0):
    xs, ys = _stacked()
    state, losses_ = _state(params0), []
    for s in range(STEPS):
        state, m = jaxnet.train_step(state, (jnp.asarray(xs[s]), jnp.asarray(ys[s])))
        losses_.append(float(m["loss"]))
    fused, metrics = jaxnet.train_steps(_state(params0), (jnp.asarray(xs), jnp.asarray(ys)))
    assert metrics["loss"].shape == metrics["accuracy"].shape == (STEPS,)
    np.testing.assert_allclose(metrics["loss"], losses_, rtol=0, atol=1e-6)
    assert int(fused.step) == int(state.step) == STEPS
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), fused.params, state.params
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
        fused.opt_state,
        state.opt_state,
    )
    # Params moved: the comparison above is not of two unchanged states.
    assert _max_abs(fused.params["fc3"]["kernel"], params0["fc3"]["kernel"]) > 1e-4


def test_train_steps_rejects_bad_input(params0):
    xs, ys = _stacked()
    state = _state(params0)
    with pytest.raises(ValueError, match="stack of batches"):
        jaxnet.train_steps(state, (jnp.asarray(xs[:1]), jnp.asarray(ys[:2])))
    bad = ys.copy()
    bad[1, 2] = 2
    # Raised in a host callback: it reaches the caller wrapped in jax's runtime error.
    with pytest.raises((ValueError, jax.errors.JaxRuntimeError), match="class labels"):
        out = jaxnet.train_steps(state, (jnp.asarray(xs), jnp.asarray(bad)))
        jax.block_until_ready(out)


def test_bfloat16_compute_keeps_float32_params(params0):
    batch = _data()
    net16 = jaxnet.Net(dtype=jnp.bfloat16)
    s16, s32 = _state(params0, net=net16), _state(params0)
    assert net16.apply({"params": params0}, batch[0]).dtype == jnp.bfloat16
    s16, m16 = jaxnet.train_step(s16, batch)
    s32, m32 = jaxnet.train_step(s32, batch)
    assert m16["loss"].dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(s16.params))
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 2e-2  # bf16 has 8 mantissa bits
    d16 = s16.params["fc1"]["kernel"] - params0["fc1"]["kernel"]
    d32 = s32.params["fc1"]["kernel"] - params0["fc1"]["kernel"]
    cos = float(jnp.vdot(d16, d32) / (jnp.linalg.norm(d16) * jnp.linalg.norm(d32)))
    assert cos > 0.99  # the bf16 step points where the float32 step does


def test_in_place_ordering_leaves_params_bit_exact():
    params = {"a": jnp.array([-0.0, 0.0, 1.5, -jnp.inf, jnp.nan]), "b": jnp.array([[2.0]])}
    ordered = jax.jit(_after_gradients)
    for g0 in (jnp.nan, jnp.inf, -jnp.inf, -3.0, -0.0, 7.0):
        grads = {"a": jnp.full((5,), g0), "b": jnp.array([[g0]])}
        out = ordered(grads, params)
        for k in params:  # compare bits: -0.0 stays -0.0, NaN stays NaN
            np.testing.assert_array_equal(
                np.asarray(out[k]).view(np.uint32), np.asarray(params[k]).view(np.uint32)
            )


# ---------------------------------------------------------------------------------------------
# Compilation, metrics, and the input checks
# ---------------------------------------------------------------------------------------------


def test_train_step_compiles_once(params0):
    state = _state(params0)
    x, y = _data()
    state, _ = jaxnet.train_step(state, (x, y), losses.cross_entropy)
    before = jaxnet.train_step._cache_size()
    for i in range(3):
        state, _ = jaxnet.train_step(state, (x + i, y), losses.cross_entropy)
    assert jaxnet.train_step._cache_size() == before
    # A new batch shape is one more compilation, as expected.
    jaxnet.train_step(state, (x[:2], y[:2]), losses.cross_entropy)
    assert jaxnet.train_step._cache_size() == before + 1


def test_eval_step_and_metrics(params0):
    state = _state(params0)
    images, _ = _data(seed=1)
    logits = NET.apply({"params": params0}, images)
    labels_ = jnp.argmax(logits, -1).at[0].set(1 - jnp.argmax(logits[0]))
    metrics = jaxnet.eval_step(state, (images, labels_), losses.cross_entropy)
    assert float(metrics["accuracy"]) == pytest.approx((B - 1) / B)
    assert float(metrics["loss"]) == pytest.approx(
        float(losses.cross_entropy(logits, labels_)), rel=1e-6
    )
    regression = jaxnet.eval_step(state, (images, jnp.zeros((B, 2))), losses.mse_loss)
    assert set(regression) == {"loss"}


def test_train_step_rejects_out_of_range_labels(params0):
    state = _state(params0)
    x, y = _data()
    batch = (x, y.at[2].set(7))
    # Concrete labels are checked on the host, before the step is dispatched.
    for bad in (batch, (x, np.asarray(batch[1])), (x, np.asarray(y) - 1)):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
            jaxnet.train_step(state, bad, losses.cross_entropy)
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
            jaxnet.eval_step(state, bad, losses.cross_entropy)
    with pytest.raises(ValueError, match=r"found values from 0 to 7"):
        jaxnet.train_steps(state, (x[None], batch[1][None]), losses.cross_entropy)
    # Traced labels (a step inside the caller's jit) are checked by the step itself.
    in_jit = jax.jit(lambda s, b: jaxnet.eval_step(s, b, losses.cross_entropy))
    with pytest.raises(Exception, match=r"labels must lie in \[0, 2\)"):
        jax.block_until_ready(in_jit(state, batch))


def test_the_dispatched_steps_have_no_host_callback_when_labels_were_checked(params0):
    # A host callback takes every call off JAX's fast C++ dispatch path (0.3-1 ms per call).
    state = _state(params0)
    batch = _data()
    for step in (jaxnet.eval_step, jaxnet.train_step):
        lowered = step.lower(state, batch, losses.cross_entropy).as_text()  # what a call runs
        assert "callback" not in lowered
        assert "callback" in step.lower(state, batch, losses.cross_entropy, guard=True).as_text()


def test_the_host_label_check_reads_the_class_count_off_the_model():
    net10 = jaxnet.Net(num_classes=10)
    params = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jaxnet.model.abstract_params(net10)
    )
    state = _state(params, net=net10)
    x, _ = _data()
    ok = (x, jnp.arange(B) + 2)  # labels 2..9: fine for 10 classes
    assert jaxnet.step._labels_checked_on_host(state, ok, losses.cross_entropy)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        jaxnet.step._labels_checked_on_host(state, (x, jnp.arange(B) + 3), losses.cross_entropy)
    one_hot = (x, jnp.zeros((B, 10)))  # not class indices: nothing to check
    assert jaxnet.step._labels_checked_on_host(state, one_hot, losses.mse_loss)


# A criterion partial with its own ignore_index: module level, so the static argument is the
# same object in every call.
CE_IGNORING_5 = functools.partial(losses.cross_entropy, ignore_index=5)


def test_label_guard_follows_the_criterions_ignore_index(params0):
    state = _state(params0)
    images, _ = _data(seed=1)
    # With ignore_index=5 a 2-class net may get label 5: skipped by the loss, allowed by the
    # guard, left out of the accuracy.
    labels_ = jnp.array([0, 5, 1, 5, 1, 1, 0, 5])
    metrics = jaxnet.eval_step(state, (images, labels_), CE_IGNORING_5)
    jax.block_until_ready(jaxnet.train_step(state, (images, labels_), CE_IGNORING_5))
    logits = NET.apply({"params": params0}, images)
    kept = np.asarray(labels_) != 5
    hits = np.asarray(jnp.argmax(logits, -1) == labels_)[kept]
    assert float(metrics["accuracy"]) == pytest.approx(hits.mean())
    with_minus_100 = (images, jnp.array([0, -100, 0, 1, 1, 1, 0, 0]))
    # -100 is torch's default only: with ignore_index=5 it is out of range.
    with pytest.raises(Exception, match=r"labels must lie in \[0, 2\)"):
        jax.block_until_ready(jaxnet.train_step(state, with_minus_100, CE_IGNORING_5))
    # The registry's one-hot criteria have no ignore_index: -100 would silently become an
    # all-zero target.
    with pytest.raises(Exception, match=r"labels must lie in \[0, 2\)"):
        jax.block_until_ready(jaxnet.train_step(state, with_minus_100, criterion("mse")))


def test_train_step_rejects_wrong_target_shape(params0):
    state = _state(params0)
    with pytest.raises(ValueError, match="differs"):
        jaxnet.train_step(state, (jnp.zeros((3, 32, 32, 1)), jnp.zeros((3,))), losses.l1_loss)
    with pytest.raises(ValueError, match="one target row per image"):
        jaxnet.train_step(
            state,
            (jnp.zeros((3, 32, 32, 1)), jnp.zeros((4,), jnp.int32)),
            losses.cross_entropy,
        )
    with pytest.raises(ValueError, match="NCHW"):
        jaxnet.train_step(state, (jnp.zeros((3, 1, 32, 32)), jnp.zeros((3, 2))), losses.l1_loss)


def test_per_example_grad_norms_match_single_example_grads(params0):
    state = _state(params0)
    x, y = _data(3, seed=4)
    norms = np.asarray(jaxnet.per_example_grad_norms(state, (x, y)))
    assert norms.shape == (3,)
    padded = jaxnet.per_example_grad_norms(state, (x, y), chunk_size=2)  # chunks of 2: 1 padded
    np.testing.assert_allclose(padded, norms, rtol=1e-6)

    @jax.jit
    def grad_of_one(xi, yi):
        return jax.grad(lambda p: jaxnet.loss_fn(p, NET.apply, (xi, yi), losses.cross_entropy)[0])(
            state.params
        )

    for i in range(3):
        g = grad_of_one(x[i : i + 1], y[i : i + 1])
        ref = np.sqrt(sum(float(np.sum(np.square(leaf))) for leaf in jax.tree.leaves(g)))
        np.testing.assert_allclose(norms[i], ref, rtol=1e-5)
