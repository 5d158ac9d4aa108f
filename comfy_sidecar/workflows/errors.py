"""Errors of workflow requests and the :class:`InputError` workflow modules raise.

Bodies copy comfyui-api's: a bad ``input`` -> 400 ``{"error", "location": "input.<field>"}``;
``generate`` raising -> 400 ``{"error": "Failed to generate workflow prompt: <msg>", "location":
"input"}``; ComfyUI unreachable while a workflow reads its context -> 502.
"""

from __future__ import annotations

from comfy_sidecar.schemas import ErrorResponse

__all__ = [
    "InputError",
    "WorkflowContextError",
    "WorkflowError",
    "WorkflowGenerateError",
    "WorkflowInputError",
]


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
