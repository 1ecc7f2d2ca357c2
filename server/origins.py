"""Web origins in one canonical form, as the access rules (server/auth.py) and the settings'
``allowed_origins`` compare them."""

from __future__ import annotations

from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def join_origin(scheme: str, host: str, port: int) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def canonical_origin(origin: str) -> str | None:
    """``scheme://host:port`` (lower case, the port always written), or None when ``origin``
    is not an http(s) origin (``null``, a path, credentials, a bad port)."""
    parts = urlsplit(origin.strip())
    if (parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None
            or parts.path not in ("", "/") or parts.query or parts.fragment):
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    return join_origin(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme])
