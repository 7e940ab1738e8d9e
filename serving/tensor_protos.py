"""numpy arrays <-> TensorProto, the tensors of TF Serving's Predict API, without the per-call
overhead of tf.make_tensor_proto / tf.make_ndarray.

Those two are general (any Python value, every dtype, broadcasting of single values) and cost
about a tenth of a digits request's Python time under load. Numeric arrays travel as raw
little-endian bytes in `tensor_content`, exactly as tf.make_tensor_proto writes them; anything
else (strings, protos written with the typed `*_val` fields) goes through TensorFlow's own
functions.
"""

from __future__ import annotations

import sys

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

_NUMERIC = (np.float32, np.float64, np.int32, np.int64, np.uint8)  # where TF writes tensor_content
TO_ENUM = {np.dtype(t): tf.dtypes.as_dtype(t).as_datatype_enum for t in _NUMERIC}
FROM_ENUM = {enum: dtype for dtype, enum in TO_ENUM.items()}
LITTLE_ENDIAN = sys.byteorder == "little"


def to_proto(value: np.ndarray) -> tensor_pb2.TensorProto:
    """A numpy array as a TensorProto (the same proto tf.make_tensor_proto writes)."""
    array = np.asarray(value)
    enum = TO_ENUM.get(array.dtype)
    if enum is None or array.size < 2 or not LITTLE_ENDIAN:  # TF writes single values as *_val
        return tf.make_tensor_proto(array)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=n) for n in array.shape])
    return tensor_pb2.TensorProto(dtype=enum, tensor_shape=shape,
                                  tensor_content=np.ascontiguousarray(array).tobytes())


def from_proto(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """A TensorProto as a numpy array (what tf.make_ndarray returns, but a read-only view of the
    proto's bytes when they are in tensor_content: copy it before changing it in place)."""
    dtype = FROM_ENUM.get(proto.dtype)
    if dtype is None or not proto.tensor_content or not LITTLE_ENDIAN:
        return tf.make_ndarray(proto)
    shape = [d.size for d in proto.tensor_shape.dim]
    array = np.frombuffer(proto.tensor_content, dtype=dtype)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"tensor_content has {array.size} values for shape {shape}")
    return array.reshape(shape)
