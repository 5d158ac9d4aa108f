"""Loading workflow modules from ``WORKFLOW_DIR``: one :class:`Workflow` per module.

The module's route is its path under ``WORKFLOW_DIR`` without ``.py``: ``sdxl/txt2img.py`` ->
``/workflow/sdxl/txt2img``. Files and directories whose names start with ``_`` or ``.`` are
skipped (helpers, ``__init__.py``, caches). A module that fails to import or does not follow the
contract is logged with its traceback and skipped; the rest load.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, cast

import msgspec

from comfy_sidecar.schemas import PromptOptions
from comfy_sidecar.workflows.workflow import Workflow

__all__ = ["MODULE_PACKAGE", "load_workflows"]

log = logging.getLogger(__name__)

#: Package name under which workflow modules are registered in ``sys.modules``.
MODULE_PACKAGE = "comfy_sidecar_workflows"

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
