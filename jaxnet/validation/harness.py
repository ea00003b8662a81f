"""The runs a validation compares, each built from the same resolved optimizer spec and
criterion: jaxnet (float32) and PyTorch in float32 and float64, or, for the float64 check,
jaxnet and PyTorch both in float64; and the arithmetic they run under."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax

from jaxnet import optim, schedules, step
from jaxnet.convert import nhwc_to_nchw, params_from_torch, params_to_torch
from jaxnet.criteria import Criterion
from jaxnet.errors import ConfigError
from jaxnet.model import Net
from jaxnet.optim import TORCH_CLASSES, OptimizerSpec

__all__ = ["JaxRun", "TorchRun", "exact_arithmetic", "pick_device", "torch_threads"]

_TORCH_OPTIMIZERS = TORCH_CLASSES
"""jaxnet's optimizer names -> ``torch.optim``'s classes (``jaxnet.optim.TORCH_CLASSES``)."""
SCHEDULER_CLASSES = schedules.TORCH_CLASSES
"""jaxnet's schedule names -> ``torch.optim.lr_scheduler``'s classes
(``jaxnet.schedules.TORCH_CLASSES``)."""


# ---------------------------------------------------------------------------------------------
# jaxnet
# ---------------------------------------------------------------------------------------------


@functools.cache
def _net(num_classes: int) -> Net:
    """One ``Net`` per class count: ``net.apply`` of the same instance is the same static
    argument, so every run with this class count and criterion shares one compile."""
    return Net(num_classes=num_classes)


# Module level and keyed on hashable statics: the expensive compile (the convolutions'
# backward) happens once per (class count, criterion), not once per run.
_compute_grads = jax.jit(step.compute_grads, static_argnames=("apply_fn", "criterion"))


class JaxRun:
    """The jaxnet run: ``jaxnet.step.compute_grads`` then ``apply_gradients``, as in training;
    ``tx`` is ``jaxnet.optim.transform`` of the spec the PyTorch runs are built from."""

    def __init__(
        self, params: Any, num_classes: int, tx: optax.GradientTransformation, crit: Criterion
    ) -> None:
        self.apply_fn = _net(num_classes).apply
        self.criterion = crit
        # The images in the params' precision: float32 batches widen exactly to float64.
        self.dtype = jax.tree.leaves(params)[0].dtype
        self.state = step.TrainState.create(apply_fn=self.apply_fn, params=params, tx=tx)
        # Per run: the optimizer is part of the state, so each run compiles its own update.
        self._apply = jax.jit(step.apply_gradients)

    def step(self, images: np.ndarray, labels: np.ndarray) -> tuple[Any, Any, Any]:
        """One step; ``(loss, logits, grads)`` at the parameters before it."""
        batch = (images.astype(self.dtype), labels.astype(np.int32))
        grads, loss, logits = _compute_grads(
            self.state.params, self.apply_fn, batch, self.criterion
        )
        self.state = self._apply(self.state, grads)
        return loss, logits, grads

    def end_epoch(self, metric: float) -> None:
        """``scheduler.step(metric)`` of a ``reduce_lr_on_plateau`` run (a no-op otherwise)."""
        opt_state = optim.plateau_step(self.state.tx, self.state.opt_state, metric)
        self.state = self.state.replace(opt_state=opt_state)

    def record(self, loss: Any, logits: Any, grads: Any) -> dict[str, Any]:
        """What the comparison reads, in torch's layout."""
        return {
            "loss": float(loss),
            "outputs": np.asarray(logits),
            "grads": params_to_torch(grads, as_numpy=True),
            "params": params_to_torch(self.state.params, as_numpy=True),
        }


