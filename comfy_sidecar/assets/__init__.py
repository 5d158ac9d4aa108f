"""Comfy API v2 assets (issue 22): the asset store, signed content URLs and ``core/ASSET``
workflow references. No HTTP here: the v2 routes call these and decide the statuses.

- :mod:`.store` :class:`AssetStore` (upload, from-hash, outputs, holds, LRU, reads, staging);
- :mod:`.signing` :class:`UrlSigner` (HMAC-SHA256 content URLs);
- :mod:`.references` ``core/ASSET`` find / resolve / replace;
- :mod:`.hashing` ``blake3:<hex>``;
- :mod:`.service` :class:`~.service.AssetService` (what the v2 routes call) over the store
  in-process (:class:`~.service.LocalAssets`), :mod:`.shared` over Redis and an object store
  with ``JOB_QUEUE_URL``.
"""

from comfy_sidecar.assets.hashing import format_hash, hash_file, is_hash, parse_hash
from comfy_sidecar.assets.references import (
    ASSET_TYPE,
    AssetReference,
    ResolvedReference,
    find_asset_references,
    missing_assets,
    replace_asset_references,
    resolve_asset_references,
)
from comfy_sidecar.assets.signing import SignedUrl, UrlSigner
from comfy_sidecar.assets.store import (
    Asset,
    AssetContent,
    AssetStore,
    Created,
    Received,
    check_upload,
    guess_content_type,
    staged_file_name,
)

__all__ = [
    "ASSET_TYPE",
    "Asset",
    "AssetContent",
    "AssetReference",
    "AssetStore",
    "Created",
    "Received",
    "ResolvedReference",
    "SignedUrl",
    "UrlSigner",
    "check_upload",
    "find_asset_references",
    "format_hash",
    "guess_content_type",
    "hash_file",
    "is_hash",
    "missing_assets",
    "parse_hash",
    "replace_asset_references",
    "resolve_asset_references",
    "staged_file_name",
]
