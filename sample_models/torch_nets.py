"""Small PyTorch networks shaped like the families people fold BN in.

Each is built in code (no downloads), with random "trained" BatchNorm
statistics, in eval mode. ``export_onnx`` writes them with torch.onnx's
TorchScript-based exporter, constant folding off, as a user would who wants
the BatchNorms kept for bnfuse to fold.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class ConvBN(nn.Module):
    """The smallest network with a BatchNorm to fold: Conv2d(3, 4, 3) -> BatchNorm2d(4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.a = _conv_bn(cin, cout, 3, stride)
        self.b = _conv_bn(cout, cout, 3)
        self.down = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return torch.relu(self.b(torch.relu(self.a(x))) + skip)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int) -> None:
        super().__init__()
        self.a = _conv_bn(cin, mid, 1)
        self.b = _conv_bn(mid, mid, 3)
        self.c = _conv_bn(mid, cout, 1)
        self.down = _conv_bn(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return torch.relu(self.c(h) + self.down(x))


class ResNetish(nn.Module):
    """Stem, two BasicBlock stages (with downsampling), a Bottleneck, pooled classifier."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 7, 2, 3, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        self.layers = nn.Sequential(
            BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), Bottleneck(32, 16, 64)
        )
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = _conv_bn(cin, mid, 1)
        self.depthwise = _conv_bn(mid, mid, 3, stride, groups=mid)
        self.project = _conv_bn(mid, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.relu6(self.expand(x))
        h = self.project(nn.functional.relu6(self.depthwise(h)))
        return x + h if self.residual else h


class MobileNetish(nn.Module):
    """MobileNetV2-shaped: depthwise-separable inverted residuals."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 16, 3, 2), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 1, 4),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 6),
        )
        self.head = nn.Sequential(_conv_bn(24, 64, 1), nn.ReLU6())
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.blocks(self.stem(x)))
        return self.fc(h.mean(dim=(2, 3)))


class DenseLayer(nn.Module):
    """Pre-activation: BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv (torchvision's shape)."""

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        h = torch.cat(features, 1)
        h = self.conv1(torch.relu(self.norm1(h)))
        return self.conv2(torch.relu(self.norm2(h)))


class DenseNetish(nn.Module):
    """Two dense blocks with a transition; BN after concat cannot fold (no layer before it)."""

    def __init__(self, classes: int = 10, growth: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.block1 = nn.ModuleList([DenseLayer(16 + i * growth, growth) for i in range(3)])
        c1 = 16 + 3 * growth
        self.transition = nn.Sequential(
            nn.BatchNorm2d(c1), nn.ReLU(), nn.Conv2d(c1, c1 // 2, 1, bias=False), nn.AvgPool2d(2)
        )
        self.block2 = nn.ModuleList([DenseLayer(c1 // 2 + i * growth, growth) for i in range(2)])
        self.final_norm = nn.BatchNorm2d(c1 // 2 + 2 * growth)
        self.fc = nn.Linear(c1 // 2 + 2 * growth, classes)

    @staticmethod
    def _block(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in layers:
            features.append(layer(features))
        return torch.cat(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._block(self.block1, self.stem(x))
        h = self._block(self.block2, self.transition(h))
        h = torch.relu(self.final_norm(h))
        return self.fc(h.mean(dim=(2, 3)))


class DCGANGenerator(nn.Module):
    """z [N, nz, 1, 1] -> image; ConvTranspose + BN + ReLU stages (one of them grouped)."""

    def __init__(self, nz: int = 16, ngf: int = 8) -> None:
        super().__init__()

        def up(cin: int, cout: int, k: int, s: int, p: int, groups: int = 1) -> list[nn.Module]:
            return [
                nn.ConvTranspose2d(cin, cout, k, s, p, groups=groups, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]

        self.net = nn.Sequential(
            *up(nz, ngf * 8, 4, 1, 0),
            *up(ngf * 8, ngf * 4, 4, 2, 1),
            *up(ngf * 4, ngf * 2, 4, 2, 1, groups=2),
            *up(ngf * 2, ngf, 4, 2, 1),
            nn.ConvTranspose2d(ngf, 3, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class BN1dMLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU, twice, then a classifier (exports as Gemm)."""

    def __init__(self, features: int = 20, hidden: int = 32, classes: int = 5) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d on tokens: [B, N, C] -> flatten(0, 1) -> BN -> back."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTish(nn.Module):
    """LeViT-style MLP blocks on [B, tokens, channels]: every BN behind a flatten."""

    def __init__(self, dim: int = 16, hidden: int = 32, classes: int = 8) -> None:
        super().__init__()
        self.mlp_in = LinearNorm(dim, hidden)
        self.mlp_out = LinearNorm(hidden, dim)
        self.head = LinearNorm(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_out(nn.functional.hardswish(self.mlp_in(x)))
        return self.head(x).mean(1)


class Conv1dAudio(nn.Module):
    """Raw-waveform front end: strided Conv1d + BatchNorm1d stack, pooled classifier."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, k, s in ((1, 16, 9, 4), (16, 32, 5, 2), (32, 32, 3, 1)):
            layers += [nn.Conv1d(cin, cout, k, s, k // 2), nn.BatchNorm1d(cout), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=2))


@dataclass(frozen=True)
class NetSpec:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    # BatchNorms that cannot fold in this architecture (they follow a Concat).
    bn_not_after_layer: int = 0


NETS = [
    NetSpec("resnet", ResNetish, (2, 3, 32, 32)),
    NetSpec("mobilenet", MobileNetish, (2, 3, 32, 32)),
    # norm1 of each of the 5 dense layers, the transition BN and the final BN.
    NetSpec("densenet", DenseNetish, (2, 3, 16, 16), bn_not_after_layer=7),
    NetSpec("dcgan_generator", DCGANGenerator, (2, 16, 1, 1)),
    NetSpec("bn1d_mlp", BN1dMLP, (4, 20)),
    NetSpec("conv1d_audio", Conv1dAudio, (2, 1, 400)),
    NetSpec("levit_mlp", LeViTish, (2, 5, 16)),
]


def trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters, as after training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                c = mod.num_features
                if mod.running_mean is not None and mod.running_var is not None:
                    mod.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                    mod.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                if mod.affine:
                    mod.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    mod.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model.eval()


def build(spec: NetSpec, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return trained(spec.build(), seed)


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], opset: int) -> bytes:
    """TorchScript-based export, eval mode, no constant folding (BNs kept)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(*input_shape),),
            buf,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["input"],
            output_names=["output"],
        )
    return buf.getvalue()


def export_onnx_dynamo(model: nn.Module, input_shape: tuple[int, ...]) -> bytes:
    """torch.export-based export, optimize=False: BNs kept, biases as sub-expressions."""
    import logging

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (torch.randn(*input_shape),), dynamo=True, optimize=False, verbose=False
        )
    assert program is not None
    return bytes(program.model_proto.SerializeToString())
