"""Benchmarks and the local test bed they share with the demo and the tests (``imaged.bench``).

``registry`` runs a real registry on loopback; ``images`` builds OCI images from files and
pushes them with skopeo.
"""
