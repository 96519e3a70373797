"""Caffe's protobuf messages (NetParameter, BlobProto, ...), built at import from the serialized
caffe.proto descriptor shipped in data/ (the one caffe2onnx 2.0.1 generates from: BVLC caffe.proto
plus a few extra layer parameters). Building the classes from the descriptor works with any
current protobuf and its fast (upb) parser, unlike caffe2onnx's generated module, which needs
PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from google.protobuf import descriptor_pool, message_factory


@lru_cache(maxsize=None)
def _pool():
    pool = descriptor_pool.DescriptorPool()
    data = resources.files("deepvis_repro_backends").joinpath("data/caffe_proto_descriptor.bin").read_bytes()
    pool.AddSerializedFile(data)
    return pool


def message(name: str):
    """The message class caffe.<name>, e.g. message('NetParameter')."""
    return message_factory.GetMessageClass(_pool().FindMessageTypeByName(f"caffe.{name}"))


def NetParameter():
    return message("NetParameter")()


def BlobProto():
    return message("BlobProto")()


def v1_type_name(number: int) -> str:
    """A V1 (old 'layers { type: CONVOLUTION }') layer type as today's name ('Convolution')."""
    enum = _pool().FindEnumTypeByName("caffe.V1LayerParameter.LayerType")
    old = enum.values_by_number[number].name
    special = {"INNER_PRODUCT": "InnerProduct", "LRN": "LRN", "RELU": "ReLU", "TANH": "TanH",
               "SOFTMAX_LOSS": "SoftmaxWithLoss", "DATA": "Data", "IMAGE_DATA": "ImageData",
               "MEMORY_DATA": "MemoryData", "HDF5_DATA": "HDF5Data", "DUMMY_DATA": "DummyData"}
    return special.get(old, "".join(part.capitalize() for part in old.split("_")))
