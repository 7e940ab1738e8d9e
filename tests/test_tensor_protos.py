"""The gateway's and the model server's tensor conversion writes and reads exactly TensorFlow's protos."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, without_tensorflow
from tensorflow.core.framework import tensor_pb2

from serving.tfserving.tensors import from_proto, to_proto

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


GATEWAY_ARRAYS = [a for a in ARRAYS if a.dtype != np.uint16]  # the dtypes read and written without TF
WITHOUT_TENSORFLOW = """
import pickle, sys
import numpy as np
from serving.tfserving import protos as tf_serving_protos
from serving.tfserving.tensors import from_proto, to_proto

arrays = pickle.load(sys.stdin.buffer)
written = [to_proto(a, into=tf_serving_protos.TensorProto()).SerializeToString(deterministic=True)
           for a in arrays]
read = [from_proto(tf_serving_protos.TensorProto.FromString(data)) for data in written]
try:
    to_proto(np.array([1, 2], np.uint16), into=tf_serving_protos.TensorProto())
    refused = None
except ValueError as error:
    refused = str(error)
pickle.dump((written, read, refused), sys.stdout.buffer)
"""


def test_without_tensorflow_the_gateway_writes_and_reads_tensorflow_s_tensor_protos(tmp_path):
    """In a process where TensorFlow cannot be imported (the gateway image), with the gateway's
    own messages: the same bytes as tf.make_tensor_proto, read back as tf.make_ndarray reads them;
    a dtype that would need TensorFlow is refused with a reason."""
    result = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW], input=pickle.dumps(GATEWAY_ARRAYS),
                            env=without_tensorflow(tmp_path), cwd=ROOT, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()
    written, read, refused = pickle.loads(result.stdout)
    for array, ours, back in zip(GATEWAY_ARRAYS, written, read, strict=True):
        theirs = tf.make_tensor_proto(array)
        assert ours == theirs.SerializeToString(deterministic=True), array
        expected = tf.make_ndarray(theirs)
        assert (back.dtype, back.shape) == (expected.dtype, expected.shape) and np.array_equal(back, expected)
    assert refused and "uint16" in refused and "needs TensorFlow" in refused


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


@pytest.mark.parametrize("values", [[b"x"], [b"x", b"y"]], ids=["one", "fewer"])
def test_strings_fewer_than_the_shape_repeat_the_last_one_as_tensorflow_reads_them(values):
    proto = tf.make_tensor_proto(np.array([b"a", b"b", b"c"]))
    del proto.string_val[:]
    proto.string_val.extend(values)
    ours, theirs = from_proto(proto), tf.make_ndarray(proto)
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


def test_no_strings_for_a_shape_are_empty_strings():
    proto = tf.make_tensor_proto(np.array([b"a", b"b"]))
    del proto.string_val[:]
    assert from_proto(proto).tolist() == [b"", b""]  # TensorFlow gives "" (str); bytes here, as always


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
