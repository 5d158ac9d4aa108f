"""SaladCloud integration: the node's deletion cost follows the queue depth.

Copies comfyui-api (behaviour doc B7): when any ``SALAD_*`` variable is set, ``PUT
{SALAD_IMDS_URL}/v1/deletion-cost`` with headers ``Metadata: true`` and ``Content-Type:
application/json`` and body ``{"deletion_cost": <queue depth>}``, so SaladCloud prefers to scale
in idle nodes. Unlike comfyui-api (a PUT on every status frame, no timeout, never reset), the
value is sent only when it changes, by one background task that always sends the latest value
(coalescing bursts), with a timeout, retried with capped backoff, and reset to 0 on shutdown.
The IMDS is reached directly, never through ``HTTP(S)_PROXY``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from comfy_sidecar.config import Settings
from comfy_sidecar.net.backoff import attempt_failure, backoff_delay
from comfy_sidecar.storage.netguard import tls_context

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)


class DeletionCost:
    """Keeps Salad's deletion cost equal to the latest queue depth.

    ``set(depth)`` is synchronous and never blocks; one task started by :meth:`start` sends
    the newest value when it differs from the last value the IMDS accepted. A failed PUT
    (non-2xx, network error, or no answer within ``timeout_s`` seconds) is retried after
    ``min(retry_cap_s, retry_base_s * 2**(n-1))`` seconds. Does nothing unless
    ``settings.on_salad``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        timeout_s: float = 3.0,
        retry_base_s: float = 1.0,
        retry_cap_s: float = 60.0,
    ) -> None:
        self.enabled = settings.on_salad
        self.url = settings.salad_imds_url.rstrip("/") + "/v1/deletion-cost"
        self._client: httpx.AsyncClient | None = None  # made by start()
        self._timeout_s = timeout_s
        self._retry_base_s = retry_base_s
        self._retry_cap_s = retry_cap_s
        self._wanted: int | None = None
        #: The last value the IMDS accepted (``None`` before the first success).
        self.sent: int | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the sender task (no-op when not on Salad or already started)."""
        if not self.enabled or self._task is not None or self._closed:
            return
        import httpx  # only on Salad

        self._client = httpx.AsyncClient(trust_env=False, verify=tls_context())
        self._task = asyncio.create_task(self._run(), name="salad-deletion-cost")

    def set(self, depth: int) -> None:
        """Ask for deletion cost ``depth`` (queue depth: jobs pending + running). Non-blocking."""
        if not self.enabled or self._closed:
            return
        depth = max(0, int(depth))
        self._wanted = depth
        if depth != self.sent:
            self._changed.set()

    async def close(self) -> None:
        """Stop the task, then PUT 0 (awaited, bounded by the timeout) unless 0 is already set."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            if self.sent != 0:
                await self._put(0)
        if self._client is not None:
            await self._client.aclose()

    async def _put(self, value: int) -> bool:
        import httpx

        assert self._client is not None
        try:
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.put(
                    self.url,
                    json={"deletion_cost": value},
                    headers={"Metadata": "true"},
                    timeout=self._timeout_s,
                )
            if response.is_success:
                self.sent = value
                return True
            reason = f"HTTP {response.status_code}"
        except (TimeoutError, httpx.HTTPError) as exc:
            reason = attempt_failure(exc, self._timeout_s)
        log.warning("Salad deletion cost %d not set at %s: %s", value, self.url, reason)
        return False

    async def _run(self) -> None:
        failures = 0
        while True:
            await self._changed.wait()
            self._changed.clear()
            value = self._wanted
            if value is None or value == self.sent:
                continue
            if await self._put(value):
                failures = 0
                continue
            failures += 1
            self._changed.set()  # try again (with the newest value) after the pause
            await asyncio.sleep(backoff_delay(failures, self._retry_base_s, self._retry_cap_s))
