"""Caffe's protobuf messages (NetParameter, BlobProto, ...), built at import from the serialized
caffe.proto descriptor shipped in data/ (the one caffe2onnx 2.0.1 generates from: BVLC caffe.proto
plus a few extra layer parameters). Building the classes from the descriptor works with any
current protobuf and its fast (upb) parser, unlike caffe2onnx's generated module, which needs
PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python."""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory


#: BlobProto's raw storage types (NVIDIA's Caffe; OpenCV's shrinkCaffeModel writes FLOAT16).
RAW_DTYPES = {0: "<f8", 1: "<f4", 2: "<f2"}


@lru_cache(maxsize=None)
def _pool():
    pool = descriptor_pool.DescriptorPool()
    data = resources.files("deepvis_repro_backends").joinpath("data/caffe_proto_descriptor.bin").read_bytes()
    pool.Add(_with_raw_storage(descriptor_pb2.FileDescriptorProto.FromString(data)))
    return pool


def _with_raw_storage(fdp):
    """BVLC's caffe.proto plus NVIDIA Caffe's raw blob storage, as OpenCV's caffe.proto has it:
    BlobProto.raw_data_type = 10 (enum Type: DOUBLE, FLOAT, FLOAT16, INT, UINT) and raw_data = 12
    (bytes). Without them a half-precision caffemodel parses as blobs with no values."""
    if not any(e.name == "Type" for e in fdp.enum_type):
        enum = fdp.enum_type.add(name="Type")
        for number, name in enumerate(("DOUBLE", "FLOAT", "FLOAT16", "INT", "UINT")):
            enum.value.add(name=name, number=number)
    blob = next(m for m in fdp.message_type if m.name == "BlobProto")
    if not any(f.number == 12 for f in blob.field):
        F = descriptor_pb2.FieldDescriptorProto
        blob.field.add(name="raw_data_type", number=10, label=F.LABEL_OPTIONAL, type=F.TYPE_ENUM,
                       type_name=".caffe.Type")
        blob.field.add(name="raw_data", number=12, label=F.LABEL_OPTIONAL, type=F.TYPE_BYTES)
    return fdp


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
