"""Checks on the tensors a Predict request carries, before TensorFlow reads them.

`tf.make_ndarray` trusts a TensorProto: it reads only the field its dtype
names and fills a short tensor out, so pixels sent in the wrong field would
be taken for zeros and a request of a few bytes could declare, and cost,
thousands of images. These checks refuse such tensors first, naming the
input.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tfface.serving.errors import invalid


def dtype_name(enum: int) -> str:
    """A request's dtype for a message; a number no dtype has is named as such."""
    if not enum:
        return "an unset dtype"
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return f"dtype enum {enum} (no TensorFlow dtype)"


def _value_fields() -> dict:
    """dtype enum -> the TensorProto field its values go in (tensor.proto)."""
    fields = {
        tf.half: "half_val",
        tf.bfloat16: "half_val",
        tf.float32: "float_val",
        tf.float64: "double_val",
        tf.int64: "int64_val",
        tf.uint32: "uint32_val",
        tf.uint64: "uint64_val",
        tf.bool: "bool_val",
        tf.string: "string_val",
        tf.complex64: "scomplex_val",
        tf.complex128: "dcomplex_val",
    }
    small_ints = (tf.int8, tf.int16, tf.int32, tf.uint8, tf.uint16, tf.qint8, tf.quint8, tf.qint16, tf.quint16, tf.qint32)
    for dtype in small_ints:
        fields[dtype] = "int_val"
    return {dtype.as_datatype_enum: name for dtype, name in fields.items()}


_VALUE_FIELDS = _value_fields()
_NOT_VALUES = frozenset(("dtype", "tensor_shape", "version_number"))


def _values_field(key: str, proto, dtype: tf.DType) -> Optional[str]:
    """The one field `proto` carries its values in (None: no values), or
    INVALID_ARGUMENT. `make_ndarray` reads only the dtype's own field (or
    `tensor_content`), so pixels sent in another one would be taken for
    zeros, and values in two fields would be half ignored."""
    expected = _VALUE_FIELDS.get(dtype.as_datatype_enum)
    used = [f.name for f, _ in proto.ListFields() if f.name not in _NOT_VALUES]
    allowed = (expected,) if dtype == tf.string else (expected, "tensor_content")
    for name in used:
        if name not in allowed:
            where = " or ".join(field for field in allowed if field)
            raise invalid(
                f"input {key!r} is {dtype.name} but its values are in {name}; {dtype.name} values go in {where}"
            )
    if len(used) > 1:
        raise invalid(f"input {key!r} carries values in both {used[0]} and {used[1]}; send them in one")
    return used[0] if used else None


def check_values_match_shape(key: str, proto) -> None:
    """A tensor must carry every value its shape declares, in the field its
    dtype reads. `make_ndarray` would fill a short one out (repeating the
    last string, or zeros), so a request of a few bytes could declare, and
    cost, thousands of images."""
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise invalid(f"input {key!r} has a negative dimension in its shape {dims}")
    declared = int(np.prod(dims, dtype=np.int64)) if dims else 1
    dtype = tf.dtypes.as_dtype(proto.dtype)
    field = _values_field(key, proto, dtype)
    if field is None:
        sent = 0
    elif field == "tensor_content":
        sent = len(proto.tensor_content) / dtype.size
    else:
        sent = len(getattr(proto, field)) / (2 if dtype.is_complex else 1)  # complex: (real, imaginary) pairs
    if sent != declared:
        raise invalid(f"input {key!r} declares shape {dims} ({declared} values) but carries {sent:g}")
