"""The frozen binary dist/comfy-sidecar (built by `make binary`), when present and up to date.

Checks what a missing hidden import would break before a user finds it: every module of the
comfy_sidecar package and every lazily imported module the sidecar relies on is inside the
archive, the botocore models the S3 backend needs are kept, and the binary runs (`--version`,
`--help`, a configuration error exits 2 naming the variable). The full frozen-binary smoke suite
(prompt, S3 upload, webhook, manifest, SIGTERM) belongs to issue 7's later part.

Skipped, with the reason, when the binary has not been built or is older than the sources; CI
builds it first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import comfy_sidecar
from comfy_sidecar.config import VARS

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("COMFY_SIDECAR_BINARY", ROOT / "dist" / "comfy-sidecar"))
SOURCES = [*sorted((ROOT / "comfy_sidecar").rglob("*.py")), ROOT / "build.spec"]


def _stale_reason() -> str | None:
    if not BINARY.is_file():
        return f"{BINARY} not built (run `make binary`)"
    built = BINARY.stat().st_mtime
    newer = [p for p in SOURCES if p.stat().st_mtime > built]
    if newer:
        return f"{BINARY} is older than {newer[0].relative_to(ROOT)} (run `make binary`)"
    return None


REASON = _stale_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

# Imported by name or inside functions somewhere in the stack; PyInstaller cannot see them.
LAZY_MODULES = [
    "uvicorn.loops.asyncio",
    "uvicorn.loops.auto",
    "uvicorn.protocols.http.auto",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.websockets.auto",
    "uvicorn.lifespan.on",
    "uvicorn.lifespan.off",
    "litestar.openapi.plugins",
    "litestar.logging.config",
    "litestar.logging.standard",
    "litestar.serialization.msgspec_hooks",
    "msgspec.json",
    "msgspec.yaml",
    "httpx",
    "aiohttp.client_ws",
    "boto3.s3.transfer",
    "botocore.httpsession",
    "s3transfer.manager",
    "azure.storage.blob",
    "azure.storage.blob.aio",
    "azure.core.pipeline.transport",
    "huggingface_hub.hf_api",
    "huggingface_hub.file_download",
    "PIL.PngImagePlugin",
    "PIL.JpegImagePlugin",
    "PIL.WebPImagePlugin",
    "PIL.GifImagePlugin",
    "yaml",
    # traces, imported only when an OTLP endpoint is set
    "comfy_sidecar.observability.span_export",
    "opentelemetry.sdk.trace.export",
    "opentelemetry.sdk.resources",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.trace.propagation.tracecontext",
    "google.protobuf",
    "requests",
]
DATA_FILES = [
    "botocore/data/endpoints.json",
    "botocore/data/_retry.json",
    "botocore/data/sdk-default-configuration.json",
    "botocore/data/s3/2006-03-01/service-2.json.gz",
    "botocore/data/sts/2011-06-15/service-2.json.gz",
    "certifi/cacert.pem",
]
EXCLUDED = ["tkinter", "numpy", "pytest", "pydantic", "rich", "IPython"]


def _reader() -> Any:
    """PyInstaller's reader of the binary's archive (PyInstaller is in the `dev` extra)."""
    readers = pytest.importorskip("PyInstaller.archive.readers", reason="PyInstaller not installed")
    return readers.CArchiveReader(str(BINARY))


@pytest.fixture(scope="module")
def contents() -> tuple[set[str], set[str]]:
    """(module names in the PYZ, file names in the CArchive)."""
    reader = _reader()
    pyz = reader.open_embedded_archive("PYZ.pyz")
    return set(pyz.toc), set(reader.toc)


def _package_modules() -> list[str]:
    names = []
    package = ROOT / "comfy_sidecar"
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_every_project_module_is_frozen(contents: tuple[set[str], set[str]]) -> None:
    modules, _ = contents
    missing = [m for m in _package_modules() if m not in modules and m != "comfy_sidecar.__main__"]
    assert not missing


def test_lazily_imported_modules_are_frozen(contents: tuple[set[str], set[str]]) -> None:
    modules, files = contents
    present = modules | {Path(f).with_suffix("").as_posix().replace("/", ".") for f in files}
    missing = [
        m
        for m in LAZY_MODULES
        if m not in present and not any(p.startswith(m + ".") for p in present)
    ]
    assert not missing


def test_data_files_are_frozen_and_botocore_is_trimmed(
    contents: tuple[set[str], set[str]],
) -> None:
    _, files = contents
    assert [f for f in DATA_FILES if f not in files] == []
    services = {
        f.split("/")[2] for f in files if f.startswith("botocore/data/") and f.count("/") > 3
    }
    assert services == {"s3", "sts", "sso", "sso-oidc", "signin"}


def test_unneeded_packages_are_excluded(contents: tuple[set[str], set[str]]) -> None:
    modules, _ = contents
    roots = {m.split(".")[0] for m in modules}
    assert [name for name in EXCLUDED if name in roots] == []


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BINARY), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_version() -> None:
    proc = _run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"comfy-sidecar {comfy_sidecar.__version__}"


def test_help_lists_every_variable() -> None:
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    assert [v.name for v in VARS if v.name not in proc.stdout] == []


def test_bad_configuration_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PORT": "not-a-port"}
    proc = _run(env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("comfy-sidecar: PORT:"), proc.stderr


# docs/deploy.md promises this floor: the newest glibc symbol version any bundled object needs.
GLIBC_FLOOR = (2, 35)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
def test_glibc_floor_matches_the_documented_one(tmp_path: Path) -> None:
    reader = _reader()
    needs: dict[str, tuple[int, ...]] = {}
    objects = [("(bootloader)", BINARY)]
    for name, entry in reader.toc.items():
        if entry[-1] == "b":
            path = tmp_path / name.replace("/", "__")
            path.write_bytes(reader.extract(name))
            objects.append((name, path))
    for name, path in objects:
        out = subprocess.run(
            ["objdump", "-T", str(path)], capture_output=True, text=True, check=True
        ).stdout
        versions = [tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_(\d[\d.]*)", out)]
        if versions:
            needs[name] = max(versions)
    assert needs, "no ELF objects found"
    newest = max(needs.values())
    worst = sorted(n for n, v in needs.items() if v == newest)
    assert newest <= GLIBC_FLOOR, f"needs glibc {newest} because of {worst}"
    bundled = {Path(n).name.split(".so")[0] for n in needs}
    assert not bundled & {"libstdc++", "libgcc_s"}, "the C++ runtime is left to the host"
