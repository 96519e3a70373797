"""The one contract every backend fulfils (README: Backends), and a generic implementation on
forward hooks that any torch module with named submodules can use.

Everything above this file sees only: ``module``, ``layers``, ``labels``, ``input_size``, ``mean``,
``channels``, ``forward(x, layers)``, ``stream(x, layers, visit)``, ``preprocess(image, crop)``,
``views_to_x(views)``, ``deprocess(x)`` (plus ``lr_scale`` and ``device``).
``x`` is always (N, channels, H, W), mean-subtracted, on a 0..255 scale: RGB for a 3-channel model,
grey (ITU-R 601 luma) for a 1-channel one; a backend maps it to its module's input. Pictures
(views, deprocessed images) are HxWx3 uint8 for every model: a grey model's are grey.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import DeepvisError, did_you_mean
from .layout import PREFIX, Layout, canonical, decide, trace
from .view import View


#: The largest input side any backend accepts: a claim beyond it (a tiny file declaring a
#: 10000x10000 input) is refused before anything of that size is allocated.
MAX_INPUT_SIDE = 4096


def check_input_size(size, source: str) -> tuple[int, int]:
    """(h, w) as ints, each in 1..MAX_INPUT_SIDE, or a DeepvisError naming the source. One
    number is a square (``backend.input_size=320``, as a user writes it)."""
    given = size
    if isinstance(size, (int, str)) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise DeepvisError(f"input size {given!r} ({source}) must be [height, width] or one number "
                           "(a square) in pixels") from None
    if not (1 <= h <= MAX_INPUT_SIDE and 1 <= w <= MAX_INPUT_SIDE):
        raise DeepvisError(f"input size {h}x{w} ({source}) is not in 1..{MAX_INPUT_SIDE} pixels a side; "
                           "give backend.input_size=[H,W] if the model accepts a smaller input")
    return h, w


class _StopForward(Exception):
    """Raised from a hook once the deepest requested layer has been computed."""


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients, and no in-place activations (an in-place ReLU would
    overwrite the tensor a hook just handed out, and Caffe's blobs are separate values here)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        if getattr(m, "inplace", False):
            m.inplace = False
    return module


class Backend:
    """Base class: the contract's image handling. Subclasses set ``module``, ``layers``,
    ``labels``, ``input_size`` and ``mean`` and implement ``forward``."""

    module: nn.Module
    layers: list[str]
    labels: list[str] | None
    input_size: tuple[int, int]
    mean: torch.Tensor
    #: Multiplies the paper's learning rates, which assume CaffeNet's gradient scale. None means
    #: "calibrate": see deepvis_repro.optimize.calibrate_lr_scale (and the README).
    lr_scale: float | None = 1.0
    #: Multiplies the 'progress' policies' desired objective gain per step (in the unit's own
    #: units, which differ between networks); 1 for Caffe models.
    progress_scale: float = 1.0
    #: Extra names accepted for layers (e.g. Caffe's conv1 for torchvision AlexNet's features.1).
    aliases: dict[str, str] = {}
    crop: bool = True
    #: (h, w): stretch to this size first, then centre-crop the input size (Caffe's transform).
    resize: tuple[int, int] | None = None
    name: str = "backend"
    #: The channel order the model itself reads ("RGB", "BGR": Caffe models, or "grey").
    #: Informational: the contract's x is RGB for every 3-channel backend (a BGR model swaps the
    #: channels inside) and grey for a 1-channel one.
    channel_order: str = "RGB"
    #: The image channels the model reads, as its first layer declares them: 3 or 1 (grey). A model
    #: of any other count loads and lists its layers, but no image can be fed to it (check_images).
    channels: int = 3

    # ----- layers ---------------------------------------------------------------------------------
    def resolve_layer(self, name: str) -> str:
        name = str(name)
        if name in self.layers:
            return name
        if name in self.aliases:
            return self.aliases[name]
        raise DeepvisError(f"unknown layer '{name}' for backend {self.name}; "
                           + did_you_mean(name, list(self.layers) + list(self.aliases)))

    def layer_module(self, name: str):
        """The module whose output is the layer's value, or None where the backend does not say
        (a plugin; a synthetic layer). The optimizer's pre_activation option reads it."""
        return None

    def module_path(self, module) -> str | None:
        """The dotted path of ``module`` inside this backend's module (None if it is not in it)."""
        return next((p for p, m in self.module.named_modules() if m is module), None)

    def layer_layout(self, name: str):
        """The layer's Layout (deepvis_repro/layout.py). A backend that does not trace its layers
        (a plugin) is read as the contract has always said: (N, C) vectors and (N, C, H, W) maps."""
        name = self.resolve_layer(name)
        shape = self.cache("raw_shapes").get(name)
        if shape is None:
            h, w = self.input_size
            with torch.no_grad():
                v = self.forward(torch.zeros(1, self.channels, h, w, device=self.device), [name])[name]
            shape = self.cache("raw_shapes")[name] = tuple(v.shape)
        if len(shape) == 2:
            return Layout("vector", ("N", "C"), shape[1], raw=shape[1:])
        if len(shape) == 4:
            return Layout("chw", ("N", "C", "Y", "X"), shape[1], tuple(shape[2:]), raw=shape[1:])
        return Layout("unknown", reason=f"a value of shape {shape[1:]} (a plugin states no layouts)", raw=shape[1:])

    def check_layer(self, name: str) -> str:
        """The layer's name if its layout is decided; else one line saying why no tool takes it."""
        name = self.resolve_layer(name)
        lay = self.layer_layout(name)
        if not lay.decided:
            raise DeepvisError(f"layer {name} of {self.name} cannot be shown or optimized: its layout is "
                               f"unknown ({lay.reason}); deepvis-inspect lists every layer's layout")
        return name

    def cache(self, kind: str) -> dict:
        """A dict this backend keeps for facts derived from it that are costly to measure (its
        layers' shapes: units.layer_shapes; their receptive fields: atlas/receptive.py), one per
        kind, so that no caller stores anything on the backend itself."""
        caches = self.__dict__.setdefault("_caches", {})
        return caches.setdefault(kind, {})

    @property
    def calibrated_lr_scale(self) -> float:
        """lr_scale, or where it is None ('calibrate') the scale measured once on this backend's
        output layer (deepvis_repro.optimize.calibrate_lr_scale) and kept by the backend."""
        if self.lr_scale not in (None, "auto"):
            return float(self.lr_scale)
        if getattr(self, "_calibrated", None) is None:
            from .optimize import NoResponse, calibrate_lr_scale  # the optimizer's measurement, only when asked

            # the output layer, or where none of its units responds at the start image (a
            # zero-initialized head, a U-Net's output), the deepest layer before it that does
            tried = []
            for layer in [self.output_layer] + [l for l in reversed(self.layers) if l not in (self.output_layer, "prob")]:
                if not self.layer_layout(layer).decided:
                    continue
                try:
                    self._calibrated = float(calibrate_lr_scale(self, layer, n_units=16))
                    break
                except NoResponse:
                    tried.append(layer)
                    if len(tried) >= 4:
                        break
            else:
                tried = tried or ["(no layer)"]
            if getattr(self, "_calibrated", None) is None:
                raise DeepvisError(f"cannot calibrate the learning rate of {self.name}: no unit of "
                                   f"{', '.join(tried)} has a gradient at the start image; give "
                                   "backend.lr_scale=VALUE (1 for a network fed 0..255 pixels, about "
                                   "1/std^2 for one fed normalized pixels) or optimize.lr_scale=VALUE")
        return self._calibrated

    @property
    def output_layer(self) -> str:
        """The layer of the class scores that units and ranks refer to: the last before Caffe's
        and our own 'prob' softmax (the logits), or the last layer of a model without one."""
        before = [l for l in self.layers if l != "prob"]
        return before[-1] if before else self.layers[-1]

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def to(self, device) -> "Backend":
        self.module.to(device)
        self.mean = self.mean.to(device)
        return self

    # ----- images ---------------------------------------------------------------------------------
    def check_images(self) -> None:
        """One clear line where an image is to be fed to (or made for) a model whose input is
        neither RGB nor grey: every image tool starts here (through mean_image)."""
        if self.channels not in (1, 3):
            raise DeepvisError(f"{self.name} reads {self.channels}-channel inputs: images can be fed only to "
                               "3-channel (RGB/BGR) and 1-channel (grey) models; inspect still lists its layers")

    def mean_image(self) -> torch.Tensor:
        """The mean as a (channels,H,W) tensor at the input size."""
        self.check_images()
        h, w = self.input_size
        return self.mean.expand(self.channels, h, w) if self.mean.shape[1:] != (h, w) else self.mean

    @property
    def picture_view(self) -> View:
        """How pictures become this network's input (input size, resize, crop, grey)."""
        return View(tuple(self.input_size), bool(self.crop), tuple(self.resize) if self.resize else None,
                    self.channels == 1, float(getattr(self, "crop_pct", 1.0)),
                    str(getattr(self, "interpolation", "bilinear")))

    def view(self, image: np.ndarray, crop: bool | None = None) -> np.ndarray:
        """The image as the network sees it: HxWx3 uint8 at the input size (picture_view; crop:
        this call's choice, e.g. the live view's c key). Crops of receptive fields are cut from it."""
        self.check_images()
        return self.picture_view.fit(image, crop)

    def view_spec(self) -> dict:
        """picture_view as plain data (for loader processes and atlas manifests)."""
        return self.picture_view.as_dict()

    def preprocess(self, image: np.ndarray, crop: bool | None = None) -> torch.Tensor:
        """HxWx{1,3,4} image of any size and dtype -> (1,channels,H,W) x (crop as in view)."""
        img = np.array(self.view(image, crop), dtype=np.uint8, copy=True)
        return self.views_to_x(torch.from_numpy(img).unsqueeze(0))

    def views_to_x(self, views: torch.Tensor) -> torch.Tensor:
        """(N,H,W,3) uint8 views (as view() makes them, on any device) -> (N,channels,H,W) x on
        this backend's device: the one place pictures become the network's input."""
        x = views.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        if self.channels == 1:
            x = x[:, :1]  # a grey view's three channels are equal
        return x.float() - self.mean_image().unsqueeze(0)

    def deprocess(self, x: torch.Tensor) -> np.ndarray:
        """(C,H,W), (1,C,H,W) -> HxWx3 uint8; (N,C,H,W) -> NxHxWx3 uint8 (mean added, clipped;
        a grey model's channel repeated)."""
        x = x.detach()
        single = x.dim() == 3 or x.shape[0] == 1
        if x.dim() == 3:
            x = x.unsqueeze(0)
        img = (x + self.mean_image().to(x.device)).clamp(0, 255).round().to(torch.uint8)
        if img.shape[1] == 1:
            img = img.expand(-1, 3, -1, -1)
        img = img.permute(0, 2, 3, 1).cpu().numpy()
        return img[0] if single else img

    # ----- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, layers: Iterable[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def stream(self, x: torch.Tensor, layers: Iterable[str], visit: Callable[[str, torch.Tensor], None]) -> None:
        """Hand each asked layer's value to visit(name, value), as a caller that only reduces
        each layer wants (the atlas's miner). This default runs forward and visits the results;
        a backend that can hand out each value as soon as it is computed, and keep none
        (HookBackend), overrides it to hold one layer at a time."""
        for name, value in self.forward(x, layers).items():
            visit(name, value)

    def __call__(self, x, layers):
        return self.forward(x, layers)

    def __repr__(self):
        return (f"<{type(self).__name__} {self.name}: {len(self.layers)} layers, "
                f"input {self.input_size}, device {self.device}>")


