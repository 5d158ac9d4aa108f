"""HTTP calls to ComfyUI (aiohttp, one session of persistent connections per sidecar).

aiohttp rather than httpx: with it the sidecar's CPU per job fell from about 5.3 to 3.3 ms
(``bench/overhead.py local``, README "Performance"). The session never reads HTTP(S)_PROXY or
NO_PROXY (``trust_env=False``): ComfyUI is on loopback, a proxy is never right.

Shapes follow ComfyUI 0.8.0 (see tests/transcripts): ``POST /prompt`` answers 200
``{prompt_id, number, node_errors}`` or 400 ``{error: {type, message, details, extra_info},
node_errors}``; ``GET /history/{id}`` is ``{}`` until the prompt finished; ``POST /queue
{"delete": [...]}`` removes pending prompts only; ``POST /interrupt {"prompt_id"}`` stops that
prompt only if it is the one running.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec

from comfy_sidecar.schemas.secret import Secret

_JSON = {"Content-Type": "application/json"}
#: What a failed call to ComfyUI raises inside aiohttp: refused, reset, bad URL, timed out.
_FAILURES = (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)


class ComfyUnavailable(Exception):
    """ComfyUI did not answer (connection refused, reset, timeout, or a 5xx)."""


class PromptRejected(Exception):
    """ComfyUI refused a prompt at validation (its 400). ``body`` is ComfyUI's JSON body."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__("ComfyUI rejected the prompt")
        self.body = body


