"""Settings: every environment variable the sidecar reads, parsed once into one typed object.

Names and defaults copy SaladTechnologies/comfyui-api (its README's table); variables that
comfyui-api does not have are marked *new* in their doc line. A bad value raises
:class:`ConfigError` whose message is one line naming the variable; ``__main__`` prints it and
exits with status 2.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec


class ConfigError(Exception):
    """A variable has a value the sidecar cannot use. ``str(err)`` is one line naming it."""


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise ValueError("expected true or false")


def _int(minimum: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("expected a whole number") from None
        if minimum is not None and value < minimum:
            raise ValueError(f"must be >= {minimum}")
        return value

    return parse


def _float(minimum: float | None = None, exclusive: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ValueError("expected a number") from None
        if value != value:  # NaN
            raise ValueError("expected a number")
        if minimum is not None and (value <= minimum if exclusive else value < minimum):
            raise ValueError(f"must be {'>' if exclusive else '>='} {minimum}")
        return value

    return parse


def _str(raw: str) -> str:
    return raw


def _opt_str(raw: str) -> str | None:
    return raw if raw.strip() else None


def _cmd(raw: str) -> list[str]:
    try:
        argv = shlex.split(raw)
    except ValueError as exc:
        raise ValueError(f"cannot split like a shell: {exc}") from None
    if not argv:
        raise ValueError("is empty")
    return argv


def _csv(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


_LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal")


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}")
    return value


@dataclass(frozen=True)
class Var:
    """One environment variable: its name, default (a string, or None for unset), parser, doc."""

    name: str
    field: str
    default: str | None
    parse: Callable[[str], Any]
    doc: str
    new: bool = False
    group: str = "core"


def _home_default(sub: str) -> str:
    return "${COMFY_HOME}/" + sub


VARS: tuple[Var, ...] = (
    # --- ComfyUI child and its directories -------------------------------------------------
    Var(
        "CMD",
        "cmd",
        "init.sh",
        _cmd,
        "Command that launches ComfyUI, split like a shell would (quotes work).",
    ),
    Var("COMFY_HOME", "comfy_home", "/opt/ComfyUI", _str, "ComfyUI home directory."),
    Var("COMFYUI_PORT_HOST", "comfyui_port", "8188", _int(1), "Port ComfyUI listens on."),
    Var(
        "DIRECT_ADDRESS",
        "direct_address",
        "127.0.0.1",
        _str,
        "Address the sidecar uses to reach ComfyUI.",
    ),
    Var("INPUT_DIR", "input_dir", _home_default("input"), _str, "ComfyUI's input directory."),
    Var("OUTPUT_DIR", "output_dir", _home_default("output"), _str, "ComfyUI's output directory."),
    Var("MODEL_DIR", "model_dir", _home_default("models"), _str, "ComfyUI's models directory."),
    Var(
        "ALWAYS_RESTART_COMFYUI",
        "always_restart_comfyui",
        "false",
        _bool,
        "Restart ComfyUI whenever it exits (any exit code); otherwise the sidecar exits non-zero.",
    ),
    Var(
        "STARTUP_CHECK_INTERVAL_S",
        "startup_check_interval_s",
        "1",
        _float(0, exclusive=True),
        "Seconds between checks that ComfyUI answers at start-up.",
    ),
    Var(
        "STARTUP_CHECK_MAX_TRIES",
        "startup_check_max_tries",
        "20",
        _int(1),
        "Checks before giving up; the start-up deadline is interval x tries.",
    ),
    Var(
        "RESTART_MAX",
        "restart_max",
        "5",
        _int(0),
        "Restarts allowed within RESTART_WINDOW_S before the sidecar gives up (crash loop).",
        new=True,
    ),
    Var(
        "RESTART_WINDOW_S",
        "restart_window_s",
        "300",
        _float(0, exclusive=True),
        "Window, in seconds, over which RESTART_MAX is counted.",
        new=True,
    ),
    Var(
        "SHUTDOWN_GRACE_S",
        "shutdown_grace_s",
        "30",
        _float(0),
        "On SIGTERM/SIGINT, seconds jobs in flight may take to finish before ComfyUI is stopped.",
        new=True,
    ),
    Var(
        "PROMPT_TIMEOUT_S",
        "prompt_timeout_s",
        "3600",
        _float(0),
        "Longest a job may run in ComfyUI, in seconds (0 = no limit); then it is interrupted.",
        new=True,
    ),
    # --- HTTP server ----------------------------------------------------------------------
    Var("HOST", "host", "::", _str, "Address the API listens on (`::` is dual-stack)."),
    Var("PORT", "port", "3000", _int(1), "Port the API listens on."),
    Var(
        "LOG_LEVEL",
        "log_level",
        "info",
        _log_level,
        "One of trace, debug, info, warn, error, fatal.",
    ),
    Var(
        "MAX_QUEUE_DEPTH",
        "max_queue_depth",
        "0",
        _int(0),
        "ComfyUI queue depth at which /ready turns 503 (0 = no limit).",
    ),
    Var(
        "MAX_BODY_SIZE_MB",
        "max_body_size_mb",
        "100",
        _int(1),
        "Largest request body, in MB; larger bodies get 413.",
    ),
    Var(
        "PREPEND_FILENAMES",
        "prepend_filenames",
        "true",
        _bool,
        "true: filename_prefix becomes `<id>_<prefix>`; false: it is replaced by `<id>`.",
    ),
    Var(
        "WARMUP_PROMPT_FILE",
        "warmup_prompt_file",
        None,
        _opt_str,
        "Path to an API-format prompt run before the sidecar is first ready.",
    ),
    Var(
        "WARMUP_PROMPT_URL",
        "warmup_prompt_url",
        None,
        _opt_str,
        "URL of a warmup prompt, downloaded at start-up (used when no file is given).",
    ),
    Var(
        "WORKFLOW_DIR",
        "workflow_dir",
        "/workflows",
        _str,
        "Directory of Python workflow modules mounted at /workflow/...",
        group="workflows",
    ),
    Var(
        "MARKDOWN_SCHEMA_DESCRIPTIONS",
        "markdown_schema_descriptions",
        "true",
        _bool,
        "Describe workflow request fields as a Markdown table in the API docs.",
        group="workflows",
    ),
    # --- cache and storage ------------------------------------------------------------------
    Var(
        "CACHE_DIR",
        "cache_dir",
        "${HOME}/.cache/comfyui-api",
        _str,
        "Download cache directory.",
        group="storage",
    ),
    Var(
        "LRU_CACHE_SIZE_GB",
        "lru_cache_size_gb",
        "0",
        _float(0),
        "Cache size limit in GiB; least recently used entries are evicted (0 = no limit).",
        group="storage",
    ),
    Var(
        "HTTP_AUTH_HEADER_NAME",
        "http_auth_header_name",
        None,
        _opt_str,
        "Header sent on HTTP downloads/uploads to hosts in HTTP_AUTH_HEADER_HOSTS.",
        group="storage",
    ),
    Var(
        "HTTP_AUTH_HEADER_VALUE",
        "http_auth_header_value",
        None,
        _opt_str,
        "Value for HTTP_AUTH_HEADER_NAME.",
        group="storage",
    ),
    Var(
        "HTTP_AUTH_HEADER_HOSTS",
        "http_auth_header_hosts",
        "",
        _csv,
        "Comma list of host globs that may receive HTTP_AUTH_HEADER_* (empty = none).",
        new=True,
        group="storage",
    ),
    Var(
        "MANIFEST",
        "manifest",
        None,
        _opt_str,
        "Path to a manifest (.yml, .yaml or .json) installed at start-up.",
        group="manifest",
    ),
    Var(
        "MANIFEST_JSON",
        "manifest_json",
        None,
        _opt_str,
        "Inline manifest JSON; wins over MANIFEST.",
        group="manifest",
    ),
    # --- webhooks and Salad -------------------------------------------------------------------
    Var(
        "WEBHOOK_SECRET",
        "webhook_secret",
        None,
        _opt_str,
        "Key for Standard Webhooks signatures (base64, `whsec_` prefix accepted).",
        group="webhooks",
    ),
    Var(
        "PROMPT_WEBHOOK_RETRIES",
        "prompt_webhook_retries",
        "3",
        _int(1),
        "Total delivery attempts per webhook (>= 1).",
        group="webhooks",
    ),
    Var(
        "WEBHOOK_TIMEOUT_S",
        "webhook_timeout_s",
        "10",
        _float(0, exclusive=True),
        "Timeout of one webhook delivery attempt, in seconds.",
        new=True,
        group="webhooks",
    ),
    Var(
        "SYSTEM_WEBHOOK_URL",
        "system_webhook_url",
        None,
        _opt_str,
        "Where ComfyUI and storage events are sent.",
        group="webhooks",
    ),
    Var(
        "SYSTEM_WEBHOOK_EVENTS",
        "system_webhook_events",
        "",
        _csv,
        "Comma list of event names to send, or `all`.",
        group="webhooks",
    ),
    Var(
        "SALAD_IMDS_URL",
        "salad_imds_url",
        "http://169.254.169.254",
        _str,
        "Salad instance metadata service, for the deletion cost.",
        new=True,
        group="webhooks",
    ),
)

SALAD_VARS: tuple[str, ...] = (
    "SALAD_CONTAINER_GROUP_ID",
    "SALAD_MACHINE_ID",
    "SALAD_ORGANIZATION_NAME",
    "SALAD_ORGANIZATION_ID",
    "SALAD_PROJECT_NAME",
    "SALAD_PROJECT_ID",
    "SALAD_CONTAINER_GROUP_NAME",
    "SALAD_INSTANCE_ID",
)


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Every setting, parsed. Paths are as given (``${COMFY_HOME}`` and ``${HOME}`` expanded)."""

    cmd: list[str]
    comfy_home: str
    comfyui_port: int
    direct_address: str
    input_dir: str
    output_dir: str
    model_dir: str
    always_restart_comfyui: bool
    startup_check_interval_s: float
    startup_check_max_tries: int
    restart_max: int
    restart_window_s: float
    shutdown_grace_s: float
    prompt_timeout_s: float
    host: str
    port: int
    log_level: str
    max_queue_depth: int
    max_body_size_mb: int
    prepend_filenames: bool
    warmup_prompt_file: str | None
    warmup_prompt_url: str | None
    workflow_dir: str
    markdown_schema_descriptions: bool
    cache_dir: str
    lru_cache_size_gb: float
    http_auth_header_name: str | None
    http_auth_header_value: str | None
    http_auth_header_hosts: list[str]
    manifest: str | None
    manifest_json: str | None
    webhook_secret: str | None
    prompt_webhook_retries: int
    webhook_timeout_s: float
    system_webhook_url: str | None
    system_webhook_events: list[str]
    salad_imds_url: str
    #: ``SYSTEM_META_<key>`` values, keyed by ``<key>``.
    system_meta: dict[str, str] = {}
    #: Salad variables that are set, keyed ``salad_<snake name>`` (e.g. ``salad_machine_id``).
    salad: dict[str, str] = {}

    @property
    def comfy_url(self) -> str:
        """Base URL of ComfyUI's HTTP API, e.g. ``http://127.0.0.1:8188``."""
        host = self.direct_address
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.comfyui_port}"

    @property
    def comfy_ws_url(self) -> str:
        """Base URL of ComfyUI's websocket, e.g. ``ws://127.0.0.1:8188/ws``."""
        return "ws" + self.comfy_url[len("http") :] + "/ws"

    @property
    def on_salad(self) -> bool:
        """True when any ``SALAD_*`` variable is set (comfyui-api's test)."""
        return bool(self.salad)


