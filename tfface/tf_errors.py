"""TensorFlow's op errors in the words a user needs.

An error raised inside a `tf.data` pipeline or a graph function carries,
around TensorFlow's own message, the Python frames where the op was
defined ("Detected at node ... File ..."), the node's name and hints about
GPU memory: 20 to 40 lines in which the one that says what happened (a
path and "No space left on device") is easy to miss.
"""

from __future__ import annotations

import re

_NOISE_PREFIXES = ("Graph execution error", "Detected at node", 'File "', "Hint:", "<stack traces unavailable>")


def tensorflow_error_text(error) -> str:
    """TensorFlow's own words in `error`, on one line."""
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
    return " ".join(kept) or str(error)
