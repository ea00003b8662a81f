"""The tutorial's PyTorch ``Net``, the reference jaxnet is checked against.

Importing this module needs PyTorch; ``import jaxnet`` does not import it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TorchNet", "make_torch_net", "torch_default_dtype"]


class TorchNet(nn.Module):
    """The tutorial's ``Net``, verbatim apart from ``num_classes`` (2 in the tutorial).

    Input ``(N, 1, 32, 32)`` NCHW; output ``(N, num_classes)``.
    """

    def __init__(self, num_classes: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 28 * 28, 512)
        self.fc2 = nn.Linear(512, 64)
        self.fc3 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = x.view(-1, 16 * 28 * 28)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def make_torch_net(seed: int, num_classes: int = 2, dtype: torch.dtype = torch.float32) -> TorchNet:
    """A PyTorch-initialised ``TorchNet`` drawn from ``torch.manual_seed(seed)``'s generator."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = TorchNet(num_classes)
    finally:
        torch.random.set_rng_state(gen_state)
    return net.to(dtype)


@contextlib.contextmanager
def torch_default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` inside the block, restored after it.

    torch keeps some optimizer state (NAdam's ``mu_product``, step counts) in its default dtype
    whatever the parameters', created lazily at the first ``step()``: a float64 reference run
    needs float64 there too.
    """
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
