"""The example manifests in manifests/ and the parsing helpers, checked in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_sidecar.config import load_settings
from comfy_sidecar.manifest import (
    Manifest,
    ManifestError,
    PythonTarget,
    load_manifest,
    parse_git_url,
    repo_name,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "manifests").glob("*.yml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_manifests_validate(path: Path, tmp_path: Path) -> None:
    settings = load_settings({"HOME": str(tmp_path), "MANIFEST": str(path)})
    loaded = load_manifest(settings, which=lambda name: f"/usr/bin/{name}")
    assert loaded is not None
    manifest, source = loaded
    assert isinstance(manifest, Manifest) and source == "MANIFEST"
    assert manifest.models.before_start, "every example brings at least one model"


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {"cpu-demo.yml", "sd15.yml", "flux.yml"}


@pytest.mark.parametrize(
    ("url", "base", "ref"),
    [
        ("https://github.com/a/b", "https://github.com/a/b", None),
        ("https://github.com/a/b.git@v1.2", "https://github.com/a/b.git", "v1.2"),
        ("https://github.com/a/b/tree/dev", "https://github.com/a/b", "dev"),
        ("https://github.com/a/b/commit/abc123", "https://github.com/a/b", "abc123"),
        ("https://github.com/a/b/releases/tag/v2", "https://github.com/a/b", "v2"),
        ("https://gitlab.com/g/p/-/tree/main", "https://gitlab.com/g/p", "main"),
        ("https://gitlab.com/g/p/-/commit/deadbeef", "https://gitlab.com/g/p", "deadbeef"),
        ("https://bitbucket.org/o/r/src/feat/some/path", "https://bitbucket.org/o/r", "feat"),
        ("https://bitbucket.org/o/r/commits/cafe", "https://bitbucket.org/o/r", "cafe"),
        ("git@github.com:a/b.git", "git@github.com:a/b.git", None),
    ],
)
def test_parse_git_url(url: str, base: str, ref: str | None) -> None:
    assert parse_git_url(url) == (base, ref)
    assert repo_name(base) == "b" or repo_name(base) in ("p", "r")


def test_pip_command_inside_and_outside_a_venv(tmp_path: Path) -> None:
    venv = tmp_path / "v"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    inside = PythonTarget.find({"VIRTUAL_ENV": str(venv)}, str(tmp_path / "c"), lambda _: None)
    assert inside.venv and inside.python == str(venv / "bin" / "python")
    assert inside.install_argv(["x"], "/bin/uv") == [
        "/bin/uv",
        "pip",
        "install",
        "--python",
        str(venv / "bin" / "python"),
        "x",
    ]
    outside = PythonTarget.find({}, str(tmp_path / "c"), lambda n: f"/usr/bin/{n}")
    assert not outside.venv
    assert "--system" in outside.install_argv(["x"], "/bin/uv")
    argv = outside.install_argv(["x"], None)
    assert argv[:4] == ["/usr/bin/python3", "-m", "pip", "install"] and "--system" not in argv
    assert outside.install_env({})["PIP_BREAK_SYSTEM_PACKAGES"] == "1"
    assert "PIP_BREAK_SYSTEM_PACKAGES" not in inside.install_env({})


def test_manifest_json_wins(tmp_path: Path) -> None:
    settings = load_settings(
        {"HOME": str(tmp_path), "MANIFEST": str(tmp_path / "absent.yml"), "MANIFEST_JSON": "{}"}
    )
    loaded = load_manifest(settings)
    assert loaded is not None and loaded[1] == "MANIFEST_JSON"
    with pytest.raises(ManifestError, match=r"^MANIFEST: cannot read"):
        load_manifest(load_settings({"HOME": str(tmp_path), "MANIFEST": str(tmp_path / "a.yml")}))
