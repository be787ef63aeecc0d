"""Serving: a gRPC client for TF Serving and a local TF Serving-compatible server.

Imports are lazy so `import tfface.serving` stays cheap; use
`tfface.serving.client.ServingClient` and
`tfface.serving.server.LocalModelServer`.
"""

__all__ = ["ServingClient", "ServingError", "LocalModelServer", "format_results"]


def __getattr__(name):
    if name in ("ServingClient", "ServingError", "format_results"):
        from tfface.serving import client

        return getattr(client, name)
    if name == "LocalModelServer":
        from tfface.serving import server

        return server.LocalModelServer
    raise AttributeError(f"module 'tfface.serving' has no attribute {name!r}")
