"""jaxnet: the PyTorch tutorial's ``Net`` and its training, in functional JAX/Flax.

``jaxnet.torch_reference`` (the PyTorch original) is imported only on request and needs torch.
"""

from jaxnet import data, losses, optim, schedules
from jaxnet.convert import (
    WeightFileError,
    check_nhwc_images,
    nchw_to_nhwc,
    nhwc_to_nchw,
    params_from_torch,
    params_to_torch,
)
from jaxnet.errors import JaxnetError
from jaxnet.export import jaxnet_version
from jaxnet.model import Net, summary
from jaxnet.optstate import opt_state_from_torch, opt_state_to_torch
from jaxnet.step import (
    TrainState,
    create_train_state,
    eval_step,
    loss_fn,
    per_example_grad_norms,
    train_step,
    train_step_donated,
    train_steps,
)
from jaxnet.train import TrainConfig, evaluate, train_and_evaluate, train_epoch
from jaxnet.validation import validate

__version__ = jaxnet_version()  # pyproject.toml's, as installed

__all__ = [
    "JaxnetError",
    "Net",
    "TrainConfig",
    "TrainState",
    "WeightFileError",
    "check_nhwc_images",
    "create_train_state",
    "data",
    "eval_step",
    "evaluate",
    "loss_fn",
    "losses",
    "nchw_to_nhwc",
    "nhwc_to_nchw",
    "opt_state_from_torch",
    "opt_state_to_torch",
    "optim",
    "params_from_torch",
    "params_to_torch",
    "per_example_grad_norms",
    "schedules",
    "summary",
    "train_and_evaluate",
    "train_epoch",
    "train_step",
    "train_step_donated",
    "train_steps",
    "validate",
]
