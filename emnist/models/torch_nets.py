"""The torch architectures, written after their published definitions (torchvision has none
that loads beside the CPU build here), for C-channel inputs and any number of classes.

- ``lenet5``: LeNet-5 in its common modern form (the PyTorch "Neural Networks" tutorial's
  network: conv 6@5x5, max-pool, conv 16@5x5, max-pool, 120, 84, classes; ReLU): 61,706
  parameters for 1 channel and 10 classes. Its 32 px input is LeNet's own: 28 px images are
  padded by 2 with background pixels, as LeCun et al. did for MNIST.
- ``cnn``: pytorch/examples' mnist_hogwild ``Net`` (conv 10@5x5, conv 20@5x5 + channel
  dropout, 50, classes): 21,840 parameters at 28 px and 10 classes, 30,840 at 32 px.
- ``mobilenet_v3_small``: torchvision's MobileNetV3-small (BN eps 1e-3, hard-swish,
  squeeze-excitation, classifier 576 -> 1024 -> classes with dropout 0.2): 2,542,856
  parameters with 1000 classes and 3 channels.
- ``squeezenet1_1``: torchvision's SqueezeNet 1.1 (min input 17 px): 1,235,496.
- ``vgg11``: torchvision's VGG11, configuration "A", no batch norm, adaptive 7x7 average pool
  and the 25088 -> 4096 -> 4096 -> classes classifier: 132,863,336. Its five 2x2 pools need
  32 px, so 28 px images are padded by 2 like LeNet-5's (the 1x1 map after the last pool is
  then replicated to 7x7 by the adaptive pool, as torchvision does for small inputs).

Initialisation follows each reference (``init_weights``), drawn from a given
``torch.Generator`` so the same seed gives the same vector. Dropout draws its masks from the
model's generator too (``SeededDropout``), never from torch's global one: two models in one
process (p2p peers in threads) stay deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHITECTURES", "SeededDropout", "build_net", "input_pad", "make_divisible"]


class SeededDropout(nn.Module):
    """Inverted dropout whose masks come from ``gen``; ``channels`` drops whole feature maps
    (Dropout2d)."""

    def __init__(self, p: float, gen: torch.Generator, channels: bool = False) -> None:
        super().__init__()
        self.p, self.gen, self.channels = p, gen, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (*x.shape[:2], 1, 1) if self.channels else x.shape
        mask = torch.empty(shape, dtype=x.dtype).bernoulli_(keep, generator=self.gen)
        return x * mask.div_(keep)


def _default_init(net: nn.Module, gen: torch.Generator) -> None:
    """torch's own Conv2d/Linear reset_parameters, but from ``gen``."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=gen)
            fan_in = m.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(m.bias, -bound, bound, generator=gen)


class LeNet5(nn.Module):
    min_side = 32

    def __init__(self, channels: int, classes: int, dropout: float | None,
                 gen: torch.Generator) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def init_weights(self, gen: torch.Generator) -> None:
        _default_init(self, gen)


class SmallCNN(nn.Module):
    min_side = 16

    def __init__(self, channels: int, classes: int, dropout: float | None,
                 gen: torch.Generator, side: int = 28) -> None:
        super().__init__()
        p = 0.5 if dropout is None else dropout
        self.conv1 = nn.Conv2d(channels, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.conv2_drop = SeededDropout(p, gen, channels=True)
        flat = ((side - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(20 * flat * flat, 50)
        self.drop = SeededDropout(p, gen)
        self.fc2 = nn.Linear(50, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = torch.flatten(x, 1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))

    def init_weights(self, gen: torch.Generator) -> None:
        _default_init(self, gen)


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of ``divisor``, never below 90%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = None) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv without bias, BN(eps 1e-3), activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool,
                 stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_conv_bn(cin, exp, 1, act=act))
        layers.append(_conv_bn(exp, exp, k, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcitation(exp, make_divisible(exp // 4)))
        layers.append(_conv_bn(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


# torchvision's mobilenet_v3_small bneck table: in, kernel, expanded, out, SE, hard-swish, stride
_MNV3_SMALL = [
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
]


class MobileNetV3Small(nn.Module):
    min_side = 1

    def __init__(self, channels: int, classes: int, dropout: float | None,
                 gen: torch.Generator) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(channels, 16, 3, 2, act=nn.Hardswish)]
        layers += [InvertedResidual(*row) for row in _MNV3_SMALL]
        layers.append(_conv_bn(96, 576, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(576, 1024), nn.Hardswish(),
            SeededDropout(0.2 if dropout is None else dropout, gen),
            nn.Linear(1024, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x)

    def init_weights(self, gen: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", generator=gen)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01, generator=gen)
                nn.init.zeros_(m.bias)


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, e1: int, e3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    min_side = 17

    def __init__(self, channels: int, classes: int, dropout: float | None,
                 gen: torch.Generator) -> None:
        super().__init__()

        def pool() -> nn.Module:
            return nn.MaxPool2d(3, 2, ceil_mode=True)

        self.features = nn.Sequential(
            nn.Conv2d(channels, 64, 3, 2), nn.ReLU(), pool(),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
        )
        self.final_conv = nn.Conv2d(512, classes, 1)
        self.drop = SeededDropout(0.5 if dropout is None else dropout, gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.final_conv(self.drop(self.features(x))))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def init_weights(self, gen: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is self.final_conv:
                    nn.init.normal_(m.weight, 0.0, 0.01, generator=gen)
                else:
                    nn.init.kaiming_uniform_(m.weight, generator=gen)
                nn.init.zeros_(m.bias)


class VGG11(nn.Module):
    min_side = 32

    def __init__(self, channels: int, classes: int, dropout: float | None,
                 gen: torch.Generator) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = channels
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU()]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        p = 0.5 if dropout is None else dropout
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), SeededDropout(p, gen),
            nn.Linear(4096, 4096), nn.ReLU(), SeededDropout(p, gen),
            nn.Linear(4096, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (7, 7))
        return self.classifier(torch.flatten(x, 1))

    def init_weights(self, gen: torch.Generator) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu",
                                        generator=gen)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01, generator=gen)
                nn.init.zeros_(m.bias)


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "lenet5": LeNet5,
    "cnn": SmallCNN,
    "mobilenet_v3_small": MobileNetV3Small,
    "squeezenet1_1": SqueezeNet11,
    "vgg11": VGG11,
}


def input_pad(name: str, side: int) -> int:
    """Pixels added on each side so the architecture gets at least its minimum input."""
    need = ARCHITECTURES[name].min_side  # type: ignore[attr-defined]
    return max(0, math.ceil((need - side) / 2))


def build_net(name: str, channels: int, side: int, classes: int, dropout: float | None,
              gen: torch.Generator) -> nn.Module:
    """The architecture on the meta device (no memory, no init): the adapter binds it."""
    cls = ARCHITECTURES[name]
    with torch.device("meta"):
        if cls is SmallCNN:
            return SmallCNN(channels, classes, dropout, gen, side=side)
        return cls(channels, classes, dropout, gen)
