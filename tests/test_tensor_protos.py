"""The gateway's and the model server's tensor conversion writes and reads exactly TensorFlow's protos."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2

from serving import tf_serving_protos
from serving.tensor_protos import from_proto, to_proto

ARRAYS = [
    np.random.default_rng(0).random((2, 28, 28), dtype=np.float32),
    np.arange(12, dtype=np.int64).reshape(3, 4),
    np.array([7, -3], np.int32),
    np.array([1.5, 2.5]),
    np.array([[0, 255]], np.uint8),
    np.array([300], np.int32),  # a single value: TF writes int_val, not tensor_content
    np.array([[255]], np.uint8),  # ... int_val for uint8 too
    np.array([2**40], np.int64),  # int64_val
    np.array([0.1]),  # double_val
    np.zeros((1, 1, 1), np.float32),  # float_val
    np.zeros((0,), np.int64),  # no values at all
    np.float32(0.8),  # a scalar
    np.zeros((0, 10), np.float32),  # an empty batch
    np.array([True, False]),
    np.array([1, 2], np.uint16),
    np.array([b"ROMEO:", "café".encode()]),  # strings, as the bard prompts travel
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(np.shape(a))}")
def test_to_proto_writes_what_make_tensor_proto_writes(array):
    assert to_proto(array, into=tensor_pb2.TensorProto()) == tf.make_tensor_proto(array)


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(np.shape(a))}")
def test_the_gateway_s_own_tensor_protos_are_tensorflow_s_on_the_wire(array):
    """The gateway writes and reads TensorProtos of its own descriptor pool, without TensorFlow:
    the same bytes as TensorFlow's, read back as TensorFlow reads them."""
    ours = to_proto(array, into=tf_serving_protos.TensorProto())
    theirs = tf.make_tensor_proto(array)
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
    read = from_proto(tf_serving_protos.TensorProto.FromString(theirs.SerializeToString()))
    assert read.dtype == tf.make_ndarray(theirs).dtype and np.array_equal(read, tf.make_ndarray(theirs))


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(np.shape(a))}")
def test_from_proto_reads_what_make_ndarray_reads(array):
    proto = tf.make_tensor_proto(array)
    ours, theirs = from_proto(proto), tf.make_ndarray(proto)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


def test_typed_value_fields_from_other_clients_are_read_too():
    proto = tf.make_tensor_proto([[0.5, 0.25]], dtype=tf.float32)
    proto.ClearField("tensor_content")
    proto.float_val.extend([0.5, 0.25])  # how some clients write it: values, not raw bytes
    assert np.array_equal(from_proto(proto), np.array([[0.5, 0.25]], np.float32))


def test_content_that_does_not_match_the_shape_is_an_error():
    proto = tf.make_tensor_proto(np.zeros((2, 3), np.float32))
    proto.tensor_shape.dim[0].size = 5
    with pytest.raises(ValueError):
        from_proto(proto)


@pytest.mark.parametrize("values", [[], [0.5], [0.5, 0.25]], ids=["none", "one", "fewer"])
def test_typed_values_fewer_than_the_shape_are_read_as_tensorflow_reads_them(values):
    """None means zeros, fewer repeat the last one (tf.make_ndarray's rules)."""
    proto = tf.make_tensor_proto(np.zeros((2, 2), np.float32))
    proto.ClearField("tensor_content")
    proto.float_val.extend(values)
    ours, theirs = from_proto(proto), tf.make_ndarray(proto)
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_typed_values_beyond_the_shape_or_the_dtype_are_an_error():
    too_many = tf.make_tensor_proto(np.array([1], np.int32))
    too_many.int_val.append(2)
    out_of_range = tf.make_tensor_proto(np.array([1], np.uint8))
    out_of_range.int_val[0] = 300
    # A few bytes that ask for 3 GB of zeros: refused before anything is allocated.
    enormous = tf.make_tensor_proto(np.zeros((1, 28, 28), np.float32))
    enormous.ClearField("tensor_content")
    enormous.tensor_shape.dim[0].size = 10**6
    for proto in (too_many, out_of_range, enormous):
        with pytest.raises(ValueError):
            from_proto(proto)


def test_a_shape_whose_size_overflows_64_bits_is_refused_for_its_size():
    """2**62 x 8 values: a product in int64 wraps around to 0, past the size check, and numpy
    then refuses the shape with a message of its own."""
    proto = tf.make_tensor_proto(np.array([0.5], np.float32))
    proto.tensor_shape.dim[0].size = 2**62
    proto.tensor_shape.dim.add().size = 8
    with pytest.raises(ValueError, match="larger than a Predict message may carry"):
        from_proto(proto)
