"""Any .onnx file as a backend, converted to a torch.fx module by onnx2torch after a clean-up
pass over the graph.

What works (tests/test_onnx.py builds each case): classification models exported by
torch.onnx.export (TorchScript exporter, opset 9-17; the dynamo exporter's opset 18+ is converted
to opset 17 with onnx's version converter, or, where it has no adapter, read as opset 17 when every
node means the same there: onnx_opset.py), tf2onnx / paddle2onnx style graphs with NHWC inputs,
graphs that end in their own Softmax, graphs full of shape arithmetic, and the files
deepvis-convert writes from Caffe models (their metadata gives the channel order, mean and scale).
What does not: operators onnx2torch has no converter for (the error names the operator and opset),
and external-data files outside the model's folder (refused by onnx; the error says so).

Layers are the tensors a user can look at: float activations with a batch and a channel axis, in
graph order, shown as NCHW maps whatever the graph's own layout; bookkeeping nodes (Shape,
Gather of shapes, Cast, Identity, ...) are not layers. ``prob`` is the model's own Softmax when
the graph ends in one, else the softmax of its output (with labels).
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter

import numpy as np
import torch
from onnx2torch.node_converters.pad import OnnxPadDynamic

from deepvis_repro.backend import HookBackend, check_input_size
from deepvis_repro.errors import DeepvisError, did_you_mean
from deepvis_repro.images import LUMA
from deepvis_repro.labels import check_label_count, imagenet_labels, read_labels

from .onnx_opset import as_opset17

# onnx2torch's Slice indexes with a list, which torch 2.x warns about on every forward pass of
# such a graph (every command, every frame); the values are right: the warning is torch's, about
# a future version, and nothing a user of this tool can act on.
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing",
                        category=UserWarning, module=r"onnx2torch\.")

SKIP_MODULES = ("Dropout", "Identity", "OnnxCopyIdentity")
#: ONNX operators that only move or relabel values (a transposed or reshaped copy of another
#: layer, or of the input): never layers of their own.
REARRANGING = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Expand", "Identity",
               "Dropout", "Shape", "Size", "ConstantOfShape"}
#: The opset onnx2torch converts fully; newer files are converted down to it first.
TARGET_OPSET = 17
#: Defaults where neither the user nor the file's metadata says: torchvision's ImageNet scaling.
DEFAULT_MEAN, DEFAULT_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)

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


def topological(model, path: str):
    """The graph's nodes in an order where every value is made before it is used. ONNX requires
    it, onnxruntime does not check it, and some writers (onnxruntime's own fp16 converter) put a
    node after its users; onnx2torch then fails on a value it has not seen. A stable sort: nodes
    already in order keep it."""
    g = model.graph
    made_by = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    known = {i.name for i in g.initializer} | {i.name for i in g.input} | {""}
    nodes = list(g.node)
    needs = [{v for v in n.input if v not in known and v in made_by} for n in nodes]
    if all(made_by[v] < i for i, vs in enumerate(needs) for v in vs):
        return model  # already in order (nearly every file)
    import heapq

    users: dict[int, list[int]] = {}
    waiting = [len(vs) for vs in needs]
    for i, vs in enumerate(needs):
        for v in vs:
            users.setdefault(made_by[v], []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            waiting[u] -= 1  # one count per input value (a node using a value twice counts it once)
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = next(nodes[i] for i in range(len(nodes)) if i not in set(order))
        raise DeepvisError(f"ONNX file {path}: its graph has a cycle (node {stuck.name or stuck.output[0]}, "
                           f"{stuck.op_type}): not a valid model")
    del g.node[:]
    g.node.extend(nodes[i] for i in order)
    return model


def as_float32(model):
    """A float16 file (onnxruntime's fp16 converter, half-precision exports) read in float32:
    its weights, constants, Casts to float16 and declared float16 values become float32. The
    arithmetic is then float32's, which the file's float16 weights hold exactly."""
    import onnx
    from onnx import numpy_helper

    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    g = model.graph
    changed = False
    for i, t in enumerate(g.initializer):
        if t.data_type == F16:
            new = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
            g.initializer[i].CopyFrom(new)
            changed = True
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == F16:
                a.i, changed = F32, True
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
                changed = True
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == F16:
            v.type.tensor_type.elem_type, changed = F32, True
    if changed:
        model.metadata_props.add(key="deepvis.read_as", value="float16 file, computed in float32")
    return model


def check_single_input(model, path: str, constants: dict | None = None):
    """deepvis feeds a model one image: a second input (a mask, a second image, a size) is named,
    or, given in ``constants`` ({name: value}, backend.constant_inputs), made a constant of its
    declared shape inside the graph (its batch axis follows the image's)."""
    from onnx import helper, numpy_helper

    if constants is not None and not hasattr(constants, "items"):
        raise DeepvisError(f"backend.constant_inputs must be a mapping {{input name: value}}, got {constants!r}")
    constants = {str(k): v for k, v in (constants or {}).items()}
    ins = list(model.graph.input)
    extra = ins[1:]
    unknown = sorted(set(constants) - {v.name for v in extra})
    if unknown:
        raise DeepvisError(f"backend.constant_inputs names {', '.join(unknown)}, which "
                           + (f"the model's other inputs are not ({', '.join(v.name for v in extra)})" if extra
                              else "the model does not have: it has one input"))

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    left = [v for v in extra if v.name not in constants]
    if left:
        names = ", ".join(f"'{v.name}' [{', '.join(map(str, shape(v)))}]" for v in ins)
        raise DeepvisError(f"ONNX file {path} has {len(ins)} inputs ({names}); deepvis feeds a model one image: "
                           f"give the others a constant value, e.g. backend.constant_inputs={{{left[0].name}: 1.0}}, "
                           f"or export it with the image as its only input")
    g = model.graph
    for v in extra:
        dims = shape(v)
        if any(isinstance(d, str) or not d for d in dims[1:]):
            raise DeepvisError(f"backend.constant_inputs: input '{v.name}' has shape {dims}: only its first "
                               "(batch) axis may be open for a constant")
        try:
            value = float(constants[v.name])
        except (TypeError, ValueError):
            raise DeepvisError(f"backend.constant_inputs.{v.name} must be a number, got {constants[v.name]!r}") from None
        np_type = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        fill = numpy_helper.from_array(np.array([value], dtype=np_type), f"{v.name}__fill")
        rest = numpy_helper.from_array(np.array(dims[1:], dtype=np.int64), f"{v.name}__rest")
        g.initializer.extend([rest])
        if isinstance(dims[0], str) or not dims[0]:  # the batch follows the image's
            nodes = [helper.make_node("Shape", [ins[0].name], [f"{v.name}__ishape"], start=0, end=1),
                     helper.make_node("Concat", [f"{v.name}__ishape", f"{v.name}__rest"], [f"{v.name}__shape"], axis=0)]
            if _opset(model) < 15:  # Shape's start/end came in opset 15
                nodes = [helper.make_node("Shape", [ins[0].name], [f"{v.name}__ishape_all"]),
                         helper.make_node("Slice", [f"{v.name}__ishape_all", f"{v.name}__zero", f"{v.name}__one"],
                                          [f"{v.name}__ishape"]), nodes[1]]
                g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), f"{v.name}__zero"),
                                      numpy_helper.from_array(np.array([1], np.int64), f"{v.name}__one")])
        else:
            g.initializer.append(numpy_helper.from_array(np.array(dims, dtype=np.int64), f"{v.name}__shape"))
            nodes = []
        nodes.append(helper.make_node("ConstantOfShape", [f"{v.name}__shape"], [v.name], value=fill))
        for n in reversed(nodes):
            g.node.insert(0, n)
    if extra:
        del g.input[1:]
    return model


