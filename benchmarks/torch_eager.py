"""Eager CPU inference time of a ResNet-50-shaped network, unfused vs fused by bnfuse.

    python benchmarks/torch_eager.py [--batch 8] [--size 224] [--runs 15] [--threads 2]

The network is built in code (bottleneck stages 3-4-6-3, widths 64-2048, 53
BatchNorms, 25.6 M parameters), with random BN statistics, in eval mode. The two
models run alternately, after warm-up, and the median of each is reported. This
is a benchmark, not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import bnfuse
from bnfuse.torch.module import fuse_module


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        cout = mid * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return torch.relu(self.bn3(self.conv3(h)) + self.down(x))


def resnet50(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
    ]  # fmt: skip
    cin = 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return with_bn_statistics(nn.Sequential(*layers), seed=0)


def with_bn_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Random trained-looking BatchNorm statistics and affine parameters, eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = resnet50()
    x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    fused = fuse_module(model, (x,))
    fuse_s = time.perf_counter() - start
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    print(
        f"bnfuse {bnfuse.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads; batch {args.batch}x3x{args.size}x{args.size}"
    )
    print(
        f"folded {len(fused.result.folded)} of {n_bn} BatchNorms in {fuse_s:.2f} s; "
        f"params {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M"
    )

    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    with torch.inference_mode():
        want, got = model(x), fused.module(x)  # warm-up, and the agreement check
        err = float((want - got).abs().max())
        for _ in range(args.runs):
            for name, net in (("unfused", model), ("fused", fused.module)):
                t0 = time.perf_counter()
                net(x)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"max |fused - unfused| = {err:.3g} (logits range {float(want.max() - want.min()):.3g})")
    for name in ("unfused", "fused"):
        v = times[name]
        print(
            f"{name:8} median {med[name] * 1000:8.1f} ms  (min {min(v) * 1000:.1f}, max {max(v) * 1000:.1f}, {len(v)} runs)"
        )
    print(
        f"speed-up: {med['unfused'] / med['fused']:.2f}x ({(1 - med['fused'] / med['unfused']) * 100:.1f}% less time)"
    )


if __name__ == "__main__":
    main()
