"""numpy arrays <-> TensorProto, the tensors of TF Serving's Predict API, without the per-call
overhead of tf.make_tensor_proto / tf.make_ndarray.

Those two are general (any Python value, every dtype, broadcasting of single values) and cost
about a tenth of a digits request's Python time under load, and about 20 µs each way for a single
value (every per-prompt parameter of a generation at batch 1, each answer's digit at batch 1). For the
numeric dtypes the model server uses, arrays travel exactly as tf.make_tensor_proto writes them:
raw little-endian bytes in `tensor_content`, or, for a single value or none, the typed value
field (`float_val`, `int_val`, ...). Anything else (strings, bool, other dtypes) goes through
TensorFlow's own functions.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

# The numeric dtypes handled here, each with the typed field where TF writes a single value (more
# values go to tensor_content).
VALUE_FIELD = {np.dtype(np.float32): "float_val", np.dtype(np.float64): "double_val",
               np.dtype(np.int32): "int_val", np.dtype(np.uint8): "int_val",
               np.dtype(np.int64): "int64_val"}
TO_ENUM = {dtype: tf.dtypes.as_dtype(dtype).as_datatype_enum for dtype in VALUE_FIELD}
FROM_ENUM = {enum: dtype for dtype, enum in TO_ENUM.items()}
LITTLE_ENDIAN = sys.byteorder == "little"
# gRPC's message limit for the gateway's calls and the embedded model server, above gRPC's 4 MB
# default like TF Serving's own server. No tensor read here may be larger: typed values may be
# fewer than the shape (TF repeats the last), so a request of a few bytes could otherwise ask
# for gigabytes.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def to_proto(value: np.ndarray) -> tensor_pb2.TensorProto:
    """A numpy array as a TensorProto (the same proto tf.make_tensor_proto writes)."""
    array = np.asarray(value)
    enum = TO_ENUM.get(array.dtype)
    if enum is None or not LITTLE_ENDIAN:
        return tf.make_tensor_proto(array)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape])
    if array.size < 2:  # as TF: a single value (or none) in the typed field
        proto = tensor_pb2.TensorProto(dtype=enum, tensor_shape=shape)
        getattr(proto, VALUE_FIELD[array.dtype]).extend(array.ravel().tolist())
        return proto
    return tensor_pb2.TensorProto(dtype=enum, tensor_shape=shape,
                                  tensor_content=np.ascontiguousarray(array).tobytes())


def from_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """A TensorProto as a numpy array (what tf.make_ndarray returns, but a read-only view of the
    proto's bytes when they are in tensor_content: copy it before changing it in place)."""
    dtype = FROM_ENUM.get(proto.dtype)
    if dtype is None or not LITTLE_ENDIAN:
        return tf.make_ndarray(proto)
    shape = [d.size for d in proto.tensor_shape.dim]
    count = math.prod(shape)  # exact: numpy's product of int64s wraps around for huge shapes
    if count * dtype.itemsize > MAX_MESSAGE_BYTES:
        raise ValueError(f"a tensor of shape {shape} is larger than a Predict message may carry")
    if proto.tensor_content:
        array = np.frombuffer(proto.tensor_content, dtype=dtype)
    else:  # typed values; as TF reads them: none is all zeros, fewer repeat the last one
        try:
            array = np.array(getattr(proto, VALUE_FIELD[dtype]), dtype=dtype)
        except OverflowError:  # e.g. 300 in the int_val of a uint8 tensor
            raise ValueError(f"a value is out of range for {dtype}") from None
        if array.size == 0:
            return np.zeros(shape, dtype)
        if 0 < array.size < count:
            array = np.pad(array, (0, count - array.size), "edge")
    if array.size != count:
        raise ValueError(f"the tensor has {array.size} values for shape {shape}")
    return array.reshape(shape)
