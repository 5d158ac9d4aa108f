"""What a workflow module's ``generate`` uses: the live :class:`WorkflowContext` and helpers.

``generate(request, ctx)`` asks ComfyUI through ``ctx`` (models, samplers, schedulers, node
classes) when the request runs; :func:`random_seed`, :func:`check_choice` and
:func:`resolve_model` cover what comfyui-api's examples do with Zod defaults and enums.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from comfy_sidecar.schemas.nodes import node_order_key
from comfy_sidecar.workflows.errors import InputError, WorkflowContextError

__all__ = [
    "GetJson",
    "WorkflowContext",
    "check_choice",
    "prompt_checkpoint",
    "random_seed",
    "resolve_model",
]

#: ``await get_json("/models/checkpoints")`` -> the decoded JSON body of a GET to ComfyUI.
#: It should raise on a non-2xx status and have its own timeout.
GetJson = Callable[[str], Awaitable[Any]]


class WorkflowContext:
    """What a workflow may ask ComfyUI while generating, read live when the workflow runs.

    One context is made per request by :mod:`comfy_sidecar.http.routes.workflows`
    (``WorkflowContext(client.get_json, warmup_checkpoint=prompt_checkpoint(warmup_prompt))``);
    answers are cached for the life of that context only, so newly installed models, samplers
    and schedulers from custom nodes are seen by the next request (comfyui-api freezes samplers
    and schedulers at boot and rejects custom-node ones, its issue #75).

    Methods (all coroutines; use ``async def generate(request, ctx)`` to call them):

    * ``await ctx.folders()`` -> ``["checkpoints", "loras", ...]`` (ComfyUI ``GET /models``)
    * ``await ctx.models("checkpoints")`` -> file names in that folder (``GET /models/<folder>``)
    * ``await ctx.samplers()`` / ``await ctx.schedulers()`` -> KSampler's ``sampler_name`` /
      ``scheduler`` choices (``GET /object_info/KSampler``)
    * ``await ctx.object_info("LoadImage")`` -> ComfyUI's description of one node class
    * ``await ctx.default_checkpoint()`` -> ``warmup_checkpoint`` or the first checkpoint, or None
    * ``ctx.warmup_checkpoint`` -> the warmup prompt's ``ckpt_name`` (comfyui-api's
      ``config.warmupCkpt``), or None

    Raises :class:`WorkflowContextError` when ``get_json`` fails.
    """

    def __init__(self, get_json: GetJson, *, warmup_checkpoint: str | None = None) -> None:
        self._get_json = get_json
        self.warmup_checkpoint = warmup_checkpoint
        self._cache: dict[str, Any] = {}

    async def get_json(self, path: str) -> Any:
        """GET ``path`` from ComfyUI (cached per context). Raises WorkflowContextError."""
        if path not in self._cache:
            try:
                self._cache[path] = await self._get_json(path)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                raise WorkflowContextError(f"Could not read {path} from ComfyUI: {err}") from err
        return self._cache[path]

    async def folders(self) -> list[str]:
        """Model folder names ComfyUI knows (``GET /models``)."""
        return _str_list(await self.get_json("/models"))

    async def models(self, folder: str) -> list[str]:
        """File names in one model folder (``GET /models/<folder>``).

        ComfyUI answers 404 for an unknown folder: ``[]`` when ``get_json`` returns None for
        it (``ComfyClient.get_json`` does), :class:`WorkflowContextError` when it raises.
        """
        return _str_list(await self.get_json(f"/models/{folder}"))

    async def object_info(self, node_class: str) -> dict[str, Any]:
        """ComfyUI's ``/object_info/<node_class>`` entry for that class (``{}`` if absent)."""
        body = await self.get_json(f"/object_info/{node_class}")
        info = body.get(node_class) if isinstance(body, dict) else None
        return info if isinstance(info, dict) else {}

    async def choices(self, node_class: str, input_name: str) -> list[str]:
        """The allowed values of a combo input, e.g. ``("KSampler", "sampler_name")``.

        Reads both encodings ComfyUI uses: ``[[names...], {...}]`` and
        ``["COMBO", {"options": [names...]}]``. ``[]`` if the input is not a combo.
        """
        info = await self.object_info(node_class)
        inputs = info.get("input", {})
        for group in ("required", "optional"):
            spec = inputs.get(group, {}).get(input_name) if isinstance(inputs, dict) else None
            if isinstance(spec, list) and spec:
                if isinstance(spec[0], list):
                    return _str_list(spec[0])
                if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
                    return _str_list(spec[1].get("options", []))
        return []

    async def samplers(self) -> list[str]:
        """Sampler names KSampler accepts now (custom-node samplers included)."""
        return await self.choices("KSampler", "sampler_name")

    async def schedulers(self) -> list[str]:
        """Scheduler names KSampler accepts now."""
        return await self.choices("KSampler", "scheduler")

    async def default_checkpoint(self) -> str | None:
        """``warmup_checkpoint`` if set, else the first file in ``checkpoints``, else None."""
        if self.warmup_checkpoint:
            return self.warmup_checkpoint
        names = await self.models("checkpoints")
        return names[0] if names else None


