"""Manifest provisioning end to end: a real sidecar process, real pip/git/apt, real servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Backend
from tests.manifest.conftest import (
    build_wheel,
    fatal_lines,
    git,
    make_repo,
    make_venv,
    manifest_env,
    watch_probes,
)
from tests.storage.servers import FileServer
from tests.waiting import wait_for


@pytest.mark.sidecar_process
def test_full_manifest_then_warm_second_boot(
    spawn: Any,
    tmp_path: Path,
    files: FileServer,
    s3_env: dict[str, str],
    s3_client: Any,
) -> None:
    # pip: a wheel installed into a throwaway venv (VIRTUAL_ENV), another via a node's
    # requirements.txt.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel_a = build_wheel(wheels, "sidecar_probe_a", value="a")
    wheel_b = build_wheel(wheels, "sidecar_probe_b", value="b")
    venv_python = make_venv(tmp_path / "venv")
    # custom nodes: one pinned at a tag (with requirements.txt), one pinned at a commit.
    node_a = tmp_path / "repos" / "node_a"
    make_repo(
        node_a,
        [
            {"version.txt": "1", "requirements.txt": f"{wheel_b}\n"},
            {"version.txt": "2"},
        ],
    )
    node_b = tmp_path / "repos" / "node_b.git"
    shas_b = make_repo(node_b, [{"version.txt": "1"}, {"version.txt": "2"}, {"version.txt": "3"}])
    # a registry node, through a stand-in comfy CLI that records its arguments.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    comfy_args = tmp_path / "comfy-args.txt"
    (bin_dir / "comfy").write_text(f'#!/bin/sh\necho "$@" >> {comfy_args}\n')
    (bin_dir / "comfy").chmod(0o755)
    # models: HTTP and S3.
    files.files.update({"one.safetensors": b"1" * 300_000, "two.bin": b"2" * 1000})
    files.files["three.pt"] = b"3" * 5000
    s3_client.create_bucket(Bucket="models")
    s3_client.put_object(Bucket="models", Key="sub/four.safetensors", Body=b"4" * 7000)
    manifest = {
        "pip": [str(wheel_a), {"name": str(tmp_path / "missing.whl"), "optional": True}],
        "custom_nodes": [
            f"file://{node_a}@v1",
            f"file://{node_b}/commit/{shas_b[1]}",
            "some-registry-node",
        ],
        "models": {
            "before_start": [
                {
                    "url": files.url("/files/one.safetensors"),
                    "local_path": "models/checkpoints/one.safetensors",
                },
                {"url": files.url("/files/two.bin"), "local_path": "models/loras/deep/two.bin"},
                {
                    "url": "s3://models/sub/four.safetensors",
                    "local_path": "models/vae/four.safetensors",
                },
                {
                    "url": files.url("/files/absent.bin"),
                    "local_path": "models/loras/absent.bin",
                    "optional": True,
                },
            ],
            "after_start": [
                {"url": files.url("/files/missing.pt"), "local_path": "models/loras/m.pt"},
                {"url": files.url("/files/three.pt"), "local_path": "models/loras/three.pt"},
            ],
        },
    }
    backend = Backend("double", tmp_path / "comfy")
    cache = tmp_path / "shared-cache"
    env = {
        **manifest_env(manifest),
        **s3_env,
        "CACHE_DIR": str(cache),
        "VIRTUAL_ENV": str(tmp_path / "venv"),
        "PATH": f"{tmp_path / 'venv' / 'bin'}:{bin_dir}:{os.environ['PATH']}",
    }
    files.delay_s = 1.0  # each model GET takes a second: the probes must show it
    first = spawn(backend, **env)
    seen = watch_probes(first, 60)
    files.delay_s = 0.0
    phases = {body["phase"] for body in seen}
    assert "provisioning" in phases
    details = " ".join(body["detail"] for body in seen if body["phase"] == "provisioning")
    assert "models.before_start" in details, seen
    assert "pip" in details or "custom_nodes" in details, seen

    # pip went into the venv, not the test's python.
    out = subprocess.run(
        [str(venv_python), "-c", "import sidecar_probe_a, sidecar_probe_b as b; print(b.VALUE)"],
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "b", out.stderr
    assert "optional missing.whl not installed" in first.log().replace(str(tmp_path) + "/", "")
    # nodes at their refs.
    custom = backend.comfy_home / "custom_nodes"
    assert (custom / "node_a" / "version.txt").read_text() == "1"
    assert git("describe", "--tags", cwd=custom / "node_a") == "v1"
    assert git("rev-parse", "HEAD", cwd=custom / "node_b") == shas_b[1]
    assert "some-registry-node" in comfy_args.read_text()
    assert f"--workspace={backend.comfy_home}" in comfy_args.read_text()
    # models linked where asked, with the downloaded bytes.
    models = backend.comfy_home / "models"
    assert (models / "checkpoints" / "one.safetensors").read_bytes() == b"1" * 300_000
    assert (models / "loras" / "deep" / "two.bin").read_bytes() == b"2" * 1000
    assert (models / "vae" / "four.safetensors").read_bytes() == b"4" * 7000
    assert not (models / "loras" / "absent.bin").exists()
    # after_start: one failure (logged, not fatal), one file that arrives.
    first.wait_status("/ready", 200, 10)

    def listing_with_three() -> dict[str, list[str]] | None:
        listing: dict[str, list[str]] = first.get("/models").json()
        return listing if "three.pt" in listing.get("loras", []) else None

    listing = wait_for(listing_with_three, timeout=10, interval=0.05, what="three.pt in /models")
    assert "one.safetensors" in listing["checkpoints"]
    assert "models.after_start[0]" in first.log() and "missing.pt" in first.log()
    assert first.get("/ready").status_code == 200
    assert first.proc is not None and first.proc.poll() is None
    first.stop()

    # Second boot, same cache and COMFY_HOME: nothing downloaded; one changed URL for the
    # same local_path replaces that link (one GET, for the new URL only).
    gets_before = files.count("GET", "/files/")
    manifest["models"]["before_start"][1]["url"] = files.url("/files/three.pt")  # type: ignore[index]
    env["MANIFEST_JSON"] = json.dumps(manifest)
    second = spawn(backend, **env)
    second.wait_ready()
    log = second.log()
    assert "custom node node_a already at v1" in log
    assert "custom node node_b already at" in log
    gets = [p for m, p, _ in files.requests if m == "GET" and p.startswith("/files/")]
    second_gets = gets[gets_before:]
    # three.pt is cached already (after_start of the first boot): nothing at all to fetch,
    # except the optional absent.bin and after_start's missing.pt, which never cache.
    assert set(second_gets) <= {"/files/absent.bin", "/files/missing.pt"}, second_gets
    assert (models / "loras" / "deep" / "two.bin").read_bytes() == b"3" * 5000
    took = [line for line in log.splitlines() if "manifest provisioning took" in line]
    assert took, log[-3000:]


BAD = [
    ({"pip": "numpy"}, "MANIFEST_JSON: pip: Expected `array`, got `str`"),
    (
        {"models": {"before_start": [{"url": "https://h/a.bin", "local_path": "x"}, {"url": "x"}]}},
        "MANIFEST_JSON: models.before_start[1].local_path: Object missing required field",
    ),
    (
        {"models": {"before_start": [{"url": "ftp://h/a.bin", "local_path": "models/a.bin"}]}},
        "MANIFEST_JSON: models.before_start[0].url: not a URL",
    ),
    (
        {"models": {"after_start": [{"url": "https://h/a", "local_path": "../../etc/x"}]}},
        "MANIFEST_JSON: models.after_start[0].local_path: ",
    ),
    ({"models": {"before-start": []}}, "MANIFEST_JSON: models.before-start: Object contains"),
    ({"custom_nodes": ["some-node"]}, "MANIFEST_JSON: custom_nodes[0]: registry node 'some-node'"),
    (
        {"custom_nodes": [{"url": "https://github.com/a/b", "name": "b"}]},
        "MANIFEST_JSON: custom_nodes[0]: give exactly one of url or name",
    ),
    ({"apt": ["ok", "bad name;rm"]}, "MANIFEST_JSON: apt[1]: not an apt package name"),
    ([1, 2], "MANIFEST_JSON: must be a mapping"),
    ("{not json", "MANIFEST_JSON: not valid JSON"),
]


@pytest.mark.parametrize(("manifest", "expected"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_manifest_exits_1_naming_the_field(
    spawn: Any, tmp_path: Path, manifest: Any, expected: str
) -> None:
    raw = manifest if isinstance(manifest, str) else json.dumps(manifest)
    # a valid pip entry first: nothing at all may run before validation fails
    if isinstance(manifest, dict):
        raw = json.dumps({"pip": [str(tmp_path / "never.whl")], **manifest})
    sidecar = spawn(
        Backend("double", tmp_path / "comfy"),
        MANIFEST_JSON=raw,
        PATH=f"/nonexistent:{os.environ['PATH']}",
    )
    assert sidecar.wait_exit(30) == 1
    lines = fatal_lines(sidecar)
    assert len(lines) == 1, sidecar.log()[-3000:]
    assert expected in lines[0], lines[0]
    assert "running:" not in sidecar.log()


def test_bad_manifest_file(spawn: Any, tmp_path: Path) -> None:
    path = tmp_path / "m.yml"
    path.write_text("models:\n  before_start:\n    - url: https://h/a.bin\n      local_path: [\n")
    sidecar = spawn(Backend("double", tmp_path / "comfy"), MANIFEST=str(path))
    assert sidecar.wait_exit(30) == 1
    assert "MANIFEST: not valid YAML" in fatal_lines(sidecar)[0]
    missing = spawn(Backend("double", tmp_path / "comfy2"), MANIFEST=str(tmp_path / "no.yaml"))
    assert missing.wait_exit(30) == 1
    assert "MANIFEST: cannot read" in fatal_lines(missing)[0]


def test_yaml_manifest_and_empty_fields(spawn: Any, tmp_path: Path, files: FileServer) -> None:
    files.files["x.safetensors"] = b"x" * 100
    path = tmp_path / "m.yaml"
    path.write_text(
        "# only models, no other key\nmodels:\n  before_start:\n"
        f"    - url: {files.url('/files/x.safetensors')}\n"
        f"      local_path: {tmp_path / 'comfy' / 'models' / 'loras' / 'x.safetensors'}\n"
    )
    sidecar = spawn(Backend("double", tmp_path / "comfy"), MANIFEST=str(path))
    sidecar.wait_ready()
    assert "x.safetensors" in sidecar.get("/models").json()["loras"]
    empty = spawn(Backend("double", tmp_path / "comfy2"), MANIFEST_JSON="{}", MANIFEST=str(path))
    empty.wait_ready()  # MANIFEST_JSON wins: nothing to install
    assert "nothing to install" in empty.log()


def test_failed_command_stops_startup(spawn: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.whl"
    sidecar = spawn(Backend("double", tmp_path / "comfy"), **manifest_env({"pip": [str(missing)]}))
    assert sidecar.wait_exit(60) == 1
    line = fatal_lines(sidecar)[0]
    assert "MANIFEST_JSON: pip: `" in line
    assert (
        f"-m pip install --no-input --disable-pip-version-check {missing}` exited with code 1"
        in line
    )
    assert "nope.whl" in line.split("exited with code 1:", 1)[1]  # the output's tail
    assert not (tmp_path / "comfy" / "custom_nodes").exists()


def test_failed_required_model_stops_startup(spawn: Any, tmp_path: Path, files: FileServer) -> None:
    manifest = {
        "models": {
            "before_start": [
                {"url": files.url("/files/gone.bin"), "local_path": "models/loras/g.bin"}
            ]
        }
    }
    sidecar = spawn(Backend("double", tmp_path / "comfy"), **manifest_env(manifest))
    assert sidecar.wait_exit(60) == 1
    line = fatal_lines(sidecar)[0]
    assert "MANIFEST_JSON: models.before_start[0]: " in line and "gone.bin" in line


def test_custom_node_existing_dir_without_git(spawn: Any, tmp_path: Path) -> None:
    repo = tmp_path / "repos" / "node_c"
    make_repo(repo, [{"a.py": "x = 1\n"}])
    backend = Backend("double", tmp_path / "comfy")
    (backend.comfy_home / "custom_nodes" / "node_c").mkdir(parents=True)
    sidecar = spawn(backend, **manifest_env({"custom_nodes": [f"file://{repo}/tree/v1"]}))
    assert sidecar.wait_exit(60) == 1
    assert "custom_nodes[0]: " in fatal_lines(sidecar)[0]
    assert "is not a git clone" in fatal_lines(sidecar)[0]
    optional = spawn(
        backend,
        **manifest_env({"custom_nodes": [{"url": f"file://{repo}/tree/v1", "optional": True}]}),
    )
    optional.wait_ready()


@pytest.mark.skipif(os.geteuid() != 0, reason="apt-get install needs root")
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="no apt-get on this system")
def test_apt_package(spawn: Any, tmp_path: Path) -> None:
    policy = subprocess.run(["apt-cache", "policy", "sl"], capture_output=True, text=True)
    if "Candidate: (none)" in policy.stdout or not policy.stdout:
        pytest.skip("Debian package sl is not available from the configured registry")
    subprocess.run(["dpkg", "-r", "sl"], capture_output=True)
    try:
        sidecar = spawn(
            Backend("double", tmp_path / "comfy"),
            **manifest_env({"apt": ["sl", {"name": "no-such-package-xyz", "optional": True}]}),
        )
        sidecar.wait_ready(timeout=300)
        status = subprocess.run(["dpkg", "-s", "sl"], capture_output=True, text=True)
        assert "Status: install ok installed" in status.stdout
        assert "running: apt-get update" in sidecar.log()
        assert "optional no-such-package-xyz not installed" in sidecar.log()
    finally:
        subprocess.run(["dpkg", "-r", "sl"], capture_output=True)
