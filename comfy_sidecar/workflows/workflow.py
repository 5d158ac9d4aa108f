"""One loaded workflow module: decoding its body, running its ``generate``, the /prompt request.

The request body of a workflow route is ``{"input": RequestSchema, ...every /prompt field but
prompt}`` (:class:`comfy_sidecar.schemas.PromptOptions`). :meth:`Workflow.prepare` turns a decoded
body into the :class:`~comfy_sidecar.schemas.PromptRequest` the /prompt pipeline runs in-process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import msgspec

from comfy_sidecar.schemas import PromptNode, PromptOptions, PromptRequest
from comfy_sidecar.schemas.locations import msgspec_location
from comfy_sidecar.workflows.author import WorkflowContext
from comfy_sidecar.workflows.docs import input_markdown_table
from comfy_sidecar.workflows.errors import (
    InputError,
    WorkflowError,
    WorkflowGenerateError,
    WorkflowInputError,
)

__all__ = ["Workflow", "validation_error_location"]

log = logging.getLogger(__name__)

_PROMPT_TYPE = dict[str, PromptNode]


@dataclass(frozen=True, eq=False)
class Workflow:
    """One loaded workflow module.

    ``name`` is the route below ``/workflow`` (``"sdxl/txt2img"``), ``route`` the full path,
    ``request_type`` the module's ``RequestSchema``, ``body_type`` the generated body Struct
    (``PromptOptions`` fields plus ``input: RequestSchema``) for decoding and for the OpenAPI
    document.
    """

    name: str
    route: str
    path: Path
    module: ModuleType
    request_type: type[msgspec.Struct]
    body_type: type[PromptOptions]
    summary: str
    description: str
    _generate: Callable[..., Any] = field(repr=False)
    _takes_context: bool = field(repr=False)

    # -- docs

    def route_description(self, markdown: bool = True) -> str:
        """OpenAPI description of the route.

        ``markdown=True`` (``MARKDOWN_SCHEMA_DESCRIPTIONS``): the module's ``description``
        followed by comfyui-api's table ``| Field | Type | Description | Default |`` of the
        ``input`` fields (``**Required**`` where there is no default). Otherwise the plain
        ``description``.
        """
        if not markdown:
            return self.description
        table = input_markdown_table(self.request_type)
        return f"{self.description}\n\n{table}" if self.description else table

    # -- requests

    def decode_body(self, raw: bytes | str) -> PromptOptions:
        """Decode a JSON body into ``body_type``.

        Raises :class:`WorkflowInputError` naming the field (``location="input.width"``), or
        with ``location="body"`` when the body is not JSON or msgspec names no field.
        """
        try:
            return msgspec.json.decode(raw, type=self.body_type)
        except msgspec.ValidationError as err:
            message, location = validation_error_location(err)
            raise WorkflowInputError(message, location or "body") from None
        except msgspec.DecodeError as err:
            raise WorkflowInputError(f"Invalid JSON body: {err}") from None

    def convert_body(self, obj: Any) -> PromptOptions:
        """Like :meth:`decode_body` for an already-parsed JSON object (``dict``)."""
        try:
            return msgspec.convert(obj, type=self.body_type)
        except msgspec.ValidationError as err:
            message, location = validation_error_location(err)
            raise WorkflowInputError(message, location or "body") from None

    def split_body(self, body: PromptOptions) -> tuple[msgspec.Struct, PromptOptions]:
        """``(input, options)``: the ``RequestSchema`` instance and a plain ``PromptOptions``."""
        request = cast(msgspec.Struct, body.input)  # type: ignore[attr-defined]
        options = PromptOptions(
            **{name: getattr(body, name) for name in PromptOptions.__struct_fields__}
        )
        return request, options

    async def generate(self, request: msgspec.Struct, ctx: WorkflowContext) -> dict[str, Any]:
        """Run the module's ``generate`` and check its result is an API-format prompt.

        Returns the prompt as a plain dict (node id -> ``{"class_type", "inputs", ...}``).
        Raises :class:`WorkflowInputError` (the module raised :class:`InputError`),
        :class:`WorkflowContextError` (ComfyUI unreachable) or :class:`WorkflowGenerateError`.
        """
        args: tuple[Any, ...] = (request, ctx) if self._takes_context else (request,)
        try:
            if inspect.iscoroutinefunction(self._generate):
                result = await self._generate(*args)
            else:
                result = await asyncio.to_thread(self._generate, *args)
                if inspect.isawaitable(result):
                    result = await result
        except (asyncio.CancelledError, WorkflowError):
            raise
        except InputError as err:
            raise WorkflowInputError(err.message, f"input.{err.field}") from err
        except Exception as err:
            log.warning("workflow %s: generate failed", self.name, exc_info=True)
            raise WorkflowGenerateError(
                f"Failed to generate workflow prompt: {err}", "input"
            ) from err
        try:
            msgspec.convert(result, _PROMPT_TYPE)
        except msgspec.ValidationError as err:
            raise WorkflowGenerateError(
                f"Failed to generate workflow prompt: not an API-format prompt: {err}", "input"
            ) from None
        return cast(dict[str, Any], result)

    async def prepare(
        self, body: PromptOptions, ctx: WorkflowContext
    ) -> tuple[PromptRequest, msgspec.Struct]:
        """Body -> (the /prompt request to run in-process, the ``input`` to echo back).

        The pipeline runs the returned :class:`PromptRequest` exactly like ``POST /prompt``;
        the route adds ``"input": msgspec.to_builtins(input)`` to the response (comfyui-api
        sets ``body.input`` on success). Raises the :class:`WorkflowError` subclasses of
        :meth:`generate`.
        """
        request, options = self.split_body(body)
        prompt = await self.generate(request, ctx)
        nodes = msgspec.convert(prompt, _PROMPT_TYPE)
        fields = {name: getattr(options, name) for name in PromptOptions.__struct_fields__}
        return PromptRequest(prompt=nodes, **fields), request


def validation_error_location(err: msgspec.ValidationError) -> tuple[str, str | None]:
    """Split msgspec's ``"Expected `int`, got `str` - at `$.input.width`"`` into a message and
    a dotted location (``"input.width"``), by
    :func:`comfy_sidecar.schemas.locations.msgspec_location`.
    The message names the location: ``"Invalid input.width: Expected `int`, got `str`"``.
    Missing/unknown field errors name the field itself (``"input.prompt"``). Returns
    ``(message, None)`` when msgspec gives no path.
    """
    message, location = msgspec_location(err)
    if not location:
        return message, None
    return f"Invalid {location}: {message}", location
