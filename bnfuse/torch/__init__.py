"""The PyTorch path: nn.Module (torch.fx / torch.export), TorchScript and .pt2 files.

torch is optional: this package is imported only for PyTorch inputs.
"""
