"""numpy arrays <-> TensorProto, the tensors of TF Serving's Predict API, without TensorFlow and
without the per-call overhead of tf.make_tensor_proto / tf.make_ndarray.

Those two are general (any Python value, every dtype, broadcasting of single values), and their
cost shows in a small request's Python time under load. They also need TensorFlow itself, which
the gateway does not load (serving/tfserving/protos.py). For the dtypes the models use, arrays
travel exactly as tf.make_tensor_proto writes them: numbers as raw little-endian bytes in
`tensor_content`, or, for a single value or none, in the typed value field (`float_val`,
`int_val`, ...); booleans in `bool_val`; byte strings in `string_val`. Any other dtype goes
through TensorFlow's own functions: the model server has TensorFlow loaded, and no model here
sends or answers one to the gateway (which, without TensorFlow, refuses it as a ValueError).

The functions take TensorProtos of either descriptor pool: TensorFlow's (the model server's
messages) or the gateway's own (serving/tfserving/protos.py). `to_proto` fills the message it is
given, such as `request.inputs["image"]`, so nothing is copied between the two.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from serving.tfserving.protos import DATA_TYPES

# The numeric dtypes handled here, each with its DataType and the typed field where TF writes a
# single value (more values go to tensor_content).
NUMBERS = {np.dtype(np.float32): ("DT_FLOAT", "float_val"), np.dtype(np.float64): ("DT_DOUBLE", "double_val"),
           np.dtype(np.int32): ("DT_INT32", "int_val"), np.dtype(np.uint8): ("DT_UINT8", "int_val"),
           np.dtype(np.int64): ("DT_INT64", "int64_val")}
VALUE_FIELD = {dtype: field for dtype, (_, field) in NUMBERS.items()}
TO_ENUM = {dtype: DATA_TYPES[name] for dtype, (name, _) in NUMBERS.items()}
DT_BOOL, DT_STRING = DATA_TYPES["DT_BOOL"], DATA_TYPES["DT_STRING"]
# What from_proto reads without TensorFlow: each DataType's numpy dtype and typed value field.
FROM_ENUM = {**{enum: (dtype, VALUE_FIELD[dtype]) for dtype, enum in TO_ENUM.items()},
             DT_BOOL: (np.dtype(np.bool_), "bool_val")}
LITTLE_ENDIAN = sys.byteorder == "little"
# gRPC's message limit for the gateway's calls and the embedded model server, above gRPC's 4 MB
# default like TF Serving's own server. No tensor read here may be larger: typed values may be
# fewer than the shape (TF repeats the last), so a request of a few bytes could otherwise ask
# for gigabytes.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def to_proto(value: np.ndarray, into):
    """Write a numpy array into the TensorProto `into` (the proto tf.make_tensor_proto writes);
    returns it."""
    array = np.asarray(value)
    shape = into.tensor_shape
    if array.dtype.kind == "S" or (array.dtype.kind == "O" and all(isinstance(v, bytes) for v in array.flat)):
        into.dtype = DT_STRING
        into.string_val.extend(array.ravel().tolist())
    elif array.dtype == np.bool_:
        into.dtype = DT_BOOL
        into.bool_val.extend(array.ravel().tolist())
    elif array.dtype in TO_ENUM and LITTLE_ENDIAN:
        into.dtype = TO_ENUM[array.dtype]
        if array.size < 2:  # as TF: a single value (or none) in the typed field
            getattr(into, VALUE_FIELD[array.dtype]).extend(array.ravel().tolist())
        else:
            into.tensor_content = np.ascontiguousarray(array).tobytes()
    else:
        into.ParseFromString(_tensorflow(array.dtype).make_tensor_proto(array).SerializeToString())
        return into
    shape.SetInParent()  # present even for a scalar, as TF writes it
    for n in array.shape:
        shape.dim.add().size = n
    return into


def from_proto(proto) -> np.ndarray:
    """A TensorProto as a numpy array (what tf.make_ndarray returns, but a read-only view of the
    proto's bytes when they are in tensor_content: copy it before changing it in place)."""
    shape = [d.size for d in proto.tensor_shape.dim]
    count = math.prod(shape)  # exact: numpy's product of int64s wraps around for huge shapes
    if proto.dtype == DT_STRING:  # as TF reads them: none is all empty, fewer repeat the last one
        values = list(proto.string_val)
        if count * 8 > MAX_MESSAGE_BYTES:  # 8 bytes of pointer per value, even for repeats
            raise ValueError(f"a tensor of shape {shape} is larger than a Predict message may carry")
        if len(values) < count:
            values += [values[-1] if values else b""] * (count - len(values))
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return _shaped(array, shape, count)
    dtype, field = FROM_ENUM.get(proto.dtype, (None, None))
    if dtype is None or not LITTLE_ENDIAN:
        return _tensorflow(proto.dtype).make_ndarray(proto)
    if count * dtype.itemsize > MAX_MESSAGE_BYTES:
        raise ValueError(f"a tensor of shape {shape} is larger than a Predict message may carry")
    if proto.tensor_content:
        array = np.frombuffer(proto.tensor_content, dtype=dtype)
    else:  # typed values; as TF reads them: none is all zeros, fewer repeat the last one
        try:
            array = np.array(getattr(proto, field), dtype=dtype)
        except OverflowError:  # e.g. 300 in the int_val of a uint8 tensor
            raise ValueError(f"a value is out of range for {dtype}") from None
        if array.size == 0:
            return np.zeros(shape, dtype)
        if 0 < array.size < count:
            array = np.pad(array, (0, count - array.size), "edge")
    return _shaped(array, shape, count)


def _shaped(array: np.ndarray, shape: list[int], count: int) -> np.ndarray:
    if array.size != count:
        raise ValueError(f"the tensor has {array.size} values for shape {shape}")
    return array.reshape(shape)


def _tensorflow(dtype):
    """TensorFlow, for a dtype the functions above do not handle. The embedded model server has it
    loaded; the gateway, without TensorFlow, refuses the tensor with a reason."""
    try:
        import tensorflow as tf
    except ImportError:
        raise ValueError(f"a tensor of dtype {dtype} needs TensorFlow, which is not installed") from None
    return tf
