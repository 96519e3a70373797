"""Any torchvision classification model as a backend: ``arch`` names it, ``weights`` is None
(random init), "DEFAULT" (torchvision's weights enum: its download, transforms and labels) or a
path to a state dict (loaded with ``weights_only=True``)."""
from __future__ import annotations

import os

import torch
import torchvision
from deepvis_repro_backends.efficientnet_lite import load_state_dict_file

from deepvis_repro.backend import HookBackend, check_input_size, discover_layers
from deepvis_repro.errors import DeepvisError, did_you_mean
from deepvis_repro.labels import imagenet_labels


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Caffe's blob names for AlexNet (the paper's CaffeNet is its close variant). Caffe's ReLUs run
# in place, so its conv1 blob holds the post-ReLU value: the alias points at the ReLU.
ALEXNET_ALIASES = {
    "conv1": "features.1", "pool1": "features.2", "conv2": "features.4", "pool2": "features.5",
    "conv3": "features.7", "conv4": "features.9", "conv5": "features.11", "pool5": "features.12",
    "fc6": "classifier.2", "fc7": "classifier.5", "fc8": "classifier.6",
}


_warned: set = set()


def _warn_random(arch: str) -> None:
    """Random weights give random labels: say so, once per process."""
    import sys

    if arch not in _warned:
        _warned.add(arch)
        print(f"warning: torchvision {arch} has random weights (backend.weights=null): its labels and "
              "pictures mean nothing; give backend.weights=DEFAULT (a download) or a state-dict file",
              file=sys.stderr)


def _build(arch: str, weights):
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise DeepvisError(f"unknown torchvision arch '{arch}'; " + did_you_mean(arch, names))
    if weights is None or str(weights).lower() in ("none", "null", ""):
        _warn_random(arch)
        return torchvision.models.get_model(arch, weights=None), None
    looks_like_file = os.path.exists(str(weights)) or os.sep in str(weights) or str(weights).endswith(
        (".pt", ".pth", ".bin", ".safetensors"))
    if not looks_like_file:  # "DEFAULT" or an enum member name such as "IMAGENET1K_V1"
        try:
            enum = torchvision.models.get_model_weights(arch)
            w = enum.DEFAULT if str(weights).upper() == "DEFAULT" else enum[str(weights).split(".")[-1]]
        except (KeyError, ValueError) as e:
            raise DeepvisError(f"torchvision has no weights '{weights}' for {arch}: {e}") from None
        try:
            return torchvision.models.get_model(arch, weights=w), w
        except Exception as e:  # the download failed: offline, or a proxy
            raise DeepvisError(f"cannot get torchvision weights {w} for {arch} (needs a download): "
                               f"{str(e).splitlines()[0][:160]}") from None

    model = torchvision.models.get_model(arch, weights=None)
    sd = load_state_dict_file(str(weights))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = [l.strip() for l in str(e).splitlines() if l.strip()][1:2]
        raise DeepvisError(f"weights file {weights} does not fit torchvision {arch}: "
                           f"{(first or [str(e)[:200]])[0][:200]}") from None
    return model, None


class TorchvisionBackend(HookBackend):
    def __init__(self, arch: str = "alexnet", weights=None, input_size=None, crop: bool = True,
                 lr_scale=None, progress_scale: float = 1.0, device: str = "cpu", resize=None,
                 until: str | None = None):
        model, w = _build(arch, weights)
        mean, std, size = IMAGENET_MEAN, IMAGENET_STD, 224
        labels = imagenet_labels()
        if w is not None:
            tf = w.transforms()
            mean, std = tuple(tf.mean), tuple(tf.std)
            size = int(tf.crop_size[0])
            labels = list(w.meta.get("categories") or labels)
        n_out = getattr(model, "num_classes", None)
        size = check_input_size(input_size, f"torchvision {arch}") if input_size else (size, size)
        model.eval()
        layer_paths = discover_layers(model, torch.zeros(1, 3, *size))
        mean255 = torch.tensor(mean) * 255.0
        scale = 1.0 / (torch.tensor(std) * 255.0)
        aliases = {k: v for k, v in ALEXNET_ALIASES.items()} if arch == "alexnet" else {}
        super().__init__(
            model, layer_paths,
            to_input=lambda x, s=scale.view(1, 3, 1, 1): x * s.to(x.device),
            mean=mean255, input_size=size, labels=labels if n_out in (None, 1000) else None,
            aliases=aliases, crop=crop, lr_scale=lr_scale, name=f"torchvision:{arch}", device=device,
            progress_scale=progress_scale, resize=resize, until=until)