def jax_params(net: Any, dtype: Any = np.float32) -> Any:
    """jaxnet's parameters equal to the torch ``net``'s, in ``dtype`` (float64 needs
    ``jax_enable_x64``, e.g. inside ``jax.enable_x64(True)``)."""
    return params_from_torch({k: v.cpu() for k, v in net.state_dict().items()}, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------------


def _torch_optimizer(net: Any, spec: OptimizerSpec, fast: bool) -> Any:
    """``torch.optim.<class>(net.parameters(), **spec.options)``: jaxnet's very arguments."""
    import torch

    options = dict(spec.options)
    if isinstance(options.get("betas"), list):
        options["betas"] = tuple(options["betas"])
    cls = getattr(torch.optim, _TORCH_OPTIMIZERS[spec.name])
    dtype = next(net.parameters()).dtype
    if fast and dtype == torch.float64 and not ({"fused", "foreach"} & set(options)):
        # The float32 check's float64 reference may use torch's fused/foreach kernels: the
        # same algorithm, faster on 6.46 M parameters; their float64 rounding (~1e-16) is
        # invisible next to float32's noise floor (~1e-7 and up). The float64 check keeps
        # torch's default loop, the reference users run (foreach NAdam rounds differently).
        for kernels in ({"fused": True}, {"foreach": True}):
            try:
                return cls(net.parameters(), **options, **kernels)
            except (RuntimeError, TypeError, ValueError):
                continue
    return cls(net.parameters(), **options)


class TorchRun:
    """One PyTorch run: net, optimizer and scheduler, in the net's dtype (``fast``: a float64
    run may use torch's fused/foreach optimizer kernels).

    ``reduce_lr_on_plateau`` is stepped by ``end_epoch(metric)``, every other scheduler after
    every ``spec.schedule_every`` optimizer steps.
    """

    def __init__(self, net: Any, spec: OptimizerSpec, crit: Criterion, fast: bool = False) -> None:
        import torch

        self.net = net
        self.dtype = next(net.parameters()).dtype
        self.device = next(net.parameters()).device
        self.opt = _torch_optimizer(net, spec, fast)
        self.sched = None
        if spec.schedule is not None:
            cls = getattr(torch.optim.lr_scheduler, SCHEDULER_CLASSES[spec.schedule])
            self.sched = cls(self.opt, **spec.schedule_options)
        self.by_metric = spec.schedule == "reduce_lr_on_plateau"
        self.every = spec.schedule_every  # 1 for OneCycleLR: torch steps it every batch
        self.criterion = crit
        self.count = 0

    def _opt_step(self) -> None:
        from jaxnet.torch_reference import torch_default_dtype

        with torch_default_dtype(self.dtype):
            self.opt.step()

    def end_epoch(self, metric: float) -> None:
        """``scheduler.step(metric)`` of a ``reduce_lr_on_plateau`` run (else nothing)."""
        if self.by_metric:
            from jaxnet.torch_reference import torch_default_dtype

            with torch_default_dtype(self.dtype):
                self.sched.step(metric)

    def params(self) -> dict[str, np.ndarray]:
        return {k: p.detach().cpu().numpy() for k, p in self.net.named_parameters()}

    def apply(self, grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One optimizer step with the given gradients (torch layout); the new parameters."""
        import torch

        for k, p in self.net.named_parameters():
            p.grad = torch.from_numpy(np.asarray(grads[k])).to(self.device, self.dtype)
        self._opt_step()
        return self.params()

    def step(self, images_nhwc: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """``zero_grad(); loss.backward(); opt.step(); sched.step()``; what it computed."""
        import torch

        x = torch.from_numpy(nhwc_to_nchw(images_nhwc).copy()).to(self.device, self.dtype)
        y = torch.from_numpy(np.asarray(labels, np.int64)).to(self.device)
        lr = float(self.opt.param_groups[0]["lr"])
        self.opt.zero_grad(set_to_none=True)
        out = self.net(x)
        loss = self.criterion.torch(out, y)
        loss.backward()
        # With zero_grad(set_to_none=True) each step's grads are fresh tensors: no copy needed.
        grads = {k: p.grad.detach().cpu().numpy() for k, p in self.net.named_parameters()}
        self._opt_step()
        self.count += 1
        if self.sched is not None and not self.by_metric and self.count % self.every == 0:
            self.sched.step()
        return {
            "lr": lr,
            "loss": float(loss.item()),
            "outputs": out.detach().cpu().numpy(),
            "grads": grads,
            "params": self.params(),
        }


# ---------------------------------------------------------------------------------------------
# Where and how the runs compute
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op thread count for the run (restored after); ``None`` leaves it."""
    import torch

    if n is None:
        yield
        return
    if n < 1:
        raise ConfigError(f"torch_threads must be positive, got {n}.")
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def exact_arithmetic(torch_device: Any, precision: str = "float32") -> Iterator[None]:
    """Matmuls and convolutions in full ``precision`` in both frameworks, on GPU too.

    ``"float32"``: on GPUs JAX may use TF32/bf16 passes for float32 dots and convolutions
    unless ``jax_default_matmul_precision`` says "float32"; torch uses TF32 for cuDNN
    convolutions by default (and for matmuls when allowed). Both are set here for the run and
    restored after. ``"float64"``: JAX runs with ``jax_enable_x64`` (float64 arrays stay
    float64) and the "highest" matmul precision.
    """
    import torch

    with contextlib.ExitStack() as stack:
        if precision == "float64":
            stack.enter_context(jax.enable_x64(True))
            stack.enter_context(jax.default_matmul_precision("highest"))
        else:
            stack.enter_context(jax.default_matmul_precision("float32"))
        if getattr(torch_device, "type", str(torch_device)) == "cuda":
            saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            stack.callback(_restore_tf32, saved)
        yield


def _restore_tf32(saved: tuple[bool, bool]) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pick_device(device: str) -> Any:
    """The torch device ``device`` names (``"auto"``: CUDA when JAX runs on a GPU, else CPU)."""
    import torch

    if device == "auto":
        on_gpu = jax.default_backend() in ("gpu", "cuda", "rocm") and torch.cuda.is_available()
        device = "cuda" if on_gpu else "cpu"
    try:
        picked = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r} ({e}); use 'auto', 'cpu' or 'cuda'.") from e
    if picked.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: this torch has no CUDA; use 'auto' or 'cpu'.")
    return picked
