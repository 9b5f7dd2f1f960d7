"""A reference PyTorch network for the weight-bridge tests: the Models Genesis PyTorch release.

Written from the published facts of that network, not from its code: blocks of Conv3d (kernel 3,
padding 1, bias), BatchNorm3d (eps 1e-5, momentum 0.1) and ReLU, whose batch norm always
normalises with the batch's own statistics (its forward calls batch norm in training mode, in
``eval()`` too, and so updates the running statistics); max-pooling by 2; ConvTranspose3d
(kernel 2, stride 2, as many output channels as input) up-sampling; ``cat([up, skip], 1)``; a
1x1x1 output convolution and a sigmoid. Parameter names follow the release
(``down_tr64.ops.0.conv1.weight``, ``up_tr256.up_conv.bias``, ``out_tr.final_conv.weight``);
the base width is a parameter (32 in the release) so tests can use a narrow network.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class AlwaysBatchStatsNorm3d(nn.BatchNorm3d):
    """BatchNorm3d whose forward always uses (and updates with) the batch's statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            True,  # training mode always: batch statistics, running statistics updated
            self.momentum,
            self.eps,
        )


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, batch_stats: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        norm = AlwaysBatchStatsNorm3d if batch_stats else nn.BatchNorm3d
        self.bn1 = norm(cout, eps=1e-5, momentum=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class Down(nn.Module):
    def __init__(self, cin: int, c1: int, c2: int, pool: bool, batch_stats: bool) -> None:
        super().__init__()
        self.ops = nn.Sequential(Block(cin, c1, batch_stats), Block(c1, c2, batch_stats))
        self.pool = pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


class Up(nn.Module):
    def __init__(self, cin: int, cskip: int, batch_stats: bool) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(cin, cin, kernel_size=2, stride=2)
        self.ops = nn.Sequential(
            Block(cin + cskip, cskip, batch_stats), Block(cskip, cskip, batch_stats)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], 1))


class Out(nn.Module):
    def __init__(self, cin: int, n_labels: int) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(cin, n_labels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.final_conv(x))


class ReferenceUNet3D(nn.Module):
    """The release's network with base width ``n`` (32 as published).

    Args:
        n: channels of the first block; the table of the release is ``n=32``.
        in_channels: input channels (1).
        n_labels: output channels (1).
        batch_stats: the release's batch norm (True); False gives a plain BatchNorm3d, which
            uses the running statistics in ``eval()``.
    """

    def __init__(
        self, n: int = 32, in_channels: int = 1, n_labels: int = 1, batch_stats: bool = True
    ) -> None:
        super().__init__()
        b = batch_stats
        self.down_tr64 = Down(in_channels, n, 2 * n, True, b)
        self.down_tr128 = Down(2 * n, 2 * n, 4 * n, True, b)
        self.down_tr256 = Down(4 * n, 4 * n, 8 * n, True, b)
        self.down_tr512 = Down(8 * n, 8 * n, 16 * n, False, b)
        self.up_tr256 = Up(16 * n, 8 * n, b)
        self.up_tr128 = Up(8 * n, 4 * n, b)
        self.up_tr64 = Up(4 * n, 2 * n, b)
        self.out_tr = Out(2 * n, n_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, s64 = self.down_tr64(x)
        x, s128 = self.down_tr128(x)
        x, s256 = self.down_tr256(x)
        x, _ = self.down_tr512(x)
        x = self.up_tr256(x, s256)
        x = self.up_tr128(x, s128)
        x = self.up_tr64(x, s64)
        return self.out_tr(x)


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of a useful scale, non-trivial running statistics and batch counters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(int(torch.randint(1, 10_000, (1,), generator=gen)))
            elif name.endswith(("running_var", "bn1.weight")):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
            else:  # conv kernels, scaled so activations stay of order 1
                fan_in = t[0].numel() if "up_conv" not in name else t.shape[0] * 8
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    return model


def save_published(model: nn.Module, path: str | os.PathLike, prefix: str = "module.") -> None:
    """Save as the release did: a DataParallel model's state dict inside a training dict."""
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"epoch": 7, "state_dict": state, "optimizer_state_dict": {}}, path)


def run(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's output for a channels-first float32 batch, in ``eval()`` without gradients.

    The running statistics of the release's batch norm move on every call; they are restored,
    so the model's state is the same after as before.
    """
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    model.load_state_dict(saved)
    return out
