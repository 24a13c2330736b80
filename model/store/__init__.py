"""The artifact store: fingerprinted, self-describing stage outputs and `latest`.

- `outputs`: output directories, manifests, staging (write then rename), locks, resolving inputs

May import: pydantic and the standard library. Nothing else of `model`.
"""
