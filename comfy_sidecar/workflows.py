"""Typed workflow endpoints: Python modules in ``WORKFLOW_DIR`` -> ``POST /workflow/<path>``.

comfyui-api (its B29) transpiles and ``eval``\\ s TypeScript files exporting a Zod
``RequestSchema`` and ``generateWorkflow(input)``, then loops back over HTTP to ``/prompt``. Here a
workflow is a plain Python module:

.. code-block:: python

    from typing import Annotated
    import msgspec
    from comfy_sidecar.workflows import InputError, WorkflowContext

    summary = "Invert"                      # optional, OpenAPI summary
    description = "Inverts an image."       # optional, OpenAPI description

    class RequestSchema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
        image: Annotated[str, msgspec.Meta(description="URL or base64 of the input image")]
        width: Annotated[int, msgspec.Meta(ge=64, le=4096, description="Output width")] = 512

    async def generate(request: RequestSchema, ctx: WorkflowContext) -> dict:
        return {...}                        # an API-format prompt

``generate`` (``generate_workflow`` is accepted too) may be sync or async and take one parameter
(the request) or two (request, :class:`WorkflowContext`). A sync ``generate`` runs in a worker
thread. The module's route is its path under ``WORKFLOW_DIR`` without ``.py``:
``sdxl/txt2img.py`` -> ``/workflow/sdxl/txt2img``. Files and directories whose names start with
``_`` or ``.`` are skipped (helpers, ``__init__.py``, caches). A module that fails to import or
does not follow the contract is logged with its traceback and skipped; the rest load.
Modules cannot import each other; shared request field types and graph builders (txt2img,
img2img) are in :mod:`comfy_sidecar.workflow_graphs`.

The request body of a workflow route is ``{"input": RequestSchema, ...every /prompt field but
prompt}`` (:class:`comfy_sidecar.schemas.PromptOptions`). :meth:`Workflow.prepare` turns a decoded
body into the :class:`~comfy_sidecar.schemas.PromptRequest` the /prompt pipeline runs in-process.

Errors map to comfyui-api's bodies: a bad ``input`` -> 400 ``{"error", "location":
"input.<field>"}`` (:class:`WorkflowInputError`); ``generate`` raising -> 400 ``{"error": "Failed
to generate workflow prompt: <msg>", "location": "input"}`` (:class:`WorkflowGenerateError`);
ComfyUI unreachable while a workflow reads its context -> :class:`WorkflowContextError` (502).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import random
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, cast

import msgspec

from comfy_sidecar.schemas import ErrorResponse, PromptNode, PromptOptions, PromptRequest

__all__ = [
    "GetJson",
    "InputError",
    "Workflow",
    "WorkflowContext",
    "WorkflowContextError",
    "WorkflowError",
    "WorkflowGenerateError",
    "WorkflowInputError",
    "check_choice",
    "load_workflows",
    "random_seed",
    "resolve_model",
    "validation_error_location",
]

log = logging.getLogger(__name__)

#: ``await get_json("/models/checkpoints")`` -> the decoded JSON body of a GET to ComfyUI.
#: It should raise on a non-2xx status and have its own timeout.
GetJson = Callable[[str], Awaitable[Any]]

#: Package name under which workflow modules are registered in ``sys.modules``.
MODULE_PACKAGE = "comfy_sidecar_workflows"

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PROMPT_TYPE = dict[str, PromptNode]


# --- errors -------------------------------------------------------------------------------


class WorkflowError(Exception):
    """A workflow request failed; ``status`` is the HTTP status, :meth:`to_response` the body."""

    status = 400

    def __init__(self, error: str, location: str | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.location = location

    def to_response(self) -> ErrorResponse:
        """``{"error": ..., "location": ...}`` like comfyui-api's 400 bodies."""
        return ErrorResponse(error=self.error, location=self.location)


class WorkflowInputError(WorkflowError):
    """The body (usually its ``input``) is invalid; ``location`` names the field, e.g.
    ``input.width`` or ``convert_output.options.quality``."""


