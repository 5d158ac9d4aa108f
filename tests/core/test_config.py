"""Settings: one declaration (`Settings`) drives parsing, `--help` and the README table."""

from __future__ import annotations

import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from comfy_sidecar.config import (
    SYSTEM_EVENT_NAMES,
    VARS,
    ConfigError,
    Settings,
    load_settings,
    markdown_table,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "settings_table.py"


def test_defaults() -> None:
    s = load_settings({"HOME": "/home/u"})
    assert s.cmd == ["init.sh"]
    assert (s.comfy_home, s.input_dir, s.output_dir, s.model_dir) == (
        "/opt/ComfyUI",
        "/opt/ComfyUI/input",
        "/opt/ComfyUI/output",
        "/opt/ComfyUI/models",
    )
    assert s.cache_dir == "/home/u/.cache/comfyui-api"
    assert (s.host, s.port, s.comfyui_port, s.direct_address) == ("::", 3000, 8188, "127.0.0.1")
    assert (s.startup_check_interval_s, s.startup_check_max_tries) == (1.0, 20)
    assert (s.restart_max, s.restart_window_s, s.shutdown_grace_s) == (5, 300.0, 30.0)
    assert (s.prompt_timeout_s, s.max_queue_depth, s.max_body_size_mb) == (3600.0, 0, 100)
    assert (s.always_restart_comfyui, s.prepend_filenames, s.markdown_schema_descriptions) == (
        False,
        True,
        True,
    )
    assert (s.log_level, s.workflow_dir, s.lru_cache_size_gb) == ("info", "/workflows", 0.0)
    assert (s.prompt_webhook_retries, s.webhook_timeout_s) == (3, 10.0)
    assert s.salad_imds_url == "http://169.254.169.254"
    for field in (
        "warmup_prompt_file",
        "warmup_prompt_url",
        "http_auth_header_name",
        "http_auth_header_value",
        "manifest",
        "manifest_json",
        "webhook_secret",
        "system_webhook_url",
    ):
        assert getattr(s, field) is None, field
    assert s.http_auth_header_hosts == s.system_webhook_events == []
    assert s.system_meta == s.salad == {}
    assert not s.on_salad
    assert (s.comfy_url, s.comfy_ws_url) == ("http://127.0.0.1:8188", "ws://127.0.0.1:8188/ws")


def test_comfy_home_is_expanded_in_defaults_and_empty_means_default() -> None:
    s = load_settings({"HOME": "/h", "COMFY_HOME": "/srv/comfy", "INPUT_DIR": "", "PORT": ""})
    assert (s.input_dir, s.output_dir, s.port) == ("/srv/comfy/input", "/srv/comfy/output", 3000)
    s = load_settings({"HOME": "/h", "COMFY_HOME": "/c", "OUTPUT_DIR": "/out"})
    assert (s.input_dir, s.output_dir) == ("/c/input", "/out")


def test_values_are_parsed() -> None:
    s = load_settings(
        {
            "HOME": "/h",
            "CMD": "python main.py --extra 'a b'",
            "DIRECT_ADDRESS": "::1",
            "ALWAYS_RESTART_COMFYUI": " Yes ",
            "LOG_LEVEL": "WARN",
            "HTTP_AUTH_HEADER_HOSTS": " a.example, ,*.b.example ",
            "SYSTEM_WEBHOOK_URL": "https://hooks.example/x",
            "SYSTEM_WEBHOOK_EVENTS": "all",
            "SYSTEM_META_region": "eu",
            "SALAD_MACHINE_ID": "m1",
            "SALAD_PROJECT_NAME": "",
        }
    )
    assert s.cmd == ["python", "main.py", "--extra", "a b"]
    assert s.comfy_url == "http://[::1]:8188"
    assert s.always_restart_comfyui is True
    assert s.log_level == "warn"
    assert s.http_auth_header_hosts == ["a.example", "*.b.example"]
    assert s.system_webhook_url == "https://hooks.example/x"
    assert s.system_webhook_events == list(SYSTEM_EVENT_NAMES)
    assert s.system_meta == {"region": "eu"}
    assert s.salad == {"salad_machine_id": "m1"}
    assert s.on_salad


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("PORT", "x", "PORT: expected a whole number (got 'x')"),
        ("COMFYUI_PORT_HOST", "0", "COMFYUI_PORT_HOST: must be >= 1 (got '0')"),
        ("PROMPT_WEBHOOK_RETRIES", "0", "PROMPT_WEBHOOK_RETRIES: must be >= 1 (got '0')"),
        ("MAX_QUEUE_DEPTH", "-1", "MAX_QUEUE_DEPTH: must be >= 0 (got '-1')"),
        ("STARTUP_CHECK_INTERVAL_S", "0", "STARTUP_CHECK_INTERVAL_S: must be > 0 (got '0')"),
        ("LRU_CACHE_SIZE_GB", "nan", "LRU_CACHE_SIZE_GB: expected a number (got 'nan')"),
        ("SHUTDOWN_GRACE_S", "-1", "SHUTDOWN_GRACE_S: must be >= 0 (got '-1')"),
        ("ALWAYS_RESTART_COMFYUI", "maybe", "ALWAYS_RESTART_COMFYUI: expected true or false"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL: expected one of trace, debug, info, warn,"),
        ("CMD", "'a", "CMD: cannot split like a shell: No closing quotation"),
        ("CMD", "  ", "CMD: is empty (got '  ')"),
        ("SYSTEM_WEBHOOK_URL", "ftp://x/y", "SYSTEM_WEBHOOK_URL: must be an http(s) URL"),
        ("SYSTEM_WEBHOOK_EVENTS", "progress,progres", "SYSTEM_WEBHOOK_EVENTS: unknown event"),
        ("MANIFEST", "m.txt", "MANIFEST: must end in .yml, .yaml or .json (got 'm.txt')"),
        ("HTTP_AUTH_HEADER_NAME", "X-Key", "HTTP_AUTH_HEADER_VALUE: must be set together"),
        ("HTTP_AUTH_HEADER_VALUE", "k", "HTTP_AUTH_HEADER_NAME: must be set together"),
        ("ASSET_STORE_GB", "-1", "ASSET_STORE_GB: must be >= 0 (got '-1')"),
        ("ASSET_URL_TTL_S", "0", "ASSET_URL_TTL_S: must be > 0 (got '0')"),
        ("ASSET_URL_SECRET", "short", "ASSET_URL_SECRET: must be at least 16 characters"),
    ],
)
def test_a_bad_value_names_the_variable_in_one_line(name: str, raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"HOME": "/h", name: raw})
    text = str(err.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_asset_settings_default_to_a_per_port_directory_and_a_key_made_at_start() -> None:
    s = load_settings({"HOME": "/home/u", "PORT": "3100"})
    assert s.asset_dir == "/home/u/.cache/comfy-sidecar/assets-3100"
    assert (s.asset_store_gb, s.asset_retention_s, s.asset_url_ttl_s) == (0.0, 86400.0, 3600.0)
    assert s.asset_url_secret is None
    s = load_settings(
        {"HOME": "/h", "ASSET_URL_SECRET": "0123456789abcdef", "ASSET_STORE_GB": "1.5"}
    )
    assert (s.asset_url_secret, s.asset_store_gb) == ("0123456789abcdef", 1.5)


def test_every_setting_is_declared_once_with_a_description() -> None:
    fields = [f for f in Settings.__struct_fields__ if f not in ("system_meta", "salad")]
    assert [var.field for var in VARS] == fields
    names = [var.name for var in VARS]
    assert len(set(names)) == len(names)
    assert all(var.doc.strip() and var.doc == var.doc.strip() for var in VARS)
    defaults = msgspec.structs.asdict(load_settings({"HOME": "/h"}))
    for var in VARS:  # every default parses to what an explicit value parses to
        if var.default is not None and "${" not in var.default:
            explicit = load_settings({"HOME": "/h", var.name: var.default})
            assert getattr(explicit, var.field) == defaults[var.field], var.name


def test_readme_table_is_generated_from_the_settings() -> None:
    with_table = runpy.run_path(str(SCRIPT))["with_table"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert with_table(readme) == readme, "README is stale: run scripts/settings_table.py"
    for var in VARS:
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{var.name}` |"))
        assert row.endswith(" *New.* |") == var.new, var.name


def test_settings_table_script_finds_and_fixes_drift(tmp_path: Path) -> None:
    copy = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", copy)
    text = copy.read_text(encoding="utf-8")
    copy.write_text(text.replace("| Port the API listens on. |", "| stale |"), encoding="utf-8")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, str(SCRIPT), *args, str(copy)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    check = run("--check")
    assert check.returncode == 1 and "out of date" in check.stderr
    assert run().returncode == 0
    assert copy.read_text(encoding="utf-8") == text
    assert run("--check").returncode == 0
    assert markdown_table() in text


def test_help_lists_every_variable_with_its_default_and_description() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "comfy_sidecar", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0
    assert "README" in out.stdout
    for var in VARS:
        default = "(not set)" if var.default is None else repr(var.default)
        assert f"  {var.name} " in out.stdout and f"default {default}" in out.stdout, var.name
        assert var.doc in out.stdout, var.name
