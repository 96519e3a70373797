"""Any model of timm's zoo as a backend: ``backend=timm backend.model=NAME``.

The model's own pretrained configuration (``pretrained_cfg``) gives the input size, mean and std,
the eval transform's ``crop_pct`` and ``interpolation`` (every picture reaches the model as timm's
own eval pipeline would feed it: the shorter side to floor(size / crop_pct), bicubic for ViTs,
then the centre crop) and, for ImageNet-1k heads, the labels. Weights:
``pretrained=true`` loads through timm's and the hub's own cache (offline and not cached: one line
that names ``checkpoint=``); ``checkpoint=FILE`` reads a safetensors file or a state dict
(``torch.load(weights_only=True)``, never a pickle of objects); neither: random weights, said once.
Layers: the module tree's blocks (a ViT's ``blocks.N`` with their ``attn`` and ``mlp``, a Swin
stage's blocks, a ConvNeXt's stages), their layouts traced (deepvis_repro/layout.py); a token
model's prefix tokens are named from the model (``cls``, ``dist``, ``reg0`` ...).
"""
from __future__ import annotations

import os
import sys

import torch
from deepvis_repro_backends.efficientnet_lite import load_state_dict_file

from deepvis_repro.backend import HookBackend, check_input_size, discover_layers
from deepvis_repro.errors import DeepvisError, did_you_mean
from deepvis_repro.images import INTERPOLATIONS
from deepvis_repro.labels import imagenet_labels, read_labels

_warned: set = set()


def _timm():
    try:
        import timm
    except ImportError:
        raise DeepvisError("backend=timm needs timm: pip install -e \".[timm]\" (or pip install timm)") from None
    return timm


def read_checkpoint(path: str) -> dict:
    """A state dict from a safetensors file or a torch file (weights only)."""
    if not os.path.isfile(path):
        raise DeepvisError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file

            return load_file(path)
        except Exception as e:  # a truncated or foreign file
            raise DeepvisError(f"cannot read safetensors file {path}: {str(e).splitlines()[0][:160]}") from None
    return load_state_dict_file(path)


def prefix_token_names(model) -> list[str] | None:
    """The prefix tokens timm's ViT family puts before the patches, in their order: the class
    token, then the distillation token (DeiT) or the register tokens."""
    n = getattr(model, "num_prefix_tokens", None)
    if not n:
        return None
    names = ["cls"] if getattr(model, "cls_token", None) is not None else []
    if getattr(model, "dist_token", None) is not None:
        names.append("dist")
    regs = int(getattr(model, "num_reg_tokens", 0) or 0)
    names += [f"reg{i}" for i in range(regs)]
    return names if len(names) == n else None


class TimmBackend(HookBackend):
    def __init__(self, model: str = "vit_tiny_patch16_224", pretrained: bool = False, checkpoint=None,
                 input_size=None, crop: bool = True, lr_scale=None, progress_scale: float = 1.0,
                 device: str = "cpu", resize=None, until: str | None = None, labels=None, model_args=None,
                 crop_pct=None, interpolation=None):
        timm = _timm()
        name = str(model)
        if name not in timm.list_models():
            raise DeepvisError(f"unknown timm model '{name}'; " + did_you_mean(name, timm.list_models()))
        if not isinstance(pretrained, bool):
            raise DeepvisError(f"backend.pretrained must be true or false, got {pretrained!r}")
        if pretrained and checkpoint:
            raise DeepvisError("give backend.pretrained=true or backend.checkpoint=FILE, not both")
        if model_args is not None and not isinstance(model_args, dict):
            raise DeepvisError(f"backend.model_args must be a mapping of create_model's arguments, got {model_args!r}")
        kwargs = dict(model_args or {})  # create_model's own: reg_tokens=4, depth=2, img_size=224 ...
        if pretrained:
            try:
                net = timm.create_model(name, pretrained=True, **kwargs)
            except Exception as e:  # offline and not in the hub's cache, or a failed download
                raise DeepvisError(f"cannot load timm's pretrained weights for {name} ({str(e).splitlines()[0][:120]}); "
                                   "offline, give backend.checkpoint=FILE (a .safetensors file or a state dict)") from None
        else:
            try:
                net = timm.create_model(name, pretrained=False, **kwargs)
            except TypeError as e:
                raise DeepvisError(f"timm {name} does not take backend.model_args {kwargs}: {e}") from None
            if checkpoint:
                sd = read_checkpoint(str(checkpoint))
                try:
                    net.load_state_dict(sd, strict=True)
                except RuntimeError as e:
                    first = [l.strip() for l in str(e).splitlines() if l.strip()][1:2]
                    raise DeepvisError(f"checkpoint {checkpoint} does not fit timm {name}: "
                                       f"{(first or [str(e)[:200]])[0][:200]}") from None
            elif name not in _warned:
                _warned.add(name)
                print(f"warning: timm {name} has random weights (neither backend.pretrained=true nor "
                      "backend.checkpoint=FILE): its labels and pictures mean nothing", file=sys.stderr)
        cfg = dict(getattr(net, "pretrained_cfg", {}) or {})
        size = (check_input_size(input_size, f"timm {model}") if input_size
                else tuple(cfg.get("input_size", (3, 224, 224))[1:]))
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32) * 255.0
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32) * 255.0
        classes = getattr(net, "num_classes", 0)
        if labels == "imagenet" or (labels is None and classes == 1000):
            labels = imagenet_labels()
        elif labels:
            labels = read_labels(labels)
        else:
            labels = None
        net.eval()
        self._prefix_names = prefix_token_names(net)
        self.pretrained_cfg = {k: cfg.get(k) for k in ("input_size", "mean", "std", "interpolation", "crop_pct",
                                                       "crop_mode", "num_classes") if k in cfg}
        paths = discover_layers(net, torch.zeros(1, 3, *size))
        scale = (1.0 / std).view(1, 3, 1, 1)
        super().__init__(
            net, paths, to_input=lambda x, s=scale: x * s.to(x.device), mean=mean, input_size=size,
            labels=labels if labels and len(labels) == classes else None, crop=crop, lr_scale=lr_scale,
            name=f"timm:{name}", device=device, progress_scale=progress_scale, resize=resize, until=until)
        # timm's eval transform: the shorter side to size / crop_pct with the model's interpolation,
        # then the centre crop (picture_view reads these; None: the model's own pretrained_cfg)
        self.crop_pct = float(cfg.get("crop_pct") or 1.0) if crop_pct is None else float(crop_pct)
        self.interpolation = str(cfg.get("interpolation") or "bilinear") if interpolation is None else str(interpolation)
        if not 0 < self.crop_pct <= 1:
            raise DeepvisError(f"backend.crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise DeepvisError(f"backend.interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                               f"got '{self.interpolation}'")
