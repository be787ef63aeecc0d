"""TensorFlow's op errors in the words a user needs.

An error raised inside a `tf.data` pipeline or a graph function carries,
around TensorFlow's own message, the Python frames where the op was
defined ("Detected at node ... File ..."), the node's name and hints about
GPU memory: 20 to 40 lines in which the one that says what happened (a
path and "No space left on device") is easy to miss.
"""

from __future__ import annotations

import contextlib
import os
import re

from tfface.atomic_files import WRITE_FAILURE_ERRNOS

_NOISE_PREFIXES = ("Graph execution error", "Detected at node", 'File "', "Hint:", "<stack traces unavailable>")


def tensorflow_error_text(error) -> str:
    """TensorFlow's own words in `error`, on one line."""
    return " ".join(_own_lines(error)) or str(error)


def _own_lines(error) -> list:
    kept = []
    for line in str(getattr(error, "message", None) or error).splitlines():
        line = line.strip()
        if not line or line.startswith(_NOISE_PREFIXES):
            continue
        line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line)
        line = re.sub(r"\s*\[\[\{\{node [^}]*\}\}\]\]", "", line)
        line = re.sub(r"\s*\[Op:[^\]]*\]", "", line).strip()
        if line:
            kept.append(line)
    return kept


# What TensorFlow's file system says after a path ("<path>; <strerror>") when
# a write fails for a reason the user can act on.
_FILE_FAILURES = {os.strerror(code): code for code in WRITE_FAILURE_ERRNOS}


@contextlib.contextmanager
def file_errors_as_os_errors():
    """Re-raises a TensorFlow op error that reports a failed file write as
    the `OSError` Python would have raised (errno, path), so a writer's
    usual handling (naming its target, not a temporary file) applies to
    files TensorFlow writes: a SavedModel's variables, for one."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as e:
        for line in _own_lines(e):
            match = re.search(r"(\S+); ([^;]+?)$", line)
            if match and match.group(2) in _FILE_FAILURES:
                code = _FILE_FAILURES[match.group(2)]
                raise OSError(code, os.strerror(code), match.group(1)) from e
        raise
