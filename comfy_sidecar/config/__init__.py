"""Settings: every environment variable the sidecar reads, parsed once into one typed object.

:class:`Settings` is the one declaration. Each field is annotated with its :class:`Var`
(variable name, default, parser, whether comfyui-api lacks it) and its description, as in
``port: Annotated[int, Var("PORT", "3000", int_at_least(1)), "Port the API listens on."]``.
:func:`load_settings`, ``comfy-sidecar --help`` and the README's table
(:func:`markdown_table`, written by ``scripts/settings_table.py``) are derived from it.

Names and defaults copy SaladTechnologies/comfyui-api (its README's table); variables that
comfyui-api does not have are marked ``new`` (*New.* in the README). A bad value raises
:class:`ConfigError` whose message is one line naming the variable; ``__main__`` prints it and
exits with status 2.
"""

import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Annotated, Any

import msgspec

from comfy_sidecar.config.parsers import (
    boolean,
    comma_list,
    command,
    float_above,
    float_at_least,
    int_at_least,
    log_level,
    one_of,
    optional_count,
    optional_http_url,
    optional_output_url,
    optional_redis_url,
    optional_text,
    text,
)


class ConfigError(Exception):
    """A variable has a value the sidecar cannot use. ``str(err)`` is one line naming it."""


@dataclass(frozen=True)
class Var:
    """How one :class:`Settings` field is read from the environment.

    ``name`` is the environment variable. ``default`` is the raw string used when it is unset
    or empty (``None``: the field is ``None`` then); ``${COMFY_HOME}``, ``${HOME}`` and
    ``${PORT}`` in it are expanded. ``parse`` turns the raw string into the field's value or raises
    ``ValueError`` with a short reason (see :mod:`comfy_sidecar.config.parsers`). ``new`` marks
    variables comfyui-api does not have. In :data:`VARS`, ``field`` is the :class:`Settings`
    attribute and ``doc`` the description (the string after the ``Var`` in the annotation).
    """

    name: str
    default: str | None
    parse: Callable[[str], Any]
    new: bool = False
    field: str = ""
    doc: str = ""


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
    """Every setting, parsed. Paths are as given (``${COMFY_HOME}``, ``${HOME}``, ``${PORT}``
    expanded)."""

    # --- ComfyUI child and its directories ----------------------------------------------------
    cmd: Annotated[
        list[str],
        Var("CMD", "init.sh", command),
        "Command that launches ComfyUI, split like a shell would (quotes work).",
    ]
    comfy_home: Annotated[str, Var("COMFY_HOME", "/opt/ComfyUI", text), "ComfyUI home directory."]
    comfyui_port: Annotated[
        int, Var("COMFYUI_PORT_HOST", "8188", int_at_least(1)), "Port ComfyUI listens on."
    ]
    comfyui_instances: Annotated[
        int | None,
        Var("COMFYUI_INSTANCES", None, optional_count, new=True),
        "How many ComfyUI children to run (one per GPU); unset: one per COMFYUI_GPUS entry, "
        "else 1. With more than one, CMD must hold `{port}`.",
    ]
    comfyui_gpus: Annotated[
        list[str],
        Var("COMFYUI_GPUS", "", comma_list, new=True),
        "GPUs for the instances (`0,1,2,3`, or `auto`: nvidia-smi / CUDA_VISIBLE_DEVICES); "
        "instance i gets CUDA_VISIBLE_DEVICES=<its GPU> and `{gpu}` in CMD.",
    ]
    max_jobs_per_instance: Annotated[
        int,
        Var("MAX_JOBS_PER_INSTANCE", "2", int_at_least(1), new=True),
        "Jobs one instance holds at once (running + queued in ComfyUI); the rest wait in the "
        "sidecar's queue.",
    ]
    ready_min_instances: Annotated[
        int,
        Var("READY_MIN_INSTANCES", "1", int_at_least(1), new=True),
        "Ready instances needed for /ready to answer 200.",
    ]
    quiet_reconcile_s: Annotated[
        float,
        Var("COMFYUI_QUIET_RECONCILE_S", "10", float_above(0), new=True),
        "Seconds without a websocket frame, with jobs in flight, after which they are "
        "reconciled through /queue and /history.",
    ]
    comfyui_hang_timeout_s: Annotated[
        float,
        Var("COMFYUI_HANG_TIMEOUT_S", "60", float_at_least(0), new=True),
        "Seconds ComfyUI may go without answering a ping (HTTP, or the websocket's ping/pong) "
        "before it is declared hung: its running job fails 503 (`reason: comfyui_hung`), its "
        "queued jobs go back to the sidecar's queue and it is killed and restarted (0 = never).",
    ]
    comfyui_stall_timeout_s: Annotated[
        float,
        Var("COMFYUI_STALL_TIMEOUT_S", "120", float_at_least(0), new=True),
        "Seconds jobs may sit in ComfyUI's queue with none running and no frame before ComfyUI "
        "is declared stalled (its prompt worker died) and restarted like a hung one, its jobs "
        "re-queued (0 = never).",
    ]
    recycle_after_jobs: Annotated[
        int,
        Var("RECYCLE_AFTER_JOBS", "0", int_at_least(0), new=True),
        "Restart an instance's ComfyUI after this many jobs, once its jobs finished (0 = never).",
    ]
    recycle_rss_gb: Annotated[
        float,
        Var("RECYCLE_RSS_GB", "0", float_at_least(0), new=True),
        "Restart an instance's ComfyUI when, after a job, its process group's resident memory "
        "exceeds this many GB (0 = never).",
    ]
    recycle_vram_gb: Annotated[
        float,
        Var("RECYCLE_VRAM_GB", "0", float_at_least(0), new=True),
        "Restart an instance's ComfyUI when, after a job, its GPU's used memory (from "
        "/system_stats: vram_total - vram_free) exceeds this many GB (0 = never).",
    ]
    oom_retry: Annotated[
        bool,
        Var("OOM_RETRY", "false", boolean, new=True),
        "Run a job that failed with ComfyUI's out-of-memory error once more (after POST /free); "
        "otherwise it answers 503 with `reason: out_of_memory`.",
    ]
    direct_address: Annotated[
        str, Var("DIRECT_ADDRESS", "127.0.0.1", text), "Address the sidecar uses to reach ComfyUI."
    ]
    input_dir: Annotated[
        str, Var("INPUT_DIR", "${COMFY_HOME}/input", text), "ComfyUI's input directory."
    ]
    output_dir: Annotated[
        str, Var("OUTPUT_DIR", "${COMFY_HOME}/output", text), "ComfyUI's output directory."
    ]
    model_dir: Annotated[
        str, Var("MODEL_DIR", "${COMFY_HOME}/models", text), "ComfyUI's models directory."
    ]
    temp_dir: Annotated[
        str,
        Var("TEMP_DIR", "${COMFY_HOME}/temp", text, new=True),
        "ComfyUI's temp directory (its `--temp-directory`): where `name [temp]` inputs must be.",
    ]
    always_restart_comfyui: Annotated[
        bool,
        Var("ALWAYS_RESTART_COMFYUI", "false", boolean),
        "Restart ComfyUI whenever it exits (any exit code); otherwise the sidecar exits non-zero.",
    ]
    startup_check_interval_s: Annotated[
        float,
        Var("STARTUP_CHECK_INTERVAL_S", "1", float_above(0)),
        "Seconds between checks that ComfyUI answers at start-up.",
    ]
    startup_check_max_tries: Annotated[
        int,
        Var("STARTUP_CHECK_MAX_TRIES", "20", int_at_least(1)),
        "Checks before giving up; the start-up deadline is interval x tries.",
    ]
    restart_max: Annotated[
        int,
        Var("RESTART_MAX", "5", int_at_least(0), new=True),
        "Restarts allowed within RESTART_WINDOW_S before the sidecar gives up (crash loop).",
    ]
    restart_window_s: Annotated[
        float,
        Var("RESTART_WINDOW_S", "300", float_above(0), new=True),
        "Window, in seconds, over which RESTART_MAX is counted.",
    ]
    shutdown_grace_s: Annotated[
        float,
        Var("SHUTDOWN_GRACE_S", "30", float_at_least(0), new=True),
        "On SIGTERM/SIGINT, seconds jobs in flight may take to finish before ComfyUI is stopped.",
    ]
    drain_delay_s: Annotated[
        float,
        Var("DRAIN_DELAY_S", "0", float_at_least(0), new=True),
        "On SIGTERM/SIGINT, seconds `/ready` answers 503 while the sidecar still takes new "
        "requests, so a load balancer's health check stops sending before it refuses any "
        "(set it above the check interval x fall count); then the drain starts. The stop takes "
        "up to DRAIN_DELAY_S + SHUTDOWN_GRACE_S.",
    ]
    prompt_timeout_s: Annotated[
        float,
        Var("PROMPT_TIMEOUT_S", "3600", float_at_least(0), new=True),
        "Longest a job may run in ComfyUI, in seconds (0 = no limit); then it is interrupted.",
    ]

    # --- jobs -------------------------------------------------------------------------------
    jobs_dir: Annotated[
        str,
        Var("JOBS_DIR", "${HOME}/.cache/comfy-sidecar/jobs-${PORT}", text, new=True),
        "Where ended jobs' output files are kept for GET /jobs/{id}/outputs/{n} (one directory "
        "per sidecar; emptied at start-up).",
    ]
    job_retention_s: Annotated[
        float,
        Var("JOB_RETENTION_S", "3600", float_at_least(0), new=True),
        "Seconds an ended job (status, events, output files) is kept.",
    ]
    job_retention_max: Annotated[
        int,
        Var("JOB_RETENTION_MAX", "1000", int_at_least(1), new=True),
        "Most ended jobs kept; the oldest go first.",
    ]
    job_queue_url: Annotated[
        str | None,
        Var("JOB_QUEUE_URL", None, optional_redis_url, new=True),
        "`redis://[user:pass@]host:port/db` (`rediss://` for TLS): keep jobs and their queue "
        "in Redis, so every replica takes and answers for any job of `/jobs` and of the job "
        "adapters (Modal, ai-dock). Unset: in-process.",
    ]
    job_lease_s: Annotated[
        float,
        Var("JOB_LEASE_S", "30", float_above(0), new=True),
        "With JOB_QUEUE_URL: seconds without a heartbeat after which another replica takes a "
        "job over.",
    ]
    job_max_attempts: Annotated[
        int,
        Var("JOB_MAX_ATTEMPTS", "3", int_at_least(1), new=True),
        "With JOB_QUEUE_URL: runs of a job (the first and each take-over) before it fails.",
    ]
    job_inline_output_mb: Annotated[
        float,
        Var("JOB_INLINE_OUTPUT_MB", "8", float_at_least(0), new=True),
        "With JOB_QUEUE_URL: outputs up to this many MB (total per job, fractions allowed) are "
        "kept in Redis; larger ones go to the job's upload target or to JOB_OUTPUT_URL.",
    ]
    job_output_url: Annotated[
        str | None,
        Var("JOB_OUTPUT_URL", None, optional_output_url, new=True),
        "With JOB_QUEUE_URL: where outputs over JOB_INLINE_OUTPUT_MB go when the job names no "
        "upload target: a prefix (`s3://bucket/prefix`, a Hugging Face `.../resolve/<rev>/dir`, "
        "an Azure Blob container URL, or an http(s) prefix for PUT); each job's files land "
        "under `<prefix>/<job id>/`. Unset: such a job fails, naming both settings.",
    ]

    # --- assets (Comfy API v2) ----------------------------------------------------------------
    asset_dir: Annotated[
        str,
        Var("ASSET_DIR", "${HOME}/.cache/comfy-sidecar/assets-${PORT}", text, new=True),
        "Where assets (uploads and registered job outputs) are kept, one file per blake3 hash "
        "plus one record per asset; kept across restarts. Put it on the file system of "
        "JOBS_DIR and INPUT_DIR so outputs and staged inputs are hard links, not copies.",
    ]
    asset_store_gb: Annotated[
        float,
        Var("ASSET_STORE_GB", "0", float_at_least(0), new=True),
        "Size limit of ASSET_DIR's blobs in GiB; least recently used blobs no job holds are "
        "evicted, with their assets (0 = no limit). With JOB_QUEUE_URL: the most asset bytes "
        "kept in Redis (beyond it new ones go to ASSET_STORE_URL, else 507).",
    ]
    asset_retention_s: Annotated[
        float,
        Var("ASSET_RETENTION_S", "86400", float_at_least(0), new=True),
        "Seconds an uploaded asset is kept (its `expires_at`); 0 = until deleted or evicted.",
    ]
    asset_max_upload_mb: Annotated[
        float,
        Var("ASSET_MAX_UPLOAD_MB", "4096", float_above(0), new=True),
        "Largest asset `POST /api/v2/assets` takes, in MB (the upload is streamed to disk, "
        "never held in memory; MAX_BODY_SIZE_MB does not apply to it); larger ones get 413 "
        "`payload_too_large`.",
    ]
    asset_inline_mb: Annotated[
        float,
        Var("ASSET_INLINE_MB", "8", float_at_least(0), new=True),
        "With JOB_QUEUE_URL: assets up to this many MB are kept in Redis (every replica reads "
        "them there); larger ones go to ASSET_STORE_URL. Without an ASSET_STORE_URL (or "
        "JOB_OUTPUT_URL) this is the largest asset an upload may be (413 above).",
    ]
    asset_store_url: Annotated[
        str | None,
        Var("ASSET_STORE_URL", None, optional_output_url, new=True),
        "With JOB_QUEUE_URL: where assets over ASSET_INLINE_MB are kept, one object per blake3 "
        "hash (`<prefix>/<hex><ext>`), read by every replica: an `s3://bucket/prefix`, a "
        "Hugging Face `.../resolve/<rev>/dir`, an Azure Blob container URL or an http(s) "
        "prefix (PUT, then GET). Unset: `<JOB_OUTPUT_URL>/.assets` when JOB_OUTPUT_URL is set. "
        "Objects there are not deleted by the sidecar (expire them with a lifecycle rule "
        "longer than ASSET_RETENTION_S).",
    ]
    asset_url_secret: Annotated[
        str | None,
        Var("ASSET_URL_SECRET", None, optional_text, new=True),
        "Key of the HMAC-SHA256 that signs asset content URLs. Unset: a random key made at "
        "start, so URLs die with the process; replicas behind one address must share one.",
    ]
    asset_url_ttl_s: Annotated[
        float,
        Var("ASSET_URL_TTL_S", "3600", float_above(0), new=True),
        "Seconds a signed asset content URL stays valid (its `url_expires_at`).",
    ]

    # --- HTTP server --------------------------------------------------------------------------
    host: Annotated[
        str, Var("HOST", "::", text), "Address the API listens on (`::` is dual-stack)."
    ]
    port: Annotated[int, Var("PORT", "3000", int_at_least(1)), "Port the API listens on."]
    log_level: Annotated[
        str, Var("LOG_LEVEL", "info", log_level), "One of trace, debug, info, warn, error, fatal."
    ]
    log_format: Annotated[
        str,
        Var("LOG_FORMAT", "text", one_of("text", "json"), new=True),
        "`text` (one readable line a record) or `json` (one object a line: ts, level, logger, "
        "msg, job_id, prompt_id, instance, trace_id).",
    ]
    max_queue_depth: Annotated[
        int,
        Var("MAX_QUEUE_DEPTH", "0", int_at_least(0)),
        "ComfyUI queue depth at which /ready turns 503 (0 = no limit).",
    ]
    max_body_size_mb: Annotated[
        int,
        Var("MAX_BODY_SIZE_MB", "100", int_at_least(1)),
        "Largest request body, in MB; larger bodies get 413 (asset uploads are bounded by "
        "ASSET_MAX_UPLOAD_MB instead).",
    ]
    convert_max_pixels: Annotated[
        int,
        Var("CONVERT_MAX_PIXELS", "89478485", int_at_least(1), new=True),
        "Most pixels (width x height) of an output `convert_output` may convert; a larger one "
        "fails the job with 400 (`location: convert_output`) before it is decoded. Default: "
        "Pillow's `MAX_IMAGE_PIXELS`. Outputs convert one at a time, taking about 10 bytes a "
        "pixel while they do (165 MB for 4096x4096).",
    ]
    prepend_filenames: Annotated[
        bool,
        Var("PREPEND_FILENAMES", "true", boolean),
        "true: filename_prefix becomes `<id>_<prefix>`; false: it is replaced by `<id>`.",
    ]
    warmup_prompt_file: Annotated[
        str | None,
        Var("WARMUP_PROMPT_FILE", None, optional_text),
        "Path to an API-format prompt run before the sidecar is first ready.",
    ]
    warmup_prompt_url: Annotated[
        str | None,
        Var("WARMUP_PROMPT_URL", None, optional_text),
        "URL of a warmup prompt, downloaded at start-up (used when no file is given).",
    ]

    # --- access -------------------------------------------------------------------------------
    api_keys: Annotated[
        list[str],
        Var("API_KEYS", "", comma_list, new=True),
        "Comma list of API keys; when any key is set (here or in API_KEYS_FILE), every route "
        "but /health and /ready needs one (`Authorization: Bearer <key>` or `X-API-Key`).",
    ]
    api_keys_file: Annotated[
        str | None,
        Var("API_KEYS_FILE", None, optional_text, new=True),
        "File of API keys, re-read on SIGHUP; its keys add to API_KEYS. One key a line (blank "
        "lines and `#` comments ignored), or YAML naming each key with its quotas and priority "
        "(`keys: [{key, name, max_concurrent_jobs, jobs_per_minute, max_queue, priority}]`; "
        "see Security).",
    ]
    jobs_visible_to: Annotated[
        str,
        Var("JOBS_VISIBLE_TO", "all", one_of("all", "owner"), new=True),
        "Whose jobs a key sees: `all` (one team), or `owner`: only the jobs it submitted (GET "
        "/jobs and every job route of the job APIs answer 404 for another key's job).",
    ]
    metrics_require_auth: Annotated[
        bool,
        Var("METRICS_REQUIRE_AUTH", "false", boolean, new=True),
        "true: /metrics needs an API key too (when keys are set).",
    ]

    # --- workflows ----------------------------------------------------------------------------
    workflow_dir: Annotated[
        str,
        Var("WORKFLOW_DIR", "/workflows", text),
        "Directory of Python workflow modules mounted at /workflow/...",
    ]
    markdown_schema_descriptions: Annotated[
        bool,
        Var("MARKDOWN_SCHEMA_DESCRIPTIONS", "true", boolean),
        "Describe workflow request fields as a Markdown table in the API docs.",
    ]

    # --- cache and storage --------------------------------------------------------------------
    cache_dir: Annotated[
        str, Var("CACHE_DIR", "${HOME}/.cache/comfyui-api", text), "Download cache directory."
    ]
    lru_cache_size_gb: Annotated[
        float,
        Var("LRU_CACHE_SIZE_GB", "0", float_at_least(0)),
        "Cache size limit in GiB; least recently used entries are evicted (0 = no limit).",
    ]
    http_auth_header_name: Annotated[
        str | None,
        Var("HTTP_AUTH_HEADER_NAME", None, optional_text),
        "Header sent on HTTP downloads/uploads to hosts in HTTP_AUTH_HEADER_HOSTS.",
    ]
    http_auth_header_value: Annotated[
        str | None,
        Var("HTTP_AUTH_HEADER_VALUE", None, optional_text),
        "Value for HTTP_AUTH_HEADER_NAME.",
    ]
    http_auth_header_hosts: Annotated[
        list[str],
        Var("HTTP_AUTH_HEADER_HOSTS", "", comma_list, new=True),
        "Comma list of host globs that may receive HTTP_AUTH_HEADER_* (empty = none).",
    ]
    max_download_gb: Annotated[
        float,
        Var("MAX_DOWNLOAD_GB", "100", float_at_least(0), new=True),
        "Largest download in GiB; a longer body is cut and nothing is cached (0 = no limit).",
    ]
    download_idle_timeout_s: Annotated[
        float,
        Var("DOWNLOAD_IDLE_TIMEOUT_S", "60", float_above(0), new=True),
        "A download that receives less than 256 KiB in this many seconds is cut.",
    ]

    # --- SSRF guard ---------------------------------------------------------------------------
    allowed_url_hosts: Annotated[
        list[str],
        Var("ALLOWED_URL_HOSTS", "", comma_list, new=True),
        "Comma list of host globs and CIDRs a caller's URL may reach even when private "
        "(e.g. `*.internal,10.0.0.0/8`).",
    ]
    allow_private_urls: Annotated[
        bool,
        Var("ALLOW_PRIVATE_URLS", "false", boolean, new=True),
        "Let callers' URLs reach loopback, private and link-local addresses (never the "
        "sidecar's or ComfyUI's port).",
    ]

    download_connections: Annotated[
        int,
        Var("DOWNLOAD_CONNECTIONS", "8", int_at_least(1), new=True),
        "Parallel ranged GETs for an HTTP(S) download of 64 MB or more (1 = one stream).",
    ]

    # --- manifest -----------------------------------------------------------------------------
    manifest: Annotated[
        str | None,
        Var("MANIFEST", None, optional_text),
        "Path to a manifest (.yml, .yaml or .json) installed at start-up.",
    ]
    manifest_json: Annotated[
        str | None,
        Var("MANIFEST_JSON", None, optional_text),
        "Inline manifest JSON; wins over MANIFEST.",
    ]

    # --- webhooks and Salad -------------------------------------------------------------------
    webhook_secret: Annotated[
        str | None,
        Var("WEBHOOK_SECRET", None, optional_text),
        "Key for Standard Webhooks signatures (base64, `whsec_` prefix accepted).",
    ]
    prompt_webhook_retries: Annotated[
        int,
        Var("PROMPT_WEBHOOK_RETRIES", "3", int_at_least(1)),
        "Total delivery attempts per webhook (>= 1).",
    ]
    webhook_timeout_s: Annotated[
        float,
        Var("WEBHOOK_TIMEOUT_S", "10", float_above(0), new=True),
        "Timeout of one webhook delivery attempt, in seconds.",
    ]
    max_pending_deliveries: Annotated[
        int,
        Var("MAX_PENDING_DELIVERIES", "500", int_at_least(0), new=True),
        "Most asynchronous jobs with a webhook (`webhook`, `webhook_v2`) whose result is not yet "
        "delivered (running, or their webhook still retrying); beyond it new ones get 429 "
        "(0 = no limit).",
    ]
    system_webhook_url: Annotated[
        str | None,
        Var("SYSTEM_WEBHOOK_URL", None, optional_http_url),
        "Where ComfyUI and storage events are sent.",
    ]
    system_webhook_events: Annotated[
        list[str],
        Var("SYSTEM_WEBHOOK_EVENTS", "", comma_list),
        "Comma list of event names to send, or `all`.",
    ]
    salad_imds_url: Annotated[
        str,
        Var("SALAD_IMDS_URL", "http://169.254.169.254", text, new=True),
        "Salad instance metadata service, for the deletion cost.",
    ]

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