def _str_list(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


# --- helpers for workflow modules ---------------------------------------------------------


def random_seed() -> int:
    """A random sampler seed in ``[0, 10**15)`` (comfyui-api's examples default to one).

    Use as ``seed: int = msgspec.field(default_factory=random_seed)``.
    """
    return random.randrange(10**15)


def check_choice(field: str, value: str, allowed: list[str]) -> str:
    """Return ``value`` if it is in ``allowed`` (or ``allowed`` is empty: nothing to check),
    else raise :class:`InputError` for ``field`` listing the choices.

    ``check_choice("sampler_name", req.sampler_name, await ctx.samplers())``
    """
    if allowed and value not in allowed:
        shown = ", ".join(allowed[:50]) + (", ..." if len(allowed) > 50 else "")
        raise InputError(field, f"{value!r} is not one of: {shown}")
    return value


async def resolve_model(
    ctx: WorkflowContext, field: str, value: str | None, folder: str, *, default: str | None = None
) -> str:
    """The model file name (or URL) to put in a loader node.

    ``value`` as given when it is a URL (the /prompt pipeline downloads model URLs) or a file
    ComfyUI lists in ``folder``; ``None`` -> ``default`` (e.g. ``ctx.warmup_checkpoint``) or the
    first installed file. Raises :class:`InputError` naming ``field`` when the name is unknown
    or nothing is installed, :class:`WorkflowContextError` when ComfyUI cannot be asked.
    """
    if value is not None and re.match(r"^[a-z][a-z0-9+.-]*://", value, re.IGNORECASE):
        return value
    installed = await ctx.models(folder)
    if value is None:
        if default:
            return default
        if not installed:
            raise InputError(field, f"none given and no model installed in {folder}")
        return installed[0]
    if value not in installed:
        raise InputError(field, f"{value!r} is not installed in {folder} (give a URL instead?)")
    return value


def prompt_checkpoint(prompt: Mapping[str, Any] | None) -> str | None:
    """The ``ckpt_name`` of the first ``CheckpointLoaderSimple`` node of an API-format prompt
    (nodes in :func:`~comfy_sidecar.schemas.nodes.node_order_key` order), or None.

    Gives ``WorkflowContext.warmup_checkpoint`` from the sidecar's warmup prompt, as
    comfyui-api's ``config.warmupCkpt`` does (it reads its ``WARMUP_PROMPT_FILE`` in key
    order, where numeric ids come first, ascending).
    """
    nodes = prompt or {}
    for node_id in sorted(nodes, key=node_order_key):
        node = nodes[node_id]
        if isinstance(node, Mapping) and node.get("class_type") == "CheckpointLoaderSimple":
            inputs = node.get("inputs")
            name = inputs.get("ckpt_name") if isinstance(inputs, Mapping) else None
            return name if isinstance(name, str) else None
    return None
