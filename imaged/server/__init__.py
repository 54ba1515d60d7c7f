"""The socket API: HTTP framing, routes, the daemon and peer credentials (``openapi.json`` here)."""
