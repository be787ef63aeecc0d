"""Request errors: how the local server refuses a request.

A refusal can be found while checking a request, inside a model call or on
a batching thread, and every one must reach the client as a gRPC status
with a readable message, never as an exception inside the server. This
module gives them one type, `RequestError`, and turns TensorFlow's op
errors into it.
"""

from __future__ import annotations

import grpc
import tensorflow as tf

_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


class RequestError(Exception):
    """A request the server refuses; carries the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message):
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message):
    return RequestError(grpc.StatusCode.NOT_FOUND, message)


def tf_error_to_request_error(error: Exception) -> RequestError:
    if isinstance(error, RequestError):
        return error
    if isinstance(error, tf.errors.OpError):
        # TF error codes are the gRPC status codes.
        code = _GRPC_CODES.get(error.error_code, grpc.StatusCode.INTERNAL)
        return RequestError(code, f"the model refused the input: {clean_tf_message(error.message)}")
    return RequestError(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


def clean_tf_message(message: str) -> str:
    """The human part of a TF op error, without graph node and stack noise."""
    noise = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[")
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(noise)]
    return " ".join(kept) or message.strip()
