"""Shared test harness: sidecars in front of a ComfyUI, in the test process or as processes.

The ComfyUI is the double in ``tests/comfy_double.py`` (always), or a real ComfyUI when the
``COMFY_HOME`` environment variable points at a ComfyUI checkout with its own ``.venv``
(``main.py`` and ``.venv/bin/python``); without it the ``real`` parametrisations are skipped
with that reason. Either way it is the instance's child process, started from ``CMD``.

Which sidecar a test gets:

- ``shared_sidecar`` (one per module and backend), ``running_sidecar(kind, tmp, **env)``,
  ``spawn(backend, **env)`` and ``make_sidecar(backend, tmp, **env)`` give a sidecar that runs
  in this process (tests/inprocess.py ``InProcessSidecar``: the sidecar's own ``serve()`` in a
  thread, on a real loopback port, its own log file). It answers over HTTP like the process
  does, so a test of the API reads the same either way; it costs no interpreter start.
- A test that needs the process itself — a signal (SIGTERM drain, SIGHUP, SIGKILL), exit
  codes, ``proc``, the time from exec, or what is process-wide (HTTP(S)_PROXY and HF_ENDPOINT
  from the environment, the Prometheus counters) — is marked ``@pytest.mark.sidecar_process``
  (or its module ``pytestmark = pytest.mark.sidecar_process``) and gets ``python -m
  comfy_sidecar`` processes; ``process=True`` asks for one explicitly. A module-scoped sidecar
  is made when the module's first test starts: mark the module, not one test.
- Below HTTP, ``tests.inprocess.running_container(sidecar_env(backend, tmp, **env)[0])``
  builds and runs the container in the test's own event loop (see
  tests/core/test_layers_inprocess.py).

The suite runs under pytest-xdist (scripts/test.sh): :func:`free_port` gives each worker its
own ports; session servers (moto, Azurite, redis-server) are per worker.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.receiver import Receiver
from tests.tiny_model import NAME as TINY_MODEL_NAME
from tests.tiny_model import write_tiny_upscale_model
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = ROOT / "tests" / "comfy_double.py"
REAL_HOME = os.environ.get("COMFY_HOME", "")
REAL_AVAILABLE = bool(REAL_HOME) and (Path(REAL_HOME) / "main.py").is_file()
REAL_REASON = (
    "COMFY_HOME is not set to a real ComfyUI checkout with its own .venv; "
    "real-ComfyUI scenarios skipped"
)


#: Ports :func:`free_port` hands out: below Linux's ephemeral range (32768+), so outgoing
#: connections cannot take one before the server under test binds it; each pytest-xdist
#: worker (``PYTEST_XDIST_WORKER`` gwN of ``PYTEST_XDIST_WORKER_COUNT``) gets its own slice,
#: so two workers never pick the same port.
PORTS = range(20000, 32000)


def _worker_ports() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count <= 1:
        return PORTS
    index = int(worker[2:]) % count
    size = len(PORTS) // count
    return range(PORTS.start + index * size, PORTS.start + (index + 1) * size)


def free_port() -> int:
    """A port that is free now, from this worker's slice of :data:`PORTS`."""
    ports = _worker_ports()
    while True:
        port = random.randrange(ports.start, ports.stop)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


