"""Errors of workflow requests and the :class:`InputError` workflow modules raise.

Each is a :mod:`comfy_sidecar.errors` class, so ``app.py`` answers it like any other: bodies copy
comfyui-api's (a bad ``input`` -> 400 ``{"error", "location": "input.<field>"}``; ``generate``
raising -> 400 ``{"error": "Failed to generate workflow prompt: <msg>", "location": "input"}``;
ComfyUI unreachable while a workflow reads its context -> 502).
"""

from __future__ import annotations

from comfy_sidecar import errors
from comfy_sidecar.errors import SidecarError

__all__ = [
    "InputError",
    "WorkflowContextError",
    "WorkflowError",
    "WorkflowGenerateError",
    "WorkflowInputError",
]


class WorkflowError(SidecarError):
    """A workflow request failed. The class says how (mapped to a status in ``app.py``, as
    every :mod:`comfy_sidecar.errors` class is); ``error`` is the message."""

    @property
    def error(self) -> str:
        """The message (the body's ``error``)."""
        return self.message


class WorkflowInputError(errors.InputError, WorkflowError):
    """The body (usually its ``input``) is invalid (400); ``location`` names the field, e.g.
    ``input.width`` or ``convert_output.options.quality``, and is ``body`` when the body is
    not JSON at all."""

    def __init__(self, error: str, location: str = "body") -> None:
        super().__init__(error, location)


class WorkflowGenerateError(errors.InputError, WorkflowError):
    """``generate`` raised or returned something that is not an API-format prompt (400).

    ``error`` is ``"Failed to generate workflow prompt: <msg>"``, ``location`` is ``"input"``
    (comfyui-api's body for the same case).
    """


class WorkflowContextError(errors.UpstreamFailed, WorkflowError):
    """ComfyUI could not be asked for models/samplers while generating (502)."""


class InputError(errors.InputError):
    """Raise from ``generate`` to reject one input field: answered 400 with
    ``location: "input.<field>"`` instead of the generic generate failure. The author API's
    spelling of :class:`comfy_sidecar.errors.InputError` (field first, as comfyui-api's).

    ``InputError("checkpoint", "no such checkpoint: x.safetensors")``
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message, f"input.{field}")
        self.field = field