AUTO_PAD_OPS = ("Conv", "MaxPool", "AveragePool", "LpPool")


def explicit_pads(model, path: str, input_size=None, layout: str = "NCHW"):
    """auto_pad SAME_UPPER / SAME_LOWER / VALID (Keras and TensorFlow exports) written as the
    explicit pads they stand for, which onnx2torch converts (it refuses SAME_*). SAME pads the
    total (ceil(in / stride) - 1) * stride + (kernel - 1) * dilation + 1 - in, its odd pixel at the
    end (UPPER) or the start (LOWER): the input sizes come from onnx's shape inference."""
    import math

    import onnx

    nodes = [n for n in model.graph.node if n.op_type in AUTO_PAD_OPS
             and any(a.name == "auto_pad" and a.s.decode() not in ("NOTSET", "") for a in n.attribute)]
    if not nodes:
        return model
    probe = model
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if input_size and len(dims) == 4 and any(not d.dim_value for d in dims[1:]):
        # a dynamic input: shape inference on a copy whose input has the size the model will be fed
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        pd = probe.graph.input[0].type.tensor_type.shape.dim
        for axis, v in zip((2, 3) if layout == "NCHW" else (1, 2), input_size):
            pd[axis].dim_value = int(v)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe)
    except Exception:  # shape inference is a convenience here: without it, sizes stay unknown
        inferred = probe
    shapes = {v.name: [d.dim_value or None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in nodes:
        attrs = {a.name: a for a in node.attribute}
        mode = attrs["auto_pad"].s.decode()
        where = f"ONNX file {path}: node {node.name or node.output[0]} ({node.op_type}, auto_pad={mode})"
        shape = shapes.get(node.input[0])
        kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else inits.get(node.input[1], [])[2:]
        spatial = shape[2:] if shape and len(shape) >= 3 else [None] * max(1, len(kernel))
        if mode == "VALID":  # no padding: nothing to know about the input's size
            spatial = [0] * len(kernel) if kernel else spatial
        if None in spatial:
            raise DeepvisError(f"{where}: the size of its input is unknown (onnx's shape inference gives "
                               "none), so its padding cannot be made explicit; give backend.input_size=[H,W] "
                               "or export the model with a fixed input size")
        rank = len(spatial)
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * rank
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * rank
        if len(kernel) != rank:
            raise DeepvisError(f"{where}: its kernel size is unknown (no kernel_shape, and the weight is not "
                               "a constant), so its padding cannot be made explicit")
        begin, end = [], []
        for n, k, st, d in zip(spatial, kernel, strides, dilations):
            total = 0 if mode == "VALID" else max((math.ceil(n / st) - 1) * st + (k - 1) * d + 1 - n, 0)
            small, large = total // 2, total - total // 2
            begin.append(small if mode != "SAME_LOWER" else large)
            end.append(total - begin[-1])
        for name in ("auto_pad", "pads"):
            if name in attrs:
                node.attribute.remove(attrs[name])
        node.attribute.append(onnx.helper.make_attribute("pads", begin + end))
    return model


def check_initializers(model, path: str) -> None:
    """Every weight holds as many values as its shape claims (a tiny file declaring a
    4x3x30000x30000 weight is refused here, before anything of that size is made)."""
    import math

    import onnx

    fields = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue  # read from its own file by onnx.load, which checks it
        claimed = math.prod(t.dims)
        if t.raw_data:
            size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            held = len(t.raw_data) // max(size, 1)
        else:
            held = max((len(getattr(t, f)) for f in fields), default=0)
            if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
                held //= 2
        if held != claimed:
            raise DeepvisError(f"ONNX file {path}: weight '{t.name}' claims shape {list(t.dims)} "
                               f"({claimed:,} values) but holds {held:,}: a damaged or forged file")


def load_onnx(path: str, constant_inputs: dict | None = None):
    import onnx

    if not os.path.isfile(path):
        raise DeepvisError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(path)  # external data is read from the model's folder only (onnx refuses the rest)
    except Exception as e:  # DecodeError, ValidationError (external data outside the folder), OSError ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "external" in msg.lower() or "outside" in msg.lower() or "directory" in msg.lower():
            raise DeepvisError(f"cannot read ONNX file {path}: its external data is refused ({msg[:200]})") from None
        raise DeepvisError(f"cannot read ONNX file {path}: not an ONNX model, or corrupt ({msg[:200]})") from None
    if not len(model.graph.node):
        raise DeepvisError(f"ONNX file {path} holds no graph")
    check_initializers(model, path)
    if not len(model.graph.input):
        raise DeepvisError(f"ONNX file {path} has no graph input")
    model = as_float32(topological(clean_graph(model), path))
    check_single_input(model, path, constant_inputs)
    return model


def _opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


class PadDynamic(OnnxPadDynamic):
    """onnx2torch's dynamic Pad hands F.pad the pad value as a tensor (F.pad wants a float), which
    breaks every opset-11+ Pad with a constant value; this one converts it."""

    def forward(self, input_tensor, pads, constant_value=0.0):
        if isinstance(constant_value, torch.Tensor):
            constant_value = float(constant_value.reshape(-1)[0]) if constant_value.numel() else 0.0
        return super().forward(input_tensor, pads, constant_value)


def _fix_modules(module):
    """Repairs of onnx2torch's modules, in place (a class swap: copies and pickles still work)."""
    for m in module.modules():
        if type(m) is OnnxPadDynamic:
            m.__class__ = PadDynamic
    return module


def _node_names(model) -> list[tuple[str, object]]:
    """(layer name, node) in graph order: onnx2torch's unique node names, which its modules and
    so this backend's layers are named after."""
    from onnx2torch.onnx_graph import OnnxGraph

    names = list(OnnxGraph(model.graph).nodes)
    return list(zip(names, model.graph.node))


def cut_at(model, until: str, path: str):
    """backend.until on an ONNX file: the graph up to that layer (a node's name, or the value it
    makes) and nothing after it, cut before conversion, so that a head of
    operators onnx2torch cannot convert (a detector's NMS, ...) does not stop its backbone.
    Returns (the cut model, the value it ends with)."""
    import onnx

    named = _node_names(model)
    value = next((n.output[0] for name, n in named if name == until), None)
    if value is None:  # the node's name as the file writes it (onnx2torch's may differ)
        value = next((n.output[0] for _, n in named if n.name and n.name == until), None)
    if value is None and any(until in n.output for _, n in named):
        value = until
    if value is None:
        raise DeepvisError(f"until={until}: ONNX file {path} has no node or value of that name; "
                           + did_you_mean(until, [name for name, _ in named] + [n.name for _, n in named if n.name]))
    # the nodes the value depends on, in graph order (not onnx's Extractor: it needs the shapes of
    # every value, which shape inference does not give past an operator it does not know)
    maker = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    keep, todo = set(), [value]
    while todo:
        v = todo.pop()
        i = maker.get(v)
        if i is not None and i not in keep:
            keep.add(i)
            todo.extend(model.graph.node[i].input)
    nodes = [n for i, n in enumerate(model.graph.node) if i in keep]
    used = {v for n in nodes for v in n.input}
    graph = onnx.helper.make_graph(
        nodes, model.graph.name, [model.graph.input[0]],
        [onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in used])
    cut = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    cut.metadata_props.extend(model.metadata_props)
    return cut, value


def _first_node_of(model, op: str) -> tuple[str | None, str | None]:
    """(the first node of operator op, the node that makes its input): layer names, or None."""
    named = _node_names(model)
    maker = {o: name for name, n in named for o in n.output}
    first = next(((name, n) for name, n in named if n.op_type == op), None)
    if first is None:
        return None, None
    return first[0], next((maker[i] for i in first[1].input if i in maker), None)


def convert(model, path: str):
    """onnx2torch, first as is; a file newer than opset 17 that it refuses is converted down to
    opset 17 with onnx's version converter (the dynamo exporter writes ReduceMean at opset 18)."""
    try:
        module = _convert(model, path)
    except DeepvisError:
        raise
    except Exception as e:  # a converter's own check failed ('spatial rank == -2', a KeyError ...)
        raise _converter_failure(model, path, e) from None
    return _fix_modules(module)


def _converter_failure(model, path: str, e: Exception) -> DeepvisError:
    """One line for a failure inside onnx2torch: the node it was converting (found in the
    traceback: its converter loop's ``name`` and ``onnx_node``), its operator, and the cut that
    looks at the network before it."""
    name = op = None
    tb = e.__traceback__
    while tb is not None:
        loc = tb.tb_frame.f_locals
        node = loc.get("onnx_node")
        if node is not None and hasattr(node, "operation_type"):
            name, op = loc.get("name") or getattr(node, "unique_name", None), node.operation_type
        tb = tb.tb_next
    why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    if name is None:
        return DeepvisError(f"ONNX file {path}: onnx2torch cannot convert it: {type(e).__name__}: {why}")
    named = _node_names(model)
    maker = {o: n for n, node in named for o in node.output}
    node = dict(named).get(name)
    before = next((maker[i] for i in (node.input if node is not None else []) if i in maker), None)
    return DeepvisError(f"ONNX file {path}: node '{name}' ({op}) cannot be converted by onnx2torch ({why})"
                        + (f"; to look at the network before it, give backend.until={before}" if before else ""))


def _convert(model, path: str):
    import onnx2torch

    def describe(e):
        desc = str(e)
        op = desc.split("operation_type='")[1].split("'")[0] if "operation_type='" in desc else desc[:120]
        ver = desc.split("version=")[1].rstrip(")") if "version=" in desc else "?"
        return op, ver

    try:
        return onnx2torch.convert(model)
    except NotImplementedError as e:
        op, ver = describe(e)
        why = str(e)
        if _opset(model) > TARGET_OPSET:
            from onnx import version_converter

            try:
                down = version_converter.convert_version(model, TARGET_OPSET)
                return onnx2torch.convert(down)
            except NotImplementedError as e2:
                op, ver = describe(e2)
                why = str(e2)
            except Exception:
                # no adapter down (Pad, ...): read the file as opset 17 where every node means the
                # same there, else the refusal names the node that does not
                try:
                    return onnx2torch.convert(as_opset17(model, path, _opset(model)))
                except NotImplementedError as e3:
                    op, ver = describe(e3)
                    why = str(e3)
        if "operation_type='" not in why:  # a refusal inside a converter ('spatial rank == -2'): its node
            raise _converter_failure(model, path, e) from None
        node, before = _first_node_of(model, op)
        raise DeepvisError(f"ONNX file {path} uses operator {op} (opset {ver})"
                           + (f" at node '{node}'" if node else "") + ", which onnx2torch cannot convert"
                           + (f"; to look at the network before it, give backend.until={before}" if before else "")) \
            from None


def read_metadata(model) -> dict:
    """The input conventions deepvis-convert records (keys deepvis.*), parsed."""
    meta = {p.key: p.value for p in model.metadata_props}
    out = {}
    for key in ("channel_order", "layout"):
        if f"deepvis.{key}" in meta:
            out[key] = meta[f"deepvis.{key}"]
    for key in ("mean", "std", "input_scale", "blobs", "resize", "cut"):
        if f"deepvis.{key}" in meta:
            try:
                out[key] = json.loads(meta[f"deepvis.{key}"])
            except ValueError:
                pass
    return out


def input_layout(model, layout: str | None) -> tuple[str, tuple[int, int] | None, int]:
    """(NCHW | NHWC, (H, W) or None, channels) of the graph's first input: from the shape, unless
    given (channels 3 where the file leaves them open)."""
    dims = [d.dim_value or None for d in model.graph.input[0].type.tensor_type.shape.dim]
    if layout not in (None, "auto", ""):
        layout = str(layout).upper()
        if layout not in ("NCHW", "NHWC"):
            raise DeepvisError(f"layout must be NCHW, NHWC or auto, got '{layout}'")
    if len(dims) != 4:
        raise DeepvisError(f"the model's input has shape {dims}; an image model takes [N, C, H, W] or [N, H, W, C]")
    if layout in (None, "auto", ""):
        layout = "NHWC" if dims[3] in (1, 3) and dims[1] not in (1, 3) else "NCHW"
    h, w = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    channels = (dims[1] if layout == "NCHW" else dims[3]) or 3
    return layout, ((h, w) if h and w else None), int(channels)


class OnnxBackend(HookBackend):
    """Layers are the converted graph's modules, in order, named after the ONNX nodes."""

    def __init__(self, path: str, mean=None, std=None, channel_order: str | None = None,
                 labels=None, input_size=None, crop: bool = True, lr_scale=None, progress_scale: float = 1.0,
                 device: str = "cpu", layout: str | None = "auto", resize=None, name: str | None = None,
                 until: str | None = None, constant_inputs: dict | None = None):
        from onnx2torch.onnx_graph import OnnxGraph

        path = os.fspath(path)
        model = load_onnx(path, constant_inputs)
        meta = read_metadata(model)
        layout, size, channels = input_layout(model, layout if layout not in (None, "auto") else meta.get("layout", layout))
        if input_size is None:
            if size is None:
                raise DeepvisError(f"ONNX file {path} has no fixed input size; give backend.input_size=[H,W]")
            input_size = size
        input_size = check_input_size(input_size, f"ONNX file {path}")  # before any forward pass
        model = explicit_pads(model, path, input_size, layout)
        last_value = None
        if meta.get("cut"):
            labels = None  # deepvis-convert wrote a Caffe net built up to backend.until only
        if until not in (None, ""):
            ops = Counter(n.op_type for n in model.graph.node)
            model, last_value = cut_at(model, str(until), path)
            removed = ops - Counter(n.op_type for n in model.graph.node)
            if set(removed) - {"Softmax", "Identity", "Flatten", "Reshape", "Squeeze"}:
                labels = None  # cut before the class scores: the kept layer's channels are not classes
        nodes = dict(OnnxGraph(model.graph).nodes)
        module = convert(model, path)
        scale = float(meta.get("input_scale", 1.0))
        default_mean, default_std = default_scaling(channels)
        mean = meta.get("mean", default_mean) if mean is None else mean
        mean_image = np.asarray(mean, np.float32) if np.asarray(mean).ndim == 3 else None  # a Caffe mean file
        std = meta.get("std", default_std if "mean" not in meta else (1.0 / scale,) * channels) if std is None else std
        channel_order = channel_order or meta.get("channel_order", "RGB")
        if str(channel_order).upper() not in ("RGB", "BGR", "GREY"):
            raise DeepvisError(f"channel_order must be RGB or BGR, got '{channel_order}'")
        mean = mean_image if mean_image is not None else _per_channel("mean", mean, channels)
        std = _per_channel("std", std, channels)
        if any(s <= 0 for s in std):
            raise DeepvisError(f"std must be {channels} positive number{'s' * (channels > 1)}, got {std}")
        self.channel_order = str(channel_order).upper()
        swap = channels == 3 and self.channel_order == "BGR"
        inv_std = 1.0 / torch.tensor(std).view(1, channels, 1, 1)
        nhwc = layout == "NHWC"

        def to_input(x):
            x = x * inv_std.to(x.device)
            x = x.flip(1) if swap else x
            return x.permute(0, 2, 3, 1).contiguous() if nhwc else x

        if "blobs" in meta:  # written by deepvis-convert: Caffe's blob names, in Caffe's order
            made = {o for node in nodes.values() for o in node.output_values}
            blobs = meta["blobs"] if until in (None, "") else [b for b in meta["blobs"] if b in made]
            paths = self._blob_layers(blobs, nodes)
        else:
            paths, self.not_layers = self._layers(module, nodes, to_input, tuple(input_size), channels,
                                                  [o.name for o in model.graph.output])
        if last_value is not None:  # the layer the cut graph ends with (a value that is no layer: the last one)
            ending = [n for n, p in paths if nodes.get(p) is not None and last_value in nodes[p].output_values]
            until = ending[0] if ending else paths[-1][0]
        # A graph that ends in its own Softmax: that is prob (a second softmax would flatten it)
        last = paths[-1][1] if paths else None
        own_prob = last is not None and nodes.get(last) is not None and nodes[last].operation_type == "Softmax" \
            and "blobs" not in meta
        has_prob = any(n == "prob" for n, _ in paths)
        aliases = {}
        if own_prob:
            aliases[paths[-1][0]] = "prob"
            paths[-1] = ("prob", last)
        labels_arg = labels
        if labels == "imagenet":
            labels = imagenet_labels()
        elif labels:
            labels = read_labels(labels)
        super().__init__(
            module, paths, to_input=to_input, mean=mean, input_size=input_size, labels=labels,
            prob=labels is not None and not own_prob and not has_prob, crop=crop, lr_scale=lr_scale,
            progress_scale=progress_scale, name=name or f"onnx:{os.path.basename(path)}", device=device,
            aliases=aliases, resize=resize if resize is not None else meta.get("resize"), until=until,
            channels=channels)
        self.layout = layout
        check_label_count(self, labels_arg)

    @staticmethod
    def _blob_layers(blobs, nodes):
        """(blob, module) for each Caffe blob: the module of the node that writes its final value."""
        writer = {node.output_values[0]: name for name, node in nodes.items() if node.output_values}
        missing = [b for b in blobs if b not in writer]
        if missing:
            raise DeepvisError(f"the ONNX file's metadata names blobs its graph does not make: {', '.join(missing[:5])}")
        return [(b, writer[b]) for b in blobs]

    @staticmethod
    def _layers(module, nodes, to_input, size, channels, outputs=()):
        """(name, module path) of every module whose output is an activation: a float tensor with
        the batch and a channel axis, computed once per forward (found with a batch of 2 zero
        images). Which axis is which is the layout tracer's (deepvis_repro/layout.py): an NHWC
        value inside the graph is shown as the map it is."""
        candidates = [n.target for n in module.graph.nodes if n.op == "call_module"
                      and not type(module.get_submodule(n.target)).__name__.startswith(SKIP_MODULES)
                      and not type(module.get_submodule(n.target)).__name__.endswith(SKIP_MODULES)]
        seen: dict[str, list] = {}
        handles = [module.get_submodule(t).register_forward_hook(
            lambda m, i, o, t=t: seen.setdefault(t, []).append(o)) for t in candidates]
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module.eval()
                module(to_input(torch.zeros(2, channels, *size)))
        except Exception as e:
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if _runs_at_batch_1(module, to_input, size, channels):
                # a batch of 1 baked into a Reshape (torch.onnx.export without dynamic_axes): the
                # image is fine, the batch is not; every tool feeds batches (mining, the optimizer)
                raise DeepvisError(
                    "the ONNX model runs only on a batch of 1 (its graph fixes the batch size: " + first
                    + "); export it with a dynamic batch axis, e.g. torch.onnx.export(..., "
                    "dynamic_axes={'input': {0: 'batch'}})") from None
            raise DeepvisError(f"the ONNX model does not run on a {size[0]}x{size[1]} image: {first}") from None
        finally:
            for h in handles:
                h.remove()
        paths, skipped = [], {}
        graph_outputs = {t for t, n in nodes.items() if set(n.output_values) & set(outputs)}
        for t in candidates:
            outs = seen.get(t, [])
            if len(outs) != 1:
                continue
            o = outs[0]
            if (isinstance(o, torch.Tensor) and o.is_floating_point() and 2 <= o.dim() <= 4 and o.shape[0] != 2
                    and 2 in o.shape[1:] and t in graph_outputs):
                # a model output whose batch is not its first axis (a CRNN's (T, N, C) logits): said
                skipped[t] = (f"shape {tuple(o.shape)} at a batch of 2: its batch is axis "
                                           f"{list(o.shape).index(2)}, not 0; the tools read values of shape (N, C, ...)")
            if not (isinstance(o, torch.Tensor) and o.is_floating_point() and 2 <= o.dim() <= 4 and o.shape[0] == 2):
                continue  # shape arithmetic, integer indices, constants, 5-D reshapes: nothing to look at
            node = nodes.get(t)
            if node is not None and node.operation_type in REARRANGING:
                continue
            paths.append((t, t))
        if not paths:
            raise DeepvisError("the ONNX model has no layer with a batch and a channel axis to show"
                               + "".join(f"; {t}: {why}" for t, why in skipped.items()))
        return paths, skipped


def _runs_at_batch_1(module, to_input, size, channels) -> bool:
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module(to_input(torch.zeros(1, channels, *size)))
    except Exception:
        return False
    return True


def default_scaling(channels: int) -> tuple[tuple, tuple]:
    """Mean and std where neither the user nor the file says: torchvision's ImageNet scaling, for
    a grey model its luma (the grey it is fed is the luma of the picture), for any other channel
    count none (no image reaches such a model)."""
    if channels == 3:
        return DEFAULT_MEAN, DEFAULT_STD
    if channels == 1:
        luma = np.asarray(LUMA)
        return (round(float(luma @ DEFAULT_MEAN), 3),), (round(float(luma @ DEFAULT_STD), 3),)
    return (0.0,) * channels, (1.0,) * channels


def _per_channel(name, v, channels: int):
    what = "RGB" if channels == 3 else "grey" if channels == 1 else "per channel"
    try:
        vals = [float(x) for x in (v if isinstance(v, (list, tuple)) or hasattr(v, "__iter__") else [v])]
    except (TypeError, ValueError):
        raise DeepvisError(f"{name} must be {channels} number{'s' * (channels > 1)} ({what}, 0..255), got {v!r}") from None
    if len(vals) != channels:
        raise DeepvisError(f"{name} must be {channels} number{'s' * (channels > 1)} ({what}, 0..255) for this "
                           f"{channels}-channel model, got {v!r}")
    return vals