class HookBackend(Backend):
    """A backend over any module: each layer name maps to a submodule whose output is the layer's
    value, collected with forward hooks. The forward pass is cut short (by an exception from the
    hook) once the deepest requested layer is computed, so asking for ``conv1`` never runs ``fc``.
    The optional layer ``prob`` is the softmax of the module's output."""

    def __init__(self, module: nn.Module, layer_paths: Sequence[tuple[str, str]], *,
                 to_input: Callable[[torch.Tensor], torch.Tensor], mean, input_size,
                 labels=None, prob: bool = True, aliases=None, crop=True, lr_scale=1.0,
                 name="backend", device="cpu", channels_last: bool = False,
                 progress_scale: float = 1.0, resize=None, until: str | None = None, channels: int = 3):
        self.module = freeze(module)
        # NHWC convolutions are faster on CPU (oneDNN) and on GPU tensor cores for conv nets.
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.module.to(memory_format=torch.channels_last)
        self.name = name
        self._to_input = to_input
        self._paths = dict(layer_paths)
        # prob=True adds a 'prob' layer: the softmax of the module's output (for models without one).
        self._synthetic_prob = bool(prob) and "prob" not in self._paths
        self.layers = [n for n, _ in layer_paths] + (["prob"] if self._synthetic_prob else [])
        self._order = {n: i for i, n in enumerate(self.layers)}
        self.labels = labels
        self.input_size = check_input_size(input_size, name)
        self.channels = int(channels)
        if self.channels == 1:
            self.channel_order = "grey"
        mean = torch.as_tensor(mean, dtype=torch.float32)
        c = self.channels
        self.mean = mean.reshape(c, 1, 1) if mean.numel() == c else mean.reshape(c, *mean.shape[-2:])
        self.aliases = dict(aliases or {})
        self.crop = bool(crop)
        self.resize = check_resize(resize, self.input_size)
        self.lr_scale = None if lr_scale in (None, "auto") else float(lr_scale)
        self.progress_scale = float(progress_scale)
        self._submodules = dict(self.module.named_modules())
        self._lock = threading.RLock()
        for n, p in self._paths.items():
            if p not in self._submodules:
                raise DeepvisError(f"layer '{n}' names submodule '{p}', which the model does not have")
        if until not in (None, ""):
            self._keep_until(str(until))
        self.to(device)

    def _keep_until(self, until: str) -> None:
        """backend.until=LAYER: the network up to LAYER only (a detector's or segmenter's
        backbone): later layers are no layers, never run (the forward pass stops at the deepest
        layer asked for), and a cut before the class scores leaves no classes: the kept layer's
        channels are not classes, and 'prob' would be the softmax of a feature map."""
        name = self.resolve_layer(until)
        output = self.output_layer
        self.layers = self.layers[:self.layers.index(name) + 1]
        self._order = {n: i for i, n in enumerate(self.layers)}
        self._synthetic_prob = self._synthetic_prob and "prob" in self.layers
        if name not in (output, "prob"):
            self.labels = None

    def layer_module(self, name: str):
        name = self.resolve_layer(name)
        return self._submodules.get(self._paths[name]) if name in self._paths else None

    def layer_layout(self, name: str):
        if name.endswith(PREFIX) and self.resolve_layer(name[:-len(PREFIX)]):
            name = name[:-len(PREFIX)]
        return self._traced_layouts()[self.resolve_layer(name)]

    def _traced_layouts(self) -> dict:
        """Every layer's Layout, traced once (deepvis_repro/layout.py): a probe batch of two blank
        images through the module under the layout tracer, with hooks on the layers' modules."""
        cached = self.__dict__.get("_layouts")
        if cached is not None:
            return cached
        with self._lock:
            h, w = self.input_size
            # a blank batch of two, as layer_shapes' blank image: labels follow the operations,
            # not the values (and a model that fails on real pictures fails later, visibly)
            x = torch.zeros(2, self.channels, h, w, device=self.device)
            real = [n for n in self.layers if not (n == "prob" and self._synthetic_prob)]
            mods = {n: self._submodules[self._paths[n]] for n in real}
            deepest = real[-1] if real else None

            def run(inp):
                def stop(_m, _i, _o):
                    raise _StopForward
                handle = mods[deepest].register_forward_hook(stop) if deepest and not self._synthetic_prob else None
                try:
                    self.module(self._input(inp))
                except _StopForward:
                    pass
                finally:
                    if handle is not None:
                        handle.remove()

            with torch.no_grad():
                found = trace(run, x, mods)
            names = self.prefix_names()
            layouts = {}
            for n in real:
                if n not in found.shapes:
                    layouts[n] = Layout("unknown", reason="its module never ran in a forward pass")
                elif found.labels.get(n) is None and n in found.labels:
                    layouts[n] = Layout("unknown", reason="its module runs more than once per forward pass")
                else:
                    layouts[n] = decide(found.labels[n], found.shapes[n], names)
                if n in found.shapes:
                    raw = list(found.shapes[n])
                    axes = layouts[n].axes
                    del raw[axes.index("N") if "N" in axes else 0]
                    layouts[n] = replace(layouts[n], raw=tuple(raw))
            if self._synthetic_prob:
                out = layouts.get(self.output_layer)
                layouts["prob"] = Layout("vector", ("N", "C"), out.channels if out else 0)
            self._layouts = layouts
        return layouts

    def prefix_names(self):
        """Names of a token model's prefix tokens in order ('cls', 'dist', 'reg0', ...), or None
        (then one prefix token is 'cls', more are tok0, tok1, ...). Backends that know them say so."""
        return getattr(self, "_prefix_names", None)

    def _input(self, x):
        inp = self._to_input(x)
        if self.channels_last and inp.dim() == 4:
            inp = inp.contiguous(memory_format=torch.channels_last)
        return inp

    def __getstate__(self):
        # A lock cannot be pickled; a copy (a Ray actor, a deepcopy) gets a lock of its own.
        state = dict(self.__dict__)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def stream(self, x, layers, visit) -> None:
        self.forward(x, layers, visit=visit)

    def forward(self, x: torch.Tensor, layers: Iterable[str], visit=None) -> dict[str, torch.Tensor]:
        """{name: value} of the layers asked for. With ``visit``, each value is handed to
        visit(name, value) as soon as it is computed and not kept (the dict comes back empty):
        a caller that only reduces each layer (the atlas's miner) then holds one layer at a time,
        not all of them until the pass ends."""
        layers = [layers] if isinstance(layers, str) else list(layers)
        wants_prefix = {n[:-len(PREFIX)] for n in layers if n.endswith(PREFIX)}
        layers = [n[:-len(PREFIX)] if n.endswith(PREFIX) else n for n in layers]
        names = [self.resolve_layer(n) for n in layers]
        if not names:
            return {}
        layouts = self._traced_layouts()
        prefixes: dict[str, torch.Tensor] = {}
        deepest = max(names, key=self._order.__getitem__)
        synthetic = {"prob"} if self._synthetic_prob else set()
        out: dict[str, torch.Tensor] = {}
        asked: dict[str, list[str]] = {}
        for a, n in zip(layers, names):
            if a not in asked.setdefault(n, []):  # 'L' and 'L:prefix' ask for one layer once
                asked[n].append(a)

        def make_hook(name):
            def hook(_mod, _inp, output):
                if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                    output = output[0]  # an attention module's (output, weights)
                lay = layouts.get(name)
                prefix = None
                if lay is not None and lay.decided and isinstance(output, torch.Tensor):
                    # the one view every tool reads: (N, C) or (N, C, H, W), prefix tokens aside
                    output, prefix = canonical(output, lay)
                    if prefix is not None:
                        prefixes[name] = prefix
                if visit is None:
                    out[name] = output
                else:
                    for a in asked[name]:
                        if a in wants_prefix and prefix is not None:
                            visit(a + PREFIX, prefix)  # before the map: a caller can join the two
                        visit(a, output)
                if name == deepest:
                    raise _StopForward
            return hook

        # Hooks live on the shared module: one forward at a time (the live view has two threads).
        with self._lock:
            handles = [self._submodules[self._paths[n]].register_forward_hook(make_hook(n))
                       for n in set(names) - synthetic]
            try:
                final = self.module(self._input(x))
                if synthetic & set(names):
                    prob = torch.softmax(final.flatten(1), dim=1)
                    if visit is None:
                        out["prob"] = prob
                    else:
                        visit("prob", prob)
            except _StopForward:
                pass
            finally:
                for h in handles:
                    h.remove()
        if visit is not None:
            return {}
        # Requested aliases come back under the name the caller used.
        result = {a: out[name] for a, name in zip(layers, names)}
        for a, name in zip(layers, names):
            if a in wants_prefix:
                if name not in prefixes:
                    raise DeepvisError(f"layer {a} has no prefix tokens")
                result[a + PREFIX] = prefixes[name]
        return result


