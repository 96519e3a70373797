"""Any .onnx file as a backend, converted to a torch.fx module by onnx2torch after a clean-up
pass over the graph. Its input scaling is given in the config: mean and std on a 0..255 scale
(RGB order), and the channel order the model expects."""
from __future__ import annotations

import os

import torch

from deepvis_repro.backend import HookBackend
from deepvis_repro.errors import DeepvisError
from deepvis_repro.labels import imagenet_labels, read_labels

SKIP_MODULES = ("Dropout", "Identity")


def clean_graph(model):
    """Make an exporter's ONNX convertible by onnx2torch, keeping its function:
    - an Identity whose input is an initializer (exporters share equal weights that way) becomes
      a copy of that initializer under the Identity's output name;
    - Constant nodes become initializers;
    - initializers are removed from the graph inputs (older exporters list weights as inputs)."""
    import onnx

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            t = onnx.TensorProto()
            t.CopyFrom(inits[node.input[0]])
            t.name = node.output[0]
            g.initializer.append(t)
            inits[t.name] = t
        elif node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            g.initializer.append(t)
            inits[t.name] = t
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    inputs = [i for i in g.input if i.name not in inits]
    del g.input[:]
    g.input.extend(inputs)
    return model


def load_onnx(path: str):
    import onnx
    from google.protobuf.message import DecodeError

    if not os.path.isfile(path):
        raise DeepvisError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(path)
    except (DecodeError, ValueError, OSError) as e:
        raise DeepvisError(f"cannot read ONNX file {path}: not an ONNX model, or corrupt ({e})") from None
    if not len(model.graph.node):
        raise DeepvisError(f"ONNX file {path} holds no graph")
    return clean_graph(model)


def convert(model, path: str):
    import onnx2torch

    try:
        return onnx2torch.convert(model)
    except NotImplementedError as e:
        desc = str(e)
        op = desc.split("operation_type='")[1].split("'")[0] if "operation_type='" in desc else desc
        ver = desc.split("version=")[1].rstrip(")") if "version=" in desc else "?"
        raise DeepvisError(f"ONNX file {path} uses operator {op} (opset {ver}), which onnx2torch "
                           "cannot convert") from None


class OnnxBackend(HookBackend):
    """Layers are the converted graph's modules, in order, named after the ONNX nodes."""

    def __init__(self, path: str, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), channel_order: str = "RGB",
                 labels=None, input_size=None, crop: bool = True, lr_scale=None, progress_scale: float = 1.0,
                 device: str = "cpu"):
        path = os.fspath(path)
        model = load_onnx(path)
        if input_size is None:
            dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
            if len(dims) != 4 or not dims[2] or not dims[3]:
                raise DeepvisError(f"ONNX file {path} has no fixed input size; give backend.input_size=[H,W]")
            input_size = (dims[2], dims[3])
        module = convert(model, path)
        paths = [(n.target, n.target) for n in module.graph.nodes if n.op == "call_module"
                 and not type(module.get_submodule(n.target)).__name__.startswith(SKIP_MODULES)]
        if channel_order.upper() not in ("RGB", "BGR"):
            raise DeepvisError(f"channel_order must be RGB or BGR, got '{channel_order}'")
        order = torch.tensor([0, 1, 2] if channel_order.upper() == "RGB" else [2, 1, 0])
        inv_std = 1.0 / torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)
        if labels == "imagenet":
            labels = imagenet_labels()
        elif labels:
            labels = read_labels(labels)
        super().__init__(
            module, paths,
            to_input=lambda x: (x * inv_std.to(x.device)).index_select(1, order.to(x.device)),
            mean=[float(m) for m in mean], input_size=input_size, labels=labels,
            prob=labels is not None, crop=crop, lr_scale=lr_scale, progress_scale=progress_scale,
            name=f"onnx:{os.path.basename(path)}", device=device)
