"""OCI distribution client (``imaged.registry_client``): references, manifests, auth, blobs.

The pure parts (reference parsing, manifest selection, challenge parsing, retry policy) are free of
I/O and tested with tables; ``client`` is the thin requests shell around them.
"""
