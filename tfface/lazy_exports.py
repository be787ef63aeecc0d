"""Package names that load their module on first use.

`tfface.data` and `tfface.training` name their entry points this way: their
modules import one another (an eager `__init__` import could cycle), and
light users such as the gRPC client import one module only.
"""

import importlib


def lazy_exports(package: str, exports: dict, namespace: dict):
    """(`__getattr__`, `__dir__`) for `package`, where `exports` maps each
    exported name to the module that defines it."""

    def __getattr__(name):
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
