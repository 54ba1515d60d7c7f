"""TLS settings per registry from the certs.d layout Docker and Podman share.

``<certs_dir>/<host[:port]>/``: every ``*.crt`` is an extra CA trusted on top of the system's,
every ``*.cert`` with the ``*.key`` of the same stem is a client certificate.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from imaged.errors import RegistryError


def ssl_context_for(host: str, certs_dirs: Sequence[Path]) -> ssl.SSLContext | None:
    """A context with the host's extra CAs and client certs, or None when it has none."""
    dirs = [d / host for d in certs_dirs if (d / host).is_dir()]
    if not dirs:
        return None
    ctx = ssl.create_default_context()
    for directory in dirs:
        for path in sorted(directory.iterdir()):
            try:
                if path.suffix == ".crt":
                    ctx.load_verify_locations(cafile=str(path))
                elif path.suffix == ".cert":
                    key = path.with_suffix(".key")
                    if not key.exists():
                        raise RegistryError(f"client certificate {path} has no key {key.name}")
                    ctx.load_cert_chain(str(path), str(key))
            except (OSError, ssl.SSLError) as exc:
                raise RegistryError(f"cannot load {path} for registry {host}: {exc}") from None
    return ctx
