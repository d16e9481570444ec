"""Small stand-ins for the architectures users recalibrate, shared by the benchmarks and tests/live.

- ``BatchNormAct2d``: a ``BatchNorm2d`` subclass with its own forward that normalises through
  ``torch.nn.functional.batch_norm`` and applies an activation, as timm's layer of that name does;
  ``DirectBatchNorm2d`` calls ``torch.batch_norm`` itself (a layer bnaudit's tap cannot see).
- ``ResNet``: torchvision-style basic blocks (in-place ReLU, ``out += identity``, a 1x1 downsample).
- ``MobileNet``: inverted residuals (expand 1x1, depthwise 3x3, project 1x1) with ``BatchNormAct2d``.
- ``HeadNet``: a small CNN with a heavy head after its last BatchNorm (a detector's or segmenter's).
- ``PlainCNN``: six conv + BatchNorm2d + ReLU layers.

Written for this project (no code from torchvision or timm): only the structure is theirs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation in one module, with its own forward."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels)
        self.act: nn.Module = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        use_batch = self.training or self.running_mean is None
        x = functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, use_batch, factor, self.eps
        )
        return self.act(x)


class DirectBatchNorm2d(nn.BatchNorm2d):
    """A subclass that bypasses ``torch.nn.functional``: calls ``torch.batch_norm`` directly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(
            x,  # torch.batch_norm's order: weight and bias before the running statistics
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.training,
            0.1,
            self.eps,
            False,
        )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: type[nn.BatchNorm2d]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A stem and three stages of ``blocks`` basic blocks, global pooling and a linear classifier."""

    def __init__(
        self, width: int = 16, blocks: int = 2, classes: int = 10, norm: type[nn.BatchNorm2d] = nn.BatchNorm2d
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1, norm))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid)
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = BatchNormAct2d(cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return out + x if self.residual else out


class MobileNet(nn.Module):
    """An EfficientNet / MobileNetV2-like stack of inverted residuals with BatchNormAct2d layers."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), BatchNormAct2d(width))
        plan = ((width, 1), (width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2), (4 * width, 1))
        blocks: list[nn.Module] = []
        cin = width
        for cout, stride in plan:
            blocks.append(InvertedResidual(cin, cout, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = nn.Conv2d(cin, 4 * cin, 1, bias=False)
        self.bn_head = BatchNormAct2d(4 * cin)
        self.fc = nn.Linear(4 * cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn_head(self.conv_head(self.blocks(self.stem(x)))).mean(dim=(2, 3)))


class PlainCNN(nn.Module):
    """Six conv + BatchNorm2d + ReLU layers (two stride-2), pooling, a linear classifier."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, cout in enumerate((width, width, 2 * width, 2 * width, 4 * width, 4 * width)):
            layers += [nn.Conv2d(cin, cout, 3, 2 if i in (2, 4) else 1, 1, bias=False), nn.BatchNorm2d(cout)]
            layers.append(nn.ReLU(inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


class HeadNet(nn.Module):
    """A PlainCNN body, then a head without BatchNorm as heavy as a dense-prediction head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.body = PlainCNN(width, classes).features
        c = 4 * width
        self.head = nn.Sequential(
            nn.Conv2d(c, 4 * c, 3, 1, 1), nn.ReLU(), nn.Conv2d(4 * c, 4 * c, 3, 1, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


ARCHITECTURES: dict[str, Any] = {
    "plain": PlainCNN,
    "resnet": ResNet,
    "mobilenet": MobileNet,
    "head": HeadNet,
}


TIMM_PREFIX = "timm:"


def build(arch: str = "resnet", width: int = 16, **kwargs: Any) -> nn.Module:
    """A fresh model of architecture ``arch`` (seeded, so every process builds the same weights).

    ``timm:<name>`` builds the real timm model of that name (random weights, 10 classes; ``width`` is
    ignored) where timm is installed: the benchmark's measure of the layers users actually run.
    """
    torch.manual_seed(0)
    if arch.startswith(TIMM_PREFIX):
        import timm

        return timm.create_model(arch[len(TIMM_PREFIX) :], pretrained=False, num_classes=10)  # type: ignore[no-any-return]
    return ARCHITECTURES[arch](width=width, **kwargs)
