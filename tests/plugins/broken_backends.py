"""Backends that misbehave on purpose, for the CLIs' error paths (loaded as plugins from a yaml
file with a _target_, exactly as a user's own backend would be)."""
import torch
from torch import nn

from deepvis_repro.backend import HookBackend


class _Tiny(nn.Module):
    def __init__(self, classes, poison):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)
        self.poison = poison

    def forward(self, x):
        if self.poison == "fail" and bool(x.abs().sum() > 0):
            raise RuntimeError("simulated failure on a real frame")
        h = self.relu(self.conv(x))
        if self.poison == "nan":
            h = h * float("nan")
        return self.fc(self.pool(h).flatten(1))


class TinyBackend(HookBackend):
    """poison: none | nan (every activation NaN) | fail (raises on any non-blank image)."""

    def __init__(self, classes: int = 3, poison: str = "none", labels=None, device="cpu"):
        module = _Tiny(int(classes), poison)
        super().__init__(module, [("conv", "relu"), ("fc", "fc")], to_input=lambda x: x / 128.0,
                         mean=[127.5] * 3, input_size=(64, 64),
                         labels=list(labels) if labels else [f"class {i}" for i in range(int(classes))],
                         name=f"tiny_{poison}_{classes}", device=device, lr_scale=1.0)
