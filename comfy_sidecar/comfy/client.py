"""HTTP calls to ComfyUI (httpx, one pooled client per sidecar).

Shapes follow ComfyUI 0.8.0 (see tests/transcripts): ``POST /prompt`` answers 200
``{prompt_id, number, node_errors}`` or 400 ``{error: {type, message, details, extra_info},
node_errors}``; ``GET /history/{id}`` is ``{}`` until the prompt finished; ``POST /queue
{"delete": [...]}`` removes pending prompts only; ``POST /interrupt {"prompt_id"}`` stops that
prompt only if it is the one running.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import msgspec

_JSON = {"content-type": "application/json"}


class ComfyUnavailable(Exception):
    """ComfyUI did not answer (connection refused, reset, timeout, or a 5xx)."""


class PromptRejected(Exception):
    """ComfyUI refused a prompt at validation (its 400). ``body`` is ComfyUI's JSON body."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__("ComfyUI rejected the prompt")
        self.body = body


class ComfyClient:
    """Async client for ComfyUI's HTTP API at ``base_url`` (e.g. ``http://127.0.0.1:8188``).

    Every call has a timeout (``timeout_s`` seconds; ``ping`` uses 2 s). Network failures and
    5xx answers raise :class:`ComfyUnavailable`.
    """

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self.base_url = base_url
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
            trust_env=False,
        )
        self._object_info: dict[str, dict[str, Any] | None] = {}

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def forget_process_state(self) -> None:
        """Drop what was cached about the running ComfyUI (call after it restarts)."""
        self._object_info.clear()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ComfyUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            raise ComfyUnavailable(f"{method} {path}: HTTP {response.status_code}")
        return response

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """True when ``GET /system_stats`` answers 200 within ``timeout_s`` seconds."""
        try:
            response = await self._http.get("/system_stats", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def get_json(self, path: str) -> Any:
        """``GET path`` and decode JSON; ``None`` for a 404. Raises ComfyUnavailable."""
        response = await self._request("GET", path)
        if response.status_code == 404:
            return None
        return msgspec.json.decode(response.content)

    async def queue_prompt(self, prompt: dict[str, Any], prompt_id: str, client_id: str) -> None:
        """``POST /prompt`` with our ``prompt_id`` and ``client_id``.

        Raises :class:`PromptRejected` on ComfyUI's 400, :class:`ComfyUnavailable` otherwise.
        A 200 whose ``node_errors`` is non-empty (some outputs dropped) is also rejected, since
        ComfyUI would silently skip those outputs.
        """
        body = msgspec.json.encode(
            {"prompt": prompt, "prompt_id": prompt_id, "client_id": client_id}
        )
        response = await self._request("POST", "/prompt", content=body, headers=_JSON)
        if response.status_code == 200:
            answer = msgspec.json.decode(response.content)
            if isinstance(answer, dict) and answer.get("node_errors"):
                raise PromptRejected(
                    {
                        "error": {
                            "type": "prompt_outputs_failed_validation",
                            "message": "Some outputs failed validation",
                            "details": "",
                            "extra_info": {},
                        },
                        "node_errors": answer["node_errors"],
                    }
                )
            return
        try:
            decoded = msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            decoded = {
                "error": {
                    "type": "http_error",
                    "message": response.text[:2000],
                    "details": "",
                    "extra_info": {},
                },
                "node_errors": {},
            }
        if not isinstance(decoded, dict):
            decoded = {"error": {"type": "http_error", "message": str(decoded)[:2000]}}
        raise PromptRejected(decoded)

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of ``prompt_id``, or None while unknown or unfinished."""
        answer = await self.get_json(f"/history/{quote(prompt_id, safe='')}")
        if isinstance(answer, dict):
            entry = answer.get(prompt_id)
            if isinstance(entry, dict):
                return entry
        return None

    async def queue(self) -> tuple[set[str], set[str]]:
        """``(running prompt_ids, pending prompt_ids)`` from ``GET /queue``."""
        answer = await self.get_json("/queue") or {}
        running = {item[1] for item in answer.get("queue_running", []) if len(item) > 1}
        pending = {item[1] for item in answer.get("queue_pending", []) if len(item) > 1}
        return running, pending

    async def delete_pending(self, prompt_ids: list[str]) -> None:
        """Remove pending prompts from ComfyUI's queue (a running one is unaffected)."""
        body = msgspec.json.encode({"delete": prompt_ids})
        await self._request("POST", "/queue", content=body, headers=_JSON)

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt ``prompt_id`` if it is the running prompt (takes effect at a node boundary)."""
        body = msgspec.json.encode({"prompt_id": prompt_id})
        await self._request("POST", "/interrupt", content=body, headers=_JSON)

    async def system_stats(self) -> dict[str, Any]:
        """``GET /system_stats``: ``{system: {...}, devices: [{name, type, vram_total,
        vram_free, ...}]}`` (bytes); ``{}`` when it is not a JSON object. Raises
        ComfyUnavailable."""
        answer = await self.get_json("/system_stats")
        return answer if isinstance(answer, dict) else {}

    async def free(self) -> None:
        """``POST /free {"unload_models": true, "free_memory": true}``: ComfyUI unloads its
        models and frees cached memory before its next prompt (ai-dock calls it after an
        out-of-memory error). Raises ComfyUnavailable."""
        body = msgspec.json.encode({"unload_models": True, "free_memory": True})
        await self._request("POST", "/free", content=body, headers=_JSON)

    async def object_info(self, class_type: str) -> dict[str, Any] | None:
        """``/object_info/{class_type}`` for one node class, cached per ComfyUI process."""
        if class_type not in self._object_info:
            answer = await self.get_json(f"/object_info/{quote(class_type, safe='')}")
            info = answer.get(class_type) if isinstance(answer, dict) else None
            self._object_info[class_type] = info if isinstance(info, dict) else None
        return self._object_info[class_type]

    def known_output_node(self, class_type: str) -> bool:
        """True when ComfyUI already said (cached :meth:`object_info`) that ``class_type`` is an
        output node; no request is made."""
        info = self._object_info.get(class_type)
        return bool(info and info.get("output_node"))

    async def model_folders(self) -> list[str]:
        """ComfyUI's model folder names (``GET /models``)."""
        answer = await self.get_json("/models")
        return [str(name) for name in answer] if isinstance(answer, list) else []

    async def models_in(self, folder: str) -> list[str] | None:
        """File names ComfyUI lists in a model folder, or None for an unknown folder."""
        answer = await self.get_json(f"/models/{quote(folder, safe='')}")
        return [str(name) for name in answer] if isinstance(answer, list) else None