class ComfyClient:
    """Async client for ComfyUI's HTTP API at ``base_url`` (e.g. ``http://127.0.0.1:8188``).

    Every call has a timeout of its own, so a frozen ComfyUI (SIGSTOP, a deadlocked server
    thread) never holds a caller longer than that: ``POST /prompt`` gets ``timeout_s`` seconds
    in all (ComfyUI validates the prompt before answering), every other call, which ComfyUI
    answers from memory (``/interrupt``, ``/queue``, ``/history``, ``/free``, ``/object_info``,
    ``/models``, ``/system_stats``), gets ``call_timeout_s`` (at most ``timeout_s``); ``ping``
    uses 2 s. Connecting is limited to 5 s. Network failures, timeouts and 5xx answers raise
    :class:`ComfyUnavailable`. Connections are kept alive and reused (up to 32 at once). The
    session is made on first use, inside the loop.
    """

    def __init__(self, base_url: str, timeout_s: float = 30.0, call_timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(5.0, timeout_s))
        short = min(call_timeout_s, timeout_s)
        self._call_timeout = aiohttp.ClientTimeout(total=short, connect=min(5.0, short))
        self._session: aiohttp.ClientSession | None = None
        #: class_type -> whether ComfyUI marks it an output node (``/object_info``), per
        #: ComfyUI process.
        self._output_nodes: dict[str, bool] = {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32, keepalive_timeout=30.0),
                timeout=self._timeout,
                trust_env=False,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def aclose(self) -> None:
        """Close the connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def forget_process_state(self) -> None:
        """Drop what was cached about the running ComfyUI (call after it restarts)."""
        self._output_nodes.clear()

    async def _request(
        self, method: str, path: str, body: bytes | None = None, *, long: bool = False
    ) -> tuple[int, bytes]:
        """``(status, body)`` of ``method path``; ``body`` is sent as JSON. Limited to the
        short call timeout, or to ``timeout_s`` when ``long``. Raises :class:`ComfyUnavailable`
        on a network failure, a timeout or a 5xx."""
        try:
            async with self._http().request(
                method,
                self.base_url + path,
                data=body,
                headers=_JSON if body is not None else None,
                allow_redirects=False,
                timeout=self._timeout if long else self._call_timeout,
            ) as response:
                status, content = response.status, await response.read()
        except _FAILURES as exc:
            raise ComfyUnavailable(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if status >= 500:
            raise ComfyUnavailable(f"{method} {path}: HTTP {status}")
        return status, content

    async def ping(self, timeout_s: float = 2.0) -> bool:
        """True when ``GET /system_stats`` answers 200 within ``timeout_s`` seconds."""
        try:
            async with self._http().get(
                self.base_url + "/system_stats", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as response:
                await response.read()
                return response.status == 200
        except _FAILURES:
            return False

    async def get_json(self, path: str) -> Any:
        """``GET path`` and decode JSON; ``None`` for a 404. Raises ComfyUnavailable."""
        status, content = await self._request("GET", path)
        if status == 404:
            return None
        return msgspec.json.decode(content)

    async def queue_prompt(
        self,
        prompt: dict[str, Any],
        prompt_id: str,
        client_id: str,
        partner_key: Secret | None = None,
        traceparent: str | None = None,
    ) -> None:
        """``POST /prompt`` with our ``prompt_id`` and ``client_id``, and in ``extra_data``:
        ``partner_key`` as ``api_key_comfy_org`` (what ComfyUI's partner (API) nodes
        authenticate with; ComfyUI keeps it out of its queue and history:
        ``SENSITIVE_EXTRA_DATA_KEYS``) and a W3C ``traceparent`` (ComfyUI 0.8.0 keeps
        ``extra_data`` with the queue item and in the prompt's history, ``prompt[3]``), so what
        reads ComfyUI's queue or history can join the job's trace.

        Raises :class:`PromptRejected` on ComfyUI's 400, :class:`ComfyUnavailable` otherwise.
        A 200 whose ``node_errors`` is non-empty (some outputs dropped) is also rejected, since
        ComfyUI would silently skip those outputs.
        """
        fields: dict[str, Any] = {"prompt": prompt, "prompt_id": prompt_id, "client_id": client_id}
        extra_data: dict[str, str] = {}
        if partner_key is not None:
            extra_data["api_key_comfy_org"] = partner_key.reveal()
        if traceparent:
            extra_data["traceparent"] = traceparent
        if extra_data:
            fields["extra_data"] = extra_data
        body = msgspec.json.encode(fields)
        status, content = await self._request("POST", "/prompt", body, long=True)
        if status == 200:
            answer = msgspec.json.decode(content)
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
            decoded = msgspec.json.decode(content)
        except msgspec.DecodeError:
            decoded = {
                "error": {
                    "type": "http_error",
                    "message": content.decode(errors="replace")[:2000],
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
        await self._request("POST", "/queue", body)

    async def interrupt(self, prompt_id: str) -> None:
        """Interrupt ``prompt_id`` if it is the running prompt (takes effect at a node boundary)."""
        body = msgspec.json.encode({"prompt_id": prompt_id})
        await self._request("POST", "/interrupt", body)

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
        await self._request("POST", "/free", body)

    async def is_output_node(self, class_type: str) -> bool:
        """Whether ComfyUI marks ``class_type`` an output node (``output_node`` of
        ``/object_info/{class_type}``; False for an unknown class), cached per ComfyUI
        process. Raises ComfyUnavailable."""
        if class_type not in self._output_nodes:
            answer = await self.get_json(f"/object_info/{quote(class_type, safe='')}")
            info = answer.get(class_type) if isinstance(answer, dict) else None
            self._output_nodes[class_type] = isinstance(info, dict) and bool(
                info.get("output_node")
            )
        return self._output_nodes[class_type]

    async def load_output_nodes(self) -> int:
        """Learn every node class's ``output_node`` at once (``GET /object_info``, kept only
        as class_type -> bool); returns how many classes ComfyUI has. Raises
        ComfyUnavailable."""
        status, content = await self._request("GET", "/object_info", long=True)
        answer = msgspec.json.decode(content) if status == 200 else None
        if isinstance(answer, dict):
            for class_type, info in answer.items():
                if isinstance(info, dict):
                    self._output_nodes[str(class_type)] = bool(info.get("output_node"))
        return len(self._output_nodes)

    def output_node_verdict(self, class_type: str) -> bool | None:
        """What ComfyUI already said of ``class_type`` (True: an output node), or None when it
        was never asked; no request is made."""
        return self._output_nodes.get(class_type)

    async def model_folders(self) -> list[str]:
        """ComfyUI's model folder names (``GET /models``)."""
        answer = await self.get_json("/models")
        return [str(name) for name in answer] if isinstance(answer, list) else []

    async def models_in(self, folder: str) -> list[str] | None:
        """File names ComfyUI lists in a model folder, or None for an unknown folder."""
        answer = await self.get_json(f"/models/{quote(folder, safe='')}")
        return [str(name) for name in answer] if isinstance(answer, list) else None