class WorkflowGenerateError(WorkflowError):
    """``generate`` raised or returned something that is not an API-format prompt.

    ``error`` is ``"Failed to generate workflow prompt: <msg>"``, ``location`` is ``"input"``
    (comfyui-api's body for the same case).
    """


class WorkflowContextError(WorkflowError):
    """ComfyUI could not be asked for models/samplers while generating (HTTP 502)."""

    status = 502


class InputError(Exception):
    """Raise from ``generate`` to reject one input field: answered 400 with
    ``location: "input.<field>"`` instead of the generic generate failure.

    ``InputError("checkpoint", "no such checkpoint: x.safetensors")``
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# --- context ------------------------------------------------------------------------------


class WorkflowContext:
    """What a workflow may ask ComfyUI while generating, read live when the workflow runs.

    One context is made per request (``WorkflowContext(client.get_json)``); answers are cached
    for the life of that context only, so newly installed models, samplers and schedulers from
    custom nodes are seen by the next request (comfyui-api freezes samplers and schedulers at
    boot and rejects custom-node ones, its issue #75).

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


# --- the workflow record ------------------------------------------------------------------


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
        with ``location=None`` when the body is not JSON.
        """
        try:
            return msgspec.json.decode(raw, type=self.body_type)
        except msgspec.ValidationError as err:
            message, location = validation_error_location(err)
            raise WorkflowInputError(message, location) from None
        except msgspec.DecodeError as err:
            raise WorkflowInputError(f"Invalid JSON body: {err}") from None

    def convert_body(self, obj: Any) -> PromptOptions:
        """Like :meth:`decode_body` for an already-parsed JSON object (``dict``)."""
        try:
            return msgspec.convert(obj, type=self.body_type)
        except msgspec.ValidationError as err:
            message, location = validation_error_location(err)
            raise WorkflowInputError(message, location) from None

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
    a dotted location (``"input.width"``). Missing/unknown field errors name the field itself
    (``"input.prompt"``). Returns ``(message, None)`` when msgspec gives no path.
    """
    text = str(err)
    match = re.fullmatch(r"(?s)(.*) - at `\$(.*)`", text)
    message, path = (match.group(1), match.group(2)) if match else (text, "")
    named = re.match(r"Object (?:missing required|contains unknown) field `([^`]+)`", message)
    if named:
        path = f"{path}.{named.group(1)}"
    location = path.lstrip(".") or None
    return (f"Invalid {location}: {message}" if location else message), location


# --- docs helpers -------------------------------------------------------------------------


def input_markdown_table(request_type: type[msgspec.Struct]) -> str:
    """comfyui-api's Markdown table of a request type's fields, from its JSON schema."""
    (schema,), components = msgspec.json.schema_components([request_type])
    body = _deref(schema, components)
    required = set(body.get("required", []))
    rows = ["| Field | Type | Description | Default |", "|---|---|---|---|"]
    for name, prop in body.get("properties", {}).items():
        prop = _deref(prop, components)
        if name in required:
            default = "**Required**"
        elif "default" in prop:
            default = f"`{msgspec.json.encode(prop['default']).decode()}`"
        else:
            default = ""
        description = str(prop.get("description", "")).replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {name} | {_type_label(prop, components)} | {description} | {default} |")
    return "\n".join(rows)


def _deref(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return cast(dict[str, Any], components.get(ref.rsplit("/", 1)[-1], {}))
    return schema


def _type_label(prop: dict[str, Any], components: dict[str, Any]) -> str:
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    if "anyOf" in prop:
        return " \\| ".join(_type_label(_deref(p, components), components) for p in prop["anyOf"])
    kind = prop.get("type")
    if kind == "array":
        return f"array of {_type_label(_deref(prop.get('items', {}), components), components)}"
    if kind is None and "title" in prop:
        return str(prop["title"])
    label = str(kind or "any")
    bounds = [
        f"{sym} {prop[key]}"
        for key, sym in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"))
        if key in prop
    ]
    return f"{label} ({', '.join(bounds)})" if bounds else label


# --- loading ------------------------------------------------------------------------------


def load_workflows(directory: Path | str) -> list[Workflow]:
    """Import every workflow module under ``directory`` (recursively, in sorted order).

    Returns one :class:`Workflow` per module that exports ``RequestSchema`` (a msgspec Struct)
    and ``generate``/``generate_workflow``. A missing directory gives ``[]``. A module that
    fails to import or breaks the contract is logged (with traceback) and skipped. Importing
    runs the modules' code: only trusted files belong in ``WORKFLOW_DIR``.
    """
    root = Path(directory)
    if not root.is_dir():
        log.info("workflows: %s is not a directory; no workflow endpoints", root)
        return []
    loaded: list[Workflow] = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p.startswith(("_", ".")) for p in parts):
            continue
        if not all(_SEGMENT.match(p) for p in parts):
            log.error(
                "workflows: skipping %s: route segments must match %s", path, _SEGMENT.pattern
            )
            continue
        workflow = _load_one(path, "/".join(parts))
        if workflow is not None:
            loaded.append(workflow)
            log.info("workflows: loaded %s from %s", workflow.route, path)
    return loaded


def _module_name(name: str) -> str:
    base = MODULE_PACKAGE + "." + ".".join(re.sub(r"\W", "_", p) for p in name.split("/"))
    candidate, n = base, 1
    while candidate in sys.modules and getattr(sys.modules[candidate], "__file__", None):
        n += 1
        candidate = f"{base}_{n}"
    return candidate


def _load_one(path: Path, name: str) -> Workflow | None:
    module_name = _module_name(name)
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot make an import spec for {path}")
        module = importlib.util.module_from_spec(spec)
        # Registered before executing: msgspec resolves string annotations through sys.modules.
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except (Exception, SystemExit):
        sys.modules.pop(module_name, None)
        log.exception("workflows: skipping %s: import failed", path)
        return None
    try:
        return _describe(module, path, name)
    except TypeError as err:
        sys.modules.pop(module_name, None)
        log.error("workflows: skipping %s: %s", path, err)
        return None


def _describe(module: ModuleType, path: Path, name: str) -> Workflow:
    request_type = getattr(module, "RequestSchema", None)
    if not (isinstance(request_type, type) and issubclass(request_type, msgspec.Struct)):
        raise TypeError("no RequestSchema (a msgspec.Struct subclass)")
    fn = getattr(module, "generate", None) or getattr(module, "generate_workflow", None)
    if not callable(fn):
        raise TypeError("no generate(request) function")
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    if not positional and not var_positional:
        raise TypeError("generate must accept the request as its first parameter")
    takes_context = len(positional) >= 2 or var_positional
    summary = getattr(module, "summary", None)
    description = getattr(module, "description", None)
    try:
        msgspec.json.schema(request_type)
    except Exception as err:
        raise TypeError(f"RequestSchema has no JSON schema: {err}") from err
    body_type = _body_type(request_type, name, module.__name__)
    return Workflow(
        name=name,
        route=f"/workflow/{name}",
        path=path,
        module=module,
        request_type=request_type,
        body_type=body_type,
        summary=summary if isinstance(summary, str) and summary else name,
        description=description if isinstance(description, str) else "",
        _generate=fn,
        _takes_context=takes_context,
    )


def _body_type(
    request_type: type[msgspec.Struct], name: str, module_name: str
) -> type[PromptOptions]:
    """``{"input": RequestSchema, ...PromptOptions}`` as a Struct named after the route."""
    camel = "".join(w[:1].upper() + w[1:] for w in re.split(r"[^A-Za-z0-9]+", name) if w)
    body = msgspec.defstruct(
        f"{camel}WorkflowRequest",
        [
            (
                "input",
                Annotated[
                    request_type,
                    msgspec.Meta(description=f"Input of the `{name}` workflow."),
                ],
            )
        ],
        bases=(PromptOptions,),
        module=module_name,
        kw_only=True,
        forbid_unknown_fields=True,
    )
    body.__doc__ = (
        f"Body of `POST /workflow/{name}`: `input` for the workflow, plus every /prompt field "
        "except `prompt`."
    )
    return cast(type[PromptOptions], body)