@dataclass
class Backend:
    """Where ComfyUI comes from for one sidecar: ``double`` or ``real``."""

    kind: str
    base: Path

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def comfy_home(self) -> Path:
        return Path(REAL_HOME) if self.kind == "real" else self.base

    def cmd(self, port: int, extra: str = "") -> str:
        if self.kind == "double":
            return (
                f"{sys.executable} {DOUBLE} --listen 127.0.0.1 --port {port} "
                f"--base-directory {self.base} {extra}"
            )
        home = Path(REAL_HOME)
        return (
            f"{home / '.venv/bin/python'} {home / 'main.py'} --cpu --listen 127.0.0.1 "
            f"--port {port} --disable-auto-launch --input-directory {self.input_dir} "
            f"--output-directory {self.output_dir} --temp-directory {self.base / 'temp'} "
            f"--extra-model-paths-config {self.base / 'extra_model_paths.yaml'} {extra}"
        )

    def prepare(self) -> None:
        for sub in ("input", "output", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        # The generated test model in this backend's own model folder; a real ComfyUI reads it
        # through --extra-model-paths-config, so its COMFY_HOME needs no copy.
        write_tiny_upscale_model(self.base / "models" / "upscale_models" / TINY_MODEL_NAME)
        if self.kind == "real":
            (self.base / "extra_model_paths.yaml").write_text(
                f"tests:\n  base_path: {self.base / 'models'}\n  upscale_models: upscale_models\n"
            )


@dataclass
class Sidecar:
    """A running ``python -m comfy_sidecar``; ``url`` is its base URL."""

    backend: Backend
    env: dict[str, str]
    port: int
    comfy_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=120))
    #: Files a test linked into a real ComfyUI's model folders, removed by running_sidecar.
    staged_models: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(
        self, binary: Path | None = None, python: str | None = None, module: str = "comfy_sidecar"
    ) -> Sidecar:
        """Start ``python -m <module>`` (this interpreter, or ``python``; ``module`` is
        ``comfy_sidecar``), or the frozen
        ``binary``."""
        log = self.log_path.open("ab")
        argv = [str(binary)] if binary else [python or sys.executable, "-m", module]
        self.proc = subprocess.Popen(
            argv,
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def server_dirs(self) -> list[str]:
        """The server directories no answer or webhook may name (COMFY_HOME, INPUT_DIR,
        OUTPUT_DIR, TEMP_DIR, CACHE_DIR), as configured and as real paths."""
        names = ("COMFY_HOME", "INPUT_DIR", "OUTPUT_DIR", "TEMP_DIR", "CACHE_DIR")
        dirs = {os.path.abspath(self.env[n]) for n in names}
        return sorted(dirs | {os.path.realpath(d) for d in dirs})

    def assert_names_no_server_dir(self, text: str) -> None:
        """Fail when ``text`` (an answer's or webhook's body) holds a server directory."""
        for directory in self.server_dirs():
            assert directory not in text, f"{directory} in {text}"

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(self.url + path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.post(self.url + path, **kw)

    def wait_status(self, path: str, code: int, timeout: float) -> httpx.Response:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"sidecar exited {self.proc.returncode}:\n{self.log()[-4000:]}"
                )
            try:
                last = self.client.get(self.url + path, timeout=5)
                if last.status_code == code:
                    return last
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"{path} never answered {code} (last: {last}):\n{self.log()[-4000:]}")

    def comfy_queue(self) -> dict[str, list[Any]]:
        """ComfyUI's ``GET /queue`` (``queue_running``, ``queue_pending``), double or real."""
        queue: dict[str, list[Any]] = httpx.get(
            f"http://127.0.0.1:{self.comfy_port}/queue", timeout=5
        ).json()
        return queue

    def comfy_running(self) -> bool:
        """Whether ComfyUI is running a prompt now."""
        return bool(self.comfy_queue()["queue_running"])

    def wait_comfy_running(self, timeout: float = 30) -> None:
        """Wait until ComfyUI runs a prompt (one this test posted from another thread)."""
        wait_for(self.comfy_running, timeout=timeout, interval=0.05, what="ComfyUI to run a prompt")

    def wait_ready(self, timeout: float | None = None) -> None:
        self.wait_status("/ready", 200, timeout or (120 if self.backend.kind == "real" else 30))

    def child_pid(self) -> int:
        """The pid of ComfyUI (the sidecar's child process)."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        pids = [int(p) for p in children.split()]
        assert pids, "the sidecar has no child process"
        return pids[0]

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()


#: Whether the test being set up asked for subprocess sidecars (its ``sidecar_process``
#: marker, on it or its module), read by :func:`make_sidecar`; set before its fixtures are.
#: Outside pytest (bench/, which measures the process) sidecars are processes.
_PROCESS_SIDECARS = True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    global _PROCESS_SIDECARS
    _PROCESS_SIDECARS = item.get_closest_marker("sidecar_process") is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Test files with subprocess sidecars first, each file's tests in their order: they are
    the longest (signals, leases, restarts), and pytest-xdist hands files out in this order,
    so none is left running alone at the end."""
    slow = {item.path for item in items if item.get_closest_marker("sidecar_process")}
    items.sort(key=lambda item: item.path not in slow)


