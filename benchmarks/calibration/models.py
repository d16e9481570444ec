"""The study's three architectures (``--model benchmarks/calibration/models.py:build``)."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

CLASSES = {"digits": 10, "digits_flat": 10, "fair": 2}
FEATURES = {"digits_flat": 64, "fair": 8}


def build(arch: str, dataset: str, width: int = 16) -> nn.Module:
    """``cnn`` (plain conv blocks, 8x8 images), ``rescnn`` (residual blocks) or ``mlp`` (BatchNorm1d)."""
    classes = CLASSES[dataset]
    if arch == "cnn":
        return _cnn(width, classes)
    if arch == "rescnn":
        return _rescnn(width, classes)
    if arch == "mlp":
        return _mlp(FEATURES[dataset], 4 * width, classes)
    raise ValueError(f"unknown arch {arch!r}; expected cnn, rescnn or mlp")


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            bn=nn.BatchNorm2d(cout),
            relu=nn.ReLU(inplace=True),
        )
    )


def _cnn(width: int, classes: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            block1=_conv_bn(1, width),
            block2=_conv_bn(width, 2 * width),
            pool=nn.MaxPool2d(2),
            block3=_conv_bn(2 * width, 4 * width, stride=2),
            flatten=nn.Flatten(),
            fc=nn.Linear(16 * width, 2 * width, bias=False),
            fc_bn=nn.BatchNorm1d(2 * width),
            fc_relu=nn.ReLU(inplace=True),
            classifier=nn.Linear(2 * width, classes),
        )
    )


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (through a 1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                OrderedDict(conv=nn.Conv2d(cin, cout, 1, stride=stride, bias=False), bn=nn.BatchNorm2d(cout))
            )

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        return nn.functional.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _rescnn(width: int, classes: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            stem=_conv_bn(1, width),
            layer1=ResidualBlock(width, width, 1),
            layer2=ResidualBlock(width, 2 * width, 2),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            classifier=nn.Linear(2 * width, classes),
        )
    )


def _mlp(features: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(features, hidden, bias=False),
            bn1=nn.BatchNorm1d(hidden),
            relu1=nn.ReLU(inplace=True),
            fc2=nn.Linear(hidden, hidden // 2, bias=False),
            bn2=nn.BatchNorm1d(hidden // 2),
            relu2=nn.ReLU(inplace=True),
            classifier=nn.Linear(hidden // 2, classes),
        )
    )
