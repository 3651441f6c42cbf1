"""Fundus data: source adapters -> Sample records -> splits -> preprocessing -> batches.

Importing the package registers the built-in sources (the adapters, the manifest CSV and the
synthetic generator), so the registry in ``samples`` imports none of its plugins.
"""

from data_modules import adapters, manifest, synthetic  # noqa: F401  (they register sources)
