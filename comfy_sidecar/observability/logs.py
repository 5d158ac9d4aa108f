"""Logging: one line per record on stderr, level from LOG_LEVEL (comfyui-api's pino levels),
format from LOG_FORMAT.

``text`` (the default): ``<asctime> <LEVEL> <logger>: <message>``.
``json``: one object a line, ``{"ts", "level", "logger", "msg", "job_id", "prompt_id",
"instance", "trace_id"}`` (``ts`` ISO 8601 UTC with ms; ``level`` a LOG_LEVEL name; the four ids
``null`` when unknown), plus ``exc`` (the formatted traceback) when there is one.

The ids come from context variables, so code that logs need not pass them: the pipeline binds
``job_id``/``prompt_id`` (:func:`bind_job`) when it registers a job, the supervisor binds
``instance`` in the tasks that log ComfyUI's lines, and the HTTP app binds ``trace_id`` from a
W3C ``traceparent`` request header (:func:`bind_traceparent`). Tasks started from there inherit
them (asyncio copies the context into each new task). A record's own attribute of the same name
(``extra={"instance": ...}``) wins over the context.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime

import msgspec

TRACE = 5

_LEVELS = {
    "trace": TRACE,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
}
#: The ``level`` written in JSON records, by Python level number (LOG_LEVEL's names).
_NAMES = {
    TRACE: "trace",
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}

#: The API id of the job whose work is being logged.
JOB_ID: ContextVar[str | None] = ContextVar("job_id", default=None)
#: ComfyUI's prompt_id of that job.
PROMPT_ID: ContextVar[str | None] = ContextVar("prompt_id", default=None)
#: The ComfyUI instance (``"0"`` for the first) whose output or work is being logged.
INSTANCE: ContextVar[str | None] = ContextVar("instance", default=None)
#: The W3C trace id (32 hex digits) of the request being served.
TRACE_ID: ContextVar[str | None] = ContextVar("trace_id", default=None)
#: That request's ``traceparent`` header, as received (forwarded on its webhooks).
TRACEPARENT: ContextVar[str | None] = ContextVar("traceparent", default=None)

_CONTEXT: tuple[tuple[str, ContextVar[str | None]], ...] = (
    ("job_id", JOB_ID),
    ("prompt_id", PROMPT_ID),
    ("instance", INSTANCE),
    ("trace_id", TRACE_ID),
)

# version "-" trace-id "-" parent-id "-" flags; a future version may append "-..." fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


def bind_job(job_id: str, prompt_id: str) -> None:
    """Tag what the current task (and tasks it starts) logs with this job."""
    JOB_ID.set(job_id)
    PROMPT_ID.set(prompt_id)


@contextlib.contextmanager
def job_scope() -> Iterator[None]:
    """Within the block, :func:`bind_job` holds; after it, the job ids are what they were."""
    tokens = [(var, var.set(var.get())) for var in (JOB_ID, PROMPT_ID)]
    try:
        yield
    finally:
        for var, token in tokens:
            var.reset(token)


def parse_traceparent(value: str) -> str | None:
    """The trace id of a W3C ``traceparent`` header value (Trace Context level 1), or None
    when it is not a valid one (version ``ff``, all-zero ids, wrong shape; version 00 must
    have exactly four fields)."""
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, parent_id, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id


def bind_traceparent(value: str | None) -> None:
    """Tag the current task's records with the trace id of ``value`` (a ``traceparent``
    header) and keep the header for its webhooks; an invalid or missing one binds nothing."""
    trace_id = parse_traceparent(value) if value else None
    if trace_id is not None and value is not None:
        TRACE_ID.set(trace_id)
        TRACEPARENT.set(value.strip())


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring), encoded with msgspec."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": _NAMES.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, var in _CONTEXT:
            own = getattr(record, name, None)
            line[name] = own if own is not None else var.get()
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return msgspec.json.encode(line).decode()


#: Libraries whose records below WARNING are left out (their requests, frames and access lines).
NOISY = ("httpx", "httpcore", "aiohttp", "uvicorn.access", "urllib3")


def level_number(level: str) -> int:
    """The Python level of a LOG_LEVEL value (INFO for an unknown one)."""
    logging.addLevelName(TRACE, "TRACE")
    return _LEVELS.get(level, logging.INFO)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of a LOG_FORMAT value: ``json`` or ``text``."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(level: str, log_format: str = "text") -> None:
    """Send every record at ``level`` (a LOG_LEVEL value) or above to stderr, as ``text`` or
    ``json`` lines (a LOG_FORMAT value)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_number(level))
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