def check_resize(resize, input_size) -> tuple[int, int] | None:
    """None, or (h, w) at least the input size: the Caffe-style resize before the centre crop."""
    if resize in (None, False, "", "null", "none"):
        return None
    try:
        r = [int(v) for v in (resize if isinstance(resize, (list, tuple)) else [resize, resize])]
    except (TypeError, ValueError):
        raise DeepvisError(f"resize must be [height, width] in pixels, got {resize!r}") from None
    if len(r) != 2 or r[0] < input_size[0] or r[1] < input_size[1]:
        raise DeepvisError(f"resize {resize} must be [height, width] no smaller than the input "
                           f"{input_size[0]}x{input_size[1]}")
    return (r[0], r[1])


#: Inside a transformer block, what a user looks at besides the block's output (the residual
#: stream): its attention output and its MLP output.
SUBLAYER_NAMES = ("attn", "attention", "self_attention", "mlp", "ffn", "token_mixer", "mixer")
SUBLAYER_TYPES = ("Attention", "MLP", "Mlp")


def discover_layers(module: nn.Module, example: torch.Tensor,
                    skip=(nn.Dropout, nn.Identity)) -> list[tuple[str, str]]:
    """Readable layer names from the module tree, in execution order: the top-level children,
    with nn.Sequential / nn.ModuleList containers opened recursively (blocks such as a ResNet
    Bottleneck stay whole); a container holding such a list (a ViT's ``encoder``, a Swin stage) is
    listed and opened too, and a block's attention and MLP are listed beside it. Modules called
    more than once per forward are left out, since one name could not say which call it means."""
    candidates: list[str] = []

    def is_list(m):
        return isinstance(m, (nn.Sequential, nn.ModuleList))

    def holds_blocks(m):  # a list of at least two modules that have parts of their own
        return any(is_list(g) and sum(1 for b in g.children() if next(b.children(), None) is not None) >= 2
                   for g in m.children())

    def walk(prefix, mod, in_list=False):
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if is_list(child):
                walk(path, child, in_list=True)
            elif isinstance(child, skip):
                continue
            else:
                candidates.append(path)
                if holds_blocks(child):
                    walk(path, child)  # a container of blocks: its blocks are layers too
                elif in_list:
                    for sub, g in child.named_children():
                        kind = type(g).__name__
                        if sub in SUBLAYER_NAMES or any(t in kind for t in SUBLAYER_TYPES):
                            candidates.append(f"{path}.{sub}")

    walk("", module)
    subs = dict(module.named_modules())
    calls: list[str] = []
    handles = [subs[p].register_forward_hook(lambda m, i, o, p=p: calls.append(p)) for p in candidates]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
    seen_once = [p for p in dict.fromkeys(calls) if calls.count(p) == 1]
    return [(p, p) for p in seen_once]
