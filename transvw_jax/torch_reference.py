"""PyTorch versions of the reference networks, written from docs/REFERENCE.md section 2 (Network).

They let a user without the original code load a `.pt` export (`load_state_dict(...,
strict=True)`), and they are the yardstick of the parity tests and of the PyTorch
comparisons in `benchmarks/`. Attribute names reproduce the reference state_dict keys
(down_tr64.ops.0.conv1.weight, ..., clc_out.fc1.bias). Needs the `torch` extra.

Layout is PyTorch's: inputs (B, C, X, Y, Z). `width` scales channels as in the Flax models
(32 is the reference). YNet3D returns (restoration, logits) like the Flax model; the
original applies softmax to the logits inside the model, so compare `logits.softmax(1)`.
"""

from __future__ import annotations

import torch
from torch import nn


class ContBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm that always normalises with the current batch's statistics, also in
    eval(): the reference's behaviour (it also updates the running statistics then)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias,
            True, self.momentum, self.eps,
        )


class LUConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    def __init__(self, cin: int, depth: int, width: int):
        super().__init__()
        c = width * 2**depth
        self.ops = nn.Sequential(LUConv(cin, c), LUConv(c, 2 * c))
        self.pool = depth < 3

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        out = nn.functional.max_pool3d(skip, 2) if self.pool else skip
        return out, skip


class UpTransition(nn.Module):
    def __init__(self, cin: int, cup: int, depth: int, width: int):
        super().__init__()
        c = width * 2 ** (depth + 1)
        self.up_conv = nn.ConvTranspose3d(cin, cup, kernel_size=2, stride=2)
        self.ops = nn.Sequential(LUConv(cin + cup // 2, c), LUConv(c, c))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat([self.up_conv(x), skip], dim=1))


class OutputTransition(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.final_conv = nn.Conv3d(cin, cout, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.final_conv(x))


class ClassificationHead(nn.Module):
    def __init__(self, cin: int, num_classes: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, 32 * width, kernel_size=3, padding=1)
        self.bn1 = ContBatchNorm3d(32 * width)
        self.fc1 = nn.Linear(32 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc1(x.mean(dim=(2, 3, 4)))


class _Encoder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        w = width
        self.down_tr64 = DownTransition(1, 0, w)
        self.down_tr128 = DownTransition(2 * w, 1, w)
        self.down_tr256 = DownTransition(4 * w, 2, w)
        self.down_tr512 = DownTransition(8 * w, 3, w)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, s64 = self.down_tr64(x)
        x, s128 = self.down_tr128(x)
        x, s256 = self.down_tr256(x)
        x, _ = self.down_tr512(x)
        return x, [s64, s128, s256]


class UNet3D(_Encoder):
    def __init__(self, out_channels: int = 1, width: int = 32):
        super().__init__(width)
        w = width
        self.up_tr256 = UpTransition(16 * w, 16 * w, 2, w)
        self.up_tr128 = UpTransition(8 * w, 8 * w, 1, w)
        self.up_tr64 = UpTransition(4 * w, 4 * w, 0, w)
        self.out_tr = OutputTransition(2 * w, out_channels)

    def decode(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = self.up_tr256(x, skips[2])
        x = self.up_tr128(x, skips[1])
        x = self.up_tr64(x, skips[0])
        return self.out_tr(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x))


class YNet3D(UNet3D):
    def __init__(self, num_classes: int, width: int = 32, out_channels: int = 1):
        super().__init__(out_channels, width)
        self.clc_out = ClassificationHead(16 * width, num_classes, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bottleneck, skips = self.encode(x)
        return self.decode(bottleneck, skips), self.clc_out(bottleneck)


class EncoderClassifier(_Encoder):
    def __init__(self, num_classes: int, width: int = 32):
        super().__init__(width)
        self.clc_out = ClassificationHead(16 * width, num_classes, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clc_out(self.encode(x)[0])
