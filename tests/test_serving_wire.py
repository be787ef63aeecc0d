"""Answers written as protobuf wire bytes parse back to the same tensors."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow_serving.apis import predict_pb2

from tfface.serving.wire import ResponseEncoder, tensor_bytes

ARRAYS = {
    "float32 row": np.array([[0.25, 0.75]], np.float32),
    "float32 batch": np.random.default_rng(0).random((5, 9)).astype(np.float32),
    "int64": np.array([3, 0, 1 << 40], np.int64),
    "uint8 image": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
    "float64 scalar": np.array(1.5),
    "empty": np.zeros((0, 2), np.float32),
    "strings": np.array([b"yes", b"", "n\u00e9".encode()], dtype=object),
    "bool (general path)": np.array([True, False]),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_tensor_bytes_parse_back_to_the_array(name):
    array = ARRAYS[name]
    proto = tensor_pb2.TensorProto.FromString(tensor_bytes(array))
    assert proto.dtype == tf.make_tensor_proto(array).dtype
    back = tf.make_ndarray(proto)
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def _outputs(probability, label):
    return {
        "smile_probabilities": np.array([[1 - probability, probability]], np.float32),
        "smile_label": np.array([label], dtype=object),
        "smile_class_id": np.array([int(label == b"yes")], np.int64),
        "age_probabilities": np.full((1, 300), 1 / 300, np.float32),  # entry longer than 127 bytes
    }


def test_encoded_answer_equals_the_message_built_with_protobuf():
    spec = predict_pb2.PredictResponse().model_spec
    spec.name, spec.signature_name = "faces", "serving_default"
    spec.version.value = 3
    encoder = ResponseEncoder()
    for probability, label in ((0.9, b"yes"), (0.2, b"no"), (0.9, b"yes")):  # the third hits the caches
        outputs = _outputs(probability, label)
        names = sorted(outputs)
        answer = predict_pb2.PredictResponse.FromString(encoder.encode(outputs, names, spec.SerializeToString()))
        expected = predict_pb2.PredictResponse()
        expected.model_spec.CopyFrom(spec)
        for key in names:
            expected.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key]))
        assert answer.model_spec == expected.model_spec
        assert sorted(answer.outputs) == names
        for key in names:
            np.testing.assert_array_equal(tf.make_ndarray(answer.outputs[key]), tf.make_ndarray(expected.outputs[key]))


def test_output_filter_order_and_subset_are_kept():
    outputs = _outputs(0.6, b"yes")
    answer = predict_pb2.PredictResponse.FromString(
        ResponseEncoder().encode(outputs, ["smile_label"], b"")
    )
    assert list(answer.outputs) == ["smile_label"]
    assert tf.make_ndarray(answer.outputs["smile_label"]).tolist() == [b"yes"]


def test_batches_of_labels_encode_like_tensor_bytes_on_every_call():
    long_label = b"x" * 300  # longer than the cached strings
    labels = np.array([b"yes", b"no", b"", "n\u00e9".encode(), long_label, b"yes"], dtype=object).reshape(3, 2)
    encoder = ResponseEncoder()
    for _ in range(2):  # the second call hits the per-string cache
        answer = predict_pb2.PredictResponse.FromString(encoder.encode({"labels": labels}, ["labels"], b""))
        assert answer.outputs["labels"].SerializeToString() == tensor_bytes(labels)
        np.testing.assert_array_equal(tf.make_ndarray(answer.outputs["labels"]), labels)