def make_sidecar(
    backend: Backend, tmp: Path, *, process: bool | None = None, **env_overrides: str
) -> Sidecar:
    """A configured (not started) sidecar in front of ``backend``: in this process
    (tests/inprocess.py), or as ``python -m comfy_sidecar`` when ``process`` is true or, with
    ``process`` None, when the test is marked ``sidecar_process`` (it signals, kills, freezes or
    times the sidecar's process, or reads what is process-wide: proxies and the Hugging Face
    endpoint from the environment, the Prometheus counters) or no test runs (bench/)."""
    env, port, comfy_port = sidecar_env(backend, tmp, **env_overrides)
    if _PROCESS_SIDECARS if process is None else process:
        return Sidecar(backend, env, port, comfy_port, tmp / "sidecar.log")
    from tests.inprocess import InProcessSidecar

    return InProcessSidecar(backend, env, port, comfy_port, tmp / "sidecar.log")


def sidecar_env(
    backend: Backend, tmp: Path, **env_overrides: str
) -> tuple[dict[str, str], int, int]:
    """``(env, port, comfy_port)`` of a sidecar in front of ``backend`` (prepared here) on free
    ports, its caches under ``tmp``, ``env_overrides`` over the test defaults."""
    backend.prepare()
    port, comfy_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SALAD_", "SYSTEM_"))}
    env.pop("COMFY_HOME", None)
    env.update(
        {
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "COMFYUI_PORT_HOST": str(comfy_port),
            "COMFY_HOME": str(backend.comfy_home),
            "INPUT_DIR": str(backend.input_dir),
            "OUTPUT_DIR": str(backend.output_dir),
            "TEMP_DIR": str(backend.base / "temp"),
            "CMD": backend.cmd(comfy_port),
            "STARTUP_CHECK_INTERVAL_S": "0.25",
            "STARTUP_CHECK_MAX_TRIES": "480" if backend.kind == "real" else "120",
            "CACHE_DIR": str(tmp / "cache"),
            "ASSET_DIR": str(tmp / "assets"),
            "LOG_LEVEL": "debug",
            "SHUTDOWN_GRACE_S": "30",
            # The test servers run on loopback: allowed explicitly (the SSRF guard's own
            # tests, tests/core/test_netguard.py, override this to prove the refusals).
            "ALLOWED_URL_HOSTS": "127.0.0.0/8,::1,localhost",
        }
    )
    env.update(env_overrides)
    if "CMD_EXTRA" in env:
        env["CMD"] = backend.cmd(comfy_port, env.pop("CMD_EXTRA"))
    return env, port, comfy_port


BACKENDS = [
    pytest.param("double", id="double"),
    pytest.param(
        "real",
        id="real",
        marks=[
            pytest.mark.real_comfyui,
            pytest.mark.skipif(not REAL_AVAILABLE, reason=REAL_REASON),
        ],
    ),
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated tiny x2 upscale model (tests/tiny_model.py), written once per session."""
    return write_tiny_upscale_model(tmp_path_factory.mktemp("models") / TINY_MODEL_NAME)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh ComfyUI backend directory per test."""
    return Backend(request.param, tmp_path / "comfy")


@contextlib.contextmanager
def running_sidecar(
    kind: str, tmp: Path, *, process: bool | None = None, **env: str
) -> Iterator[Sidecar]:
    """A ready sidecar in front of the ``kind`` backend (``double`` or ``real``), stopped at
    the end (``process``: a subprocess, see :func:`make_sidecar`); model links it put in a real
    ComfyUI (``staged_models``) are removed."""
    sidecar = make_sidecar(Backend(kind, tmp / "comfy"), tmp, process=process, **env)
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar
    finally:
        sidecar.stop()
        for path in sidecar.staged_models:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module", params=BACKENDS)
def shared_sidecar(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sidecar]:
    """One ready sidecar per backend, shared by a test module."""
    with running_sidecar(
        request.param, tmp_path_factory.mktemp(f"sidecar-{request.param}")
    ) as sidecar:
        yield sidecar


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """``spawn(backend, module="comfy_sidecar", process=None, **env) -> Sidecar`` started: in
    this process, or as ``python -m module`` (see :func:`make_sidecar`; another ``module`` is
    always a process); every one is stopped at teardown."""
    started: list[Sidecar] = []

    def _spawn(
        backend: Backend, module: str = "comfy_sidecar", process: bool | None = None, **env: str
    ) -> Sidecar:
        sub = tmp_path / f"sc{len(started)}"
        sub.mkdir()
        sidecar = make_sidecar(
            backend, sub, process=True if module != "comfy_sidecar" else process, **env
        )
        started.append(sidecar.start(module=module))
        return sidecar

    yield _spawn
    for sidecar in started:
        sidecar.stop()


# --- prompts used across tests -------------------------------------------------------------


def basic_prompt(batch: int = 2, size: int = 64, prefix: str = "rec") -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": batch, "color": 10866024},
        },
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