def _vars() -> tuple[Var, ...]:
    hints = typing.get_type_hints(Settings, include_extras=True)
    found = []
    for field in Settings.__struct_fields__:
        meta = getattr(hints[field], "__metadata__", ())
        if meta:  # (Var, description)
            var, doc = meta
            found.append(replace(var, field=field, doc=doc))
    return tuple(found)


#: Every variable :class:`Settings` declares, in declaration order.
VARS: tuple[Var, ...] = _vars()
_COMFY_HOME = next(var for var in VARS if var.field == "comfy_home")


def _expand(value: str, env: Mapping[str, str], comfy_home: str) -> str:
    home = env.get("HOME") or os.path.expanduser("~")
    port = env.get("PORT") or "3000"
    value = value.replace("${COMFY_HOME}", comfy_home).replace("${HOME}", home)
    return value.replace("${PORT}", port)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Parse ``env`` (default ``os.environ``) into :class:`Settings`.

    Raises :class:`ConfigError` with one line, ``NAME: problem (got 'value')``, for the first
    bad variable; also for rules that tie several variables together.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    comfy_home = env.get("COMFY_HOME") or str(_COMFY_HOME.default)
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
    "restart",
    "recycle",
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
    keys_file = values["api_keys_file"]
    if keys_file is not None:
        from comfy_sidecar.config.keys import check_names, env_keys, read_key_file

        try:
            check_names([*env_keys(values["api_keys"]), *read_key_file(keys_file)])
        except (OSError, ValueError) as exc:
            raise ConfigError(f"API_KEYS_FILE: {exc}") from None
    instances = values["comfyui_instances"] or max(1, len(values["comfyui_gpus"]))
    if values["comfyui_gpus"] == ["auto"] and values["comfyui_instances"] is None:
        instances = 1  # decided at start-up, when the GPUs are known
    if instances > 1 and not any("{port}" in part for part in values["cmd"]):
        raise ConfigError(
            "CMD: must hold {port} when more than one ComfyUI instance runs "
            f"(COMFYUI_INSTANCES/COMFYUI_GPUS give {instances})"
        )
    secret = values["asset_url_secret"]
    if secret is not None and len(secret) < 16:
        raise ConfigError("ASSET_URL_SECRET: must be at least 16 characters (a random string)")
    manifest = values["manifest"]
    if manifest and not manifest.lower().endswith((".yml", ".yaml", ".json")):
        raise ConfigError(f"MANIFEST: must end in .yml, .yaml or .json (got {manifest!r})")


def markdown_table() -> str:
    """The README's table of variables, as Markdown: variable, default, meaning (*New.*)."""
    lines = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for var in VARS:
        default = "(not set)" if var.default is None else f"`{var.default}`"
        if var.default == "":
            default = "(empty)"
        doc = var.doc + (" *New.*" if var.new else "")
        lines.append(f"| `{var.name}` | {default} | {doc} |")
    return "\n".join(lines) + "\n"