def _expand(value: str, env: Mapping[str, str], comfy_home: str) -> str:
    home = env.get("HOME") or os.path.expanduser("~")
    return value.replace("${COMFY_HOME}", comfy_home).replace("${HOME}", home)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Parse ``env`` (default ``os.environ``) into :class:`Settings`.

    Raises :class:`ConfigError` with one line, ``NAME: problem (got 'value')``, for the first
    bad variable; also for rules that tie several variables together.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    comfy_home = env.get("COMFY_HOME") or "/opt/ComfyUI"
    for var in VARS:
        raw = env.get(var.name)
        if raw is None or (raw == "" and var.default is not None):
            raw = var.default
        if raw is None:
            values[var.field] = None
            continue
        if raw is var.default and isinstance(raw, str):
            raw = _expand(raw, env, comfy_home)
        try:
            values[var.field] = var.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{var.name}: {exc} (got {raw!r})") from None
    _check_combinations(values)
    values["system_meta"] = {
        key[len("SYSTEM_META_") :]: value
        for key, value in env.items()
        if key.startswith("SYSTEM_META_") and len(key) > len("SYSTEM_META_")
    }
    values["salad"] = {
        "salad_" + name[len("SALAD_") :].lower(): env[name] for name in SALAD_VARS if env.get(name)
    }
    return Settings(**values)


