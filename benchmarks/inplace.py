"""In-place fusion on full-size networks built in code (no torchvision, no downloads).

    python benchmarks/inplace.py

ResNet-50 (53 BatchNorms) and MobileNetV2 (52 BatchNorms, depthwise convs,
inverted residuals), random BN statistics, eval mode. Each is folded with
``bnfuse.fuse(model, example_inputs=..., inplace=True)`` and the script
prints: whether the same object came back, the BatchNorm modules left, the
max abs difference of the outputs from an unfused copy, their range, and the
time the fusion took.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

import bnfuse

try:
    from benchmarks.torch_eager import resnet50, with_bn_statistics
except ImportError:  # run as a script from benchmarks/
    from torch_eager import resnet50, with_bn_statistics  # type: ignore[no-redef]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6()]
        layers += [
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]  # fmt: skip
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def _round8(x: float) -> int:
    return max(8, int(x + 4) // 8 * 8)


def mobilenet_v2(classes: int = 1000, width: float = 1.0) -> nn.Module:
    """MobileNetV2 (torchvision's layout); ``width`` 1.4 is the 24 MB variant."""
    stem = _round8(32 * width)
    layers: list[nn.Module] = [
        nn.Conv2d(3, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6(),
    ]  # fmt: skip
    cin = stem
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):  # fmt: skip
        for i in range(n):
            layers.append(InvertedResidual(cin, _round8(c * width), s if i == 0 else 1, t))
            cin = _round8(c * width)
    last = _round8(1280 * max(1.0, width))
    layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, classes)]
    return with_bn_statistics(nn.Sequential(*layers), seed=1)


def main() -> None:
    x = torch.randn(2, 3, 224, 224)
    print("| network | BatchNorms | same object | BN left | max abs | output range | fuse s |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, model in (("ResNet-50", resnet50()), ("MobileNetV2", mobilenet_v2())):
        count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        reference = copy.deepcopy(model)
        start = time.perf_counter()
        out = bnfuse.fuse(model, example_inputs=(x,), inplace=True)
        seconds = time.perf_counter() - start
        left = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        with torch.no_grad():
            want, got = reference(x), model(x)
        error = float((want - got).abs().max())
        span = float(want.max() - want.min())
        print(
            f"| {name} | {count} | {out is model} | {left} | {error:.3g} | {span:.3g} | {seconds:.2f} |"
        )


if __name__ == "__main__":
    main()
