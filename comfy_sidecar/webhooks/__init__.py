"""Webhooks: Standard Webhooks signing, one bounded delivery queue, prompt and system events.

Wire format copies SaladTechnologies/comfyui-api (behaviour doc B17/B18); see ``docs/webhooks.md``.

* :mod:`.signing`: ``WEBHOOK_SECRET`` decoding and the ``webhook-signature`` value.
* :mod:`.body`: :class:`JsonBody`, a JSON body encoded once whose :class:`Base64File` parts
  stream from disk.
* :mod:`.payloads`: the v1/v2 prompt webhook bodies and the prompt-id rewrite of ComfyUI frames
  sent as system events.
* :mod:`.dispatcher`: :class:`WebhookDispatcher`, the bounded queue that signs, delivers and
  retries.
"""

from __future__ import annotations

from .body import Base64File, JsonBody
from .dispatcher import (
    COMFY_EVENT_NAMES,
    DROPPABLE_EVENTS,
    STORAGE_EVENT_NAMES,
    WebhookDispatcher,
)
from .payloads import (
    iso_timestamp,
    rewrite_prompt_ids,
    v1_failed_body,
    v1_output_body,
    v2_complete_body,
    v2_failed_body,
)
from .signing import decode_secret, node_base64_decode, sign, sign_chunks

__all__ = [
    "COMFY_EVENT_NAMES",
    "DROPPABLE_EVENTS",
    "STORAGE_EVENT_NAMES",
    "Base64File",
    "JsonBody",
    "WebhookDispatcher",
    "decode_secret",
    "iso_timestamp",
    "node_base64_decode",
    "rewrite_prompt_ids",
    "sign",
    "sign_chunks",
    "v1_failed_body",
    "v1_output_body",
    "v2_complete_body",
    "v2_failed_body",
]
