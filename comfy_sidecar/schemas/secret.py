"""A value that must reach one place and never be shown anywhere else: the Comfy API v2
partner key (``extra_data.api_key_comfy_org``), carried from the request to ComfyUI's
``POST /prompt`` ``extra_data`` and nowhere else.

Its ``repr``/``str`` never show the value (a job's spec or a claim may end up in a log line or
a traceback); msgspec cannot encode it (no ``enc_hook`` knows it), so it never lands in a
stored body by accident. :meth:`Secret.reveal` is the one way to read it.
"""

from __future__ import annotations

__all__ = ["Secret"]


class Secret:
    """``value`` kept out of every repr, str and JSON encoding (see the module docstring)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The value, for the one place it is sent."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)
