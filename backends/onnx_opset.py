"""Opset 18+ files read as opset 17 where each node means what it meant at opset 17.

Why: onnx2torch converts operators at the versions it knows (up to opset 17 for the ones that
changed after), and onnx's version converter has no adapter down from 18 for several operators
(Pad, among the most common). But most nodes of a newer file use nothing the newer versions added:
a Pad without the new ``axes`` input, a Resize without ``antialias``, a Cast of ordinary floats,
an operator whose only change was new tensor types. Such a file is the same function at opset 17,
so it is relabelled (Reduce* nodes get their constant ``axes`` input back as an attribute, where
opset 17 kept it). A node that does use something newer is named, with its operator and the
file's opset: that is the refusal.
"""
from __future__ import annotations

import copy

from deepvis_repro.errors import DeepvisError

TARGET = 17

#: Attributes added after opset 17 that are harmless at these values (their defaults).
HARMLESS = {"noop_with_empty_axes": 0, "antialias": 0, "keep_aspect_ratio_policy": b"stretch", "ceil_mode": 0}
#: Values of existing attributes that only later opsets define.
NEWER_VALUES = {("Pad", "mode"): {b"wrap"}, ("Resize", "coordinate_transformation_mode"): {b"half_pixel_symmetric"},
                ("ScatterElements", "reduction"): {b"max", b"min"}, ("ScatterND", "reduction"): {b"max", b"min"}}
REDUCE_AXES_INPUT = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                     "ReduceMin", "ReduceProd", "ReduceSumSquare"}


def _value(attr):
    import onnx

    return onnx.helper.get_attribute_value(attr)


def as_opset17(model, path: str, opset: int):
    """A copy of ``model`` (opset > 17) relabelled to opset 17, or DeepvisError naming the first
    node that uses what opset 17 does not have."""
    import numpy as np
    import onnx
    from onnx import defs, numpy_helper

    m = copy.deepcopy(model)
    inits = {i.name: i for i in m.graph.initializer}
    for node in m.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        where = f"ONNX file {path} (opset {opset}): node {node.name or node.output[0]} ({node.op_type})"
        try:
            new = defs.get_schema(node.op_type, opset, "")
        except Exception:
            raise DeepvisError(f"{where}: not an operator of opset {opset}") from None
        if new.since_version <= TARGET:
            continue  # unchanged since opset 17
        try:
            old = defs.get_schema(node.op_type, TARGET, "")
        except Exception:
            raise DeepvisError(f"{where}: an operator added after opset {TARGET}, which onnx2torch cannot "
                               "convert") from None
        attrs = {a.name: a for a in node.attribute}
        for name, a in list(attrs.items()):
            v = _value(a)
            if name not in old.attributes:
                ok = name in HARMLESS and v == HARMLESS[name] or \
                    (name == "saturate" and node.op_type in ("Cast", "CastLike"))  # only float8 saturates
                if name == "dilations" and all(int(d) == 1 for d in v):
                    ok = True
                if not ok:
                    raise DeepvisError(f"{where}: uses attribute {name}={v!r}, added after opset {TARGET}; "
                                       f"onnx2torch cannot convert it (re-export with opset_version={TARGET})")
                node.attribute.remove(a)
            elif v in NEWER_VALUES.get((node.op_type, name), ()):
                raise DeepvisError(f"{where}: {name}={v.decode()} exists only after opset {TARGET}; "
                                   f"onnx2torch cannot convert it")
        given = [i for i in node.input]
        n_old = len(old.inputs)
        if node.op_type in REDUCE_AXES_INPUT and len(given) > 1 and given[1]:
            if given[1] not in inits:
                raise DeepvisError(f"{where}: its axes are computed in the graph (opset {TARGET} wants them "
                                   "fixed); onnx2torch cannot convert it")
            axes = numpy_helper.to_array(inits[given[1]]).astype(np.int64).reshape(-1).tolist()
            del node.input[1:]
            node.attribute.append(onnx.helper.make_attribute("axes", axes))
        elif any(given[n_old:]):
            extra = [new.inputs[i].name for i in range(n_old, len(given)) if given[i]]
            raise DeepvisError(f"{where}: uses input {', '.join(extra)}, added after opset {TARGET}; onnx2torch "
                               f"cannot convert it (re-export with opset_version={TARGET})")
        else:
            del node.input[n_old:]
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = TARGET
    return m