SYSTEM_EVENT_NAMES: tuple[str, ...] = (
    "status",
    "progress",
    "progress_state",
    "executing",
    "execution_start",
    "execution_cached",
    "executed",
    "execution_success",
    "execution_interrupted",
    "execution_error",
    "file_downloaded",
    "file_uploaded",
    "file_deleted",
)


def _check_combinations(values: dict[str, Any]) -> None:
    name, value = values["http_auth_header_name"], values["http_auth_header_value"]
    if (name is None) != (value is None):
        missing = "HTTP_AUTH_HEADER_VALUE" if value is None else "HTTP_AUTH_HEADER_NAME"
        raise ConfigError(f"{missing}: must be set together with the other HTTP_AUTH_HEADER_*")
    events: list[str] = values["system_webhook_events"]
    if events == ["all"]:
        values["system_webhook_events"] = list(SYSTEM_EVENT_NAMES)
    else:
        for event in events:
            if event not in SYSTEM_EVENT_NAMES:
                raise ConfigError(
                    f"SYSTEM_WEBHOOK_EVENTS: unknown event {event!r} "
                    f"(known: {', '.join(SYSTEM_EVENT_NAMES)}, or all)"
                )
    manifest = values["manifest"]
    if manifest and not manifest.lower().endswith((".yml", ".yaml", ".json")):
        raise ConfigError(f"MANIFEST: must end in .yml, .yaml or .json (got {manifest!r})")


def settings_table() -> str:
    """The README's table of variables, as Markdown: variable, default, meaning."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for var in VARS:
        default = "(not set)" if var.default is None else f"`{var.default}`"
        if var.default == "":
            default = "(empty)"
        doc = var.doc + (" *New.*" if var.new else "")
        lines.append(f"| `{var.name}` | {default} | {doc} |")
    return "\n".join(lines)
