"""Parsers for environment variable values, used by the declarations in :mod:`comfy_sidecar.config`.

Each takes the raw string (never ``None``) and returns the typed value, or raises ``ValueError``
with a short reason (e.g. ``must be >= 1``); ``load_settings`` turns that into the one-line
:class:`~comfy_sidecar.config.ConfigError` ``NAME: reason (got 'raw')``.
"""

import shlex
from collections.abc import Callable
from urllib.parse import urlsplit

#: Accepted ``LOG_LEVEL`` values (comfyui-api's pino levels, plus ``warning``).
LOG_LEVELS: tuple[str, ...] = ("trace", "debug", "info", "warn", "warning", "error", "fatal")


def boolean(raw: str) -> bool:
    """``true/1/yes/on`` or ``false/0/no/off/""``, any case, surrounding blanks ignored."""
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A parser for whole numbers >= ``minimum``."""

    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("expected a whole number") from None
        if value < minimum:
            raise ValueError(f"must be >= {minimum}")
        return value

    return parse


def _number(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if value != value:  # NaN
        raise ValueError("expected a number")
    return value


def float_at_least(minimum: float) -> Callable[[str], float]:
    """A parser for numbers >= ``minimum`` (NaN refused)."""

    def parse(raw: str) -> float:
        value = _number(raw)
        if value < minimum:
            raise ValueError(f"must be >= {minimum}")
        return value

    return parse


def float_above(minimum: float) -> Callable[[str], float]:
    """A parser for numbers > ``minimum`` (NaN refused)."""

    def parse(raw: str) -> float:
        value = _number(raw)
        if value <= minimum:
            raise ValueError(f"must be > {minimum}")
        return value

    return parse


def optional_count(raw: str) -> int | None:
    """A whole number >= 1, or None when empty."""
    if not raw.strip():
        return None
    return int_at_least(1)(raw)


def text(raw: str) -> str:
    """The value as given."""
    return raw


def optional_text(raw: str) -> str | None:
    """The value as given, or ``None`` when it is blank."""
    return raw if raw.strip() else None


def optional_http_url(raw: str) -> str | None:
    """An ``http``/``https`` URL as given, or ``None`` when blank."""
    url = optional_text(raw)
    if url is not None and urlsplit(url).scheme not in ("http", "https"):
        raise ValueError("must be an http(s) URL")
    return url


def optional_output_url(raw: str) -> str | None:
    """An ``s3://``, ``http://`` or ``https://`` URL prefix as given, or ``None`` when blank."""
    url = optional_text(raw)
    if url is not None and urlsplit(url).scheme not in ("s3", "http", "https"):
        raise ValueError("must be an s3://, http(s):// (Hugging Face, Azure Blob or PUT) URL")
    return url


def optional_redis_url(raw: str) -> str | None:
    """A ``redis://`` or ``rediss://`` URL as given, or ``None`` when blank."""
    url = optional_text(raw)
    if url is not None and urlsplit(url).scheme not in ("redis", "rediss"):
        raise ValueError("must be a redis:// or rediss:// URL")
    return url


def command(raw: str) -> list[str]:
    """An argv, split like a shell would (quotes work); empty is refused."""
    try:
        argv = shlex.split(raw)
    except ValueError as exc:
        raise ValueError(f"cannot split like a shell: {exc}") from None
    if not argv:
        raise ValueError("is empty")
    return argv


def comma_list(raw: str) -> list[str]:
    """Comma-separated items, each stripped; empty items dropped."""
    return [part.strip() for part in raw.split(",") if part.strip()]


def one_of(*choices: str) -> Callable[[str], str]:
    """A parser for one of ``choices``, lower-cased, surrounding blanks ignored."""

    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def log_level(raw: str) -> str:
    """One of :data:`LOG_LEVELS`, lower-cased."""
    value = raw.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return value


def parse_keys(text: str) -> list[str]:
    """The keys of a plain key file's ``text``: one a line, stripped; blank and ``#`` lines
    skipped (the YAML form: :mod:`comfy_sidecar.config.keys`)."""
    keys = []
    for line in text.splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return keys