def upscale_prompt(size: int = 256) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": 5061658},
        },
        "2": {
            "class_type": "UpscaleModelLoader",
            "inputs": {"model_name": TINY_MODEL_NAME},
        },
        "3": {
            "class_type": "ImageUpscaleWithModel",
            "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]},
        },
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}},
    }


def slow_prompt(blurs: int = 6, size: int = 2048) -> dict[str, Any]:
    """EmptyImage -> ImageBlur x blurs -> SaveImage: seconds per blur node, on both backends.
    The colour is random so ComfyUI's node cache never serves it."""
    color = random.randrange(1 << 24)
    prompt: dict[str, Any] = {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": size, "height": size, "batch_size": 1, "color": color},
        }
    }
    for i in range(2, blurs + 2):
        prompt[str(i)] = {
            "class_type": "ImageBlur",
            "inputs": {"image": [str(i - 1), 0], "blur_radius": 31, "sigma": 5.0},
        }
    prompt[str(blurs + 2)] = {
        "class_type": "SaveImage",
        "inputs": {"images": [str(blurs + 1), 0], "filename_prefix": "slow"},
    }
    return prompt


def decode_image(b64: str) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64)))


def png_bytes(
    size: tuple[int, int] = (16, 12), color: tuple[int, int, int] = (200, 30, 10), comment: str = ""
) -> bytes:
    """A PNG of one colour; ``comment`` goes into a tEXt chunk (``"a" * n`` makes its base64 a
    long run without ``/``, as one long file name)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if comment:
        info.add_text("comment", comment)
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    """Factory: ``receiver(statuses=..., delay_s=..., hang=...)`` -> a started Receiver."""
    made: list[Receiver] = []

    def make(**kwargs: Any) -> Receiver:
        r = Receiver(**kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``small_tmpfs(size_bytes, where=None) -> Path``: a fresh tmpfs of that size (a real full
    disk for ENOSPC) at ``where`` (default: a new folder under ``tmp_path``), unmounted at
    teardown. Skips, saying why, where ``mount`` is not allowed (not root, no CAP_SYS_ADMIN).
    Request it before ``spawn``, so sidecars stop before it is unmounted."""
    from tests.tmpfs import TmpfsUnavailable, mount_tmpfs, unmount

    mounted: list[Path] = []

    def mount(size_bytes: int, where: Path | None = None) -> Path:
        try:
            mounted.append(mount_tmpfs(where or tmp_path / f"tmpfs{len(mounted)}", size_bytes))
        except TmpfsUnavailable as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc}")
        return mounted[-1]

    yield mount
    for where in reversed(mounted):
        unmount(where)


def fill_up(directory: Path, leave_bytes: int = 0) -> Path:
    """Fill ``directory``'s file system with one file until ENOSPC, then give back
    ``leave_bytes`` (a multiple of the page size leaves exactly that much room)."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            os.write(fd, chunk)  # short writes at the end, then ENOSPC
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave_bytes))
    return filler
