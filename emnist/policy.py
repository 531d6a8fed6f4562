"""The operator's policy: what a request may choose beyond the function's own environment.

OpenFaaS calls functions without authentication, so a request body is untrusted. Where a
function connects, reads or writes comes from its environment (the operator's deployment);
a request may pick another value only when the environment allows it by name:

- ``allowed_store_urls``: comma-separated store URLs a request may name (``store_url``,
  ``local_store_url``), besides the environment's own ``store_url``.
- ``data_roots``: comma-separated directories or URL prefixes under which a request may name
  ``dataset_dir``, ``data_location`` or emnist-grad's ``data``.
- ``checkpoint_roots``: the same for ``checkpoint_url``.
- ``max_params``, ``max_workers``: caps on the model size and the worker count.

These names are function configuration: a deploy may set them (the gateway's allow-list of
environment names includes ``POLICY_ENV``), a request never can.
"""

from __future__ import annotations

__all__ = ["POLICY_ENV"]

POLICY_ENV: tuple[str, ...] = ("allowed_store_urls", "data_roots", "checkpoint_roots",
                               "max_params", "max_workers")
