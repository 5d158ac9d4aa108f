"""Chaos scenarios (issue 13): a failure injected into a running sidecar, N times in a loop.

Each scenario is a function ``(harness, runs, budget_s) -> Outcome``. It starts its own
sidecar(s) through ``harness.spawn`` (the ComfyUI double, or a real ComfyUI with
``harness.kind == "real"``), sends jobs around the failure, and sorts every job's fate:

- ``completed``: answered 200 (202 for async jobs);
- ``failed``: answered with the status (and ``reason``) the failure calls for, e.g. 503
  ``comfyui_hung`` for the job a frozen ComfyUI was running;
- ``refused``: answered 429/503 at the door; only by design (a draining sidecar, a sidecar whose
  only instance cannot come up) — any other refusal is a problem;
- ``hung``: no answer within the scenario's bound (``Harness.bound_s``);
- ``lost``: the connection was reset or closed without an answer;
- ``wrong``: an answer of a status the scenario does not expect.

Besides the counts, an :class:`Outcome` keeps the sidecar's resident memory (``VmRSS``) and
open file descriptors (``/proc/<pid>/fd``) before the first run and after the last, and a list
of ``problems`` (a job that ended otherwise than expected, fds not back to the baseline, a
behaviour the issue asks for not seen). ``tests/chaos/test_chaos.py`` asserts that list is
empty and that nothing hung or was lost; ``bench/chaos.py`` prints the counts as a table.

Every scenario is bounded in count (``runs``) and in time (``budget_s``: no new run starts
after it; the outcome says how many ran).
"""

from __future__ import annotations

import functools
import os
import shlex
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Backend, Sidecar, basic_prompt, png_bytes, slow_prompt
from tests.receiver import Receiver
from tests.storage.servers import FileServer
from tests.tmpfs import TmpfsUnavailable, mount_tmpfs, unmount
from tests.waiting import wait_for

#: Open fds the sidecar may hold above its baseline once a scenario settled (keep-alive
#: connections of the test's own clients, a websocket being reopened).
FD_SLACK = 8

Result = httpx.Response | Exception
SpawnFn = Callable[..., Sidecar]


# --- bookkeeping -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one scenario did: counts of job fates, the sidecar's RSS (bytes) and open fds
    before and after, seconds taken, and the problems seen (empty: the scenario held)."""

    scenario: str
    kind: str
    runs: int = 0
    sent: int = 0
    completed: int = 0
    failed: int = 0
    refused: int = 0
    hung: int = 0
    lost: int = 0
    wrong: int = 0
    rss_before: int | None = None
    rss_after: int | None = None
    fds_before: int | None = None
    fds_after: int | None = None
    seconds: float = 0.0
    skipped: str | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rounds(self, runs: int, budget_s: float) -> Iterator[int]:
        """``range(runs)``, stopping early (with a note) once ``budget_s`` seconds passed."""
        started = time.monotonic()
        for i in range(runs):
            if i and time.monotonic() - started > budget_s:
                self.notes.append(f"time budget {budget_s:g} s: stopped after {i} of {runs} runs")
                return
            yield i
            self.runs += 1

    def count(self, results: list[tuple[str, Result]]) -> None:
        """Sort each ``(expectation, result)``; expectations: ``complete``, ``refuse``
        (by design; 200 is fine too) and ``fail:<status>:<reason>`` (reason may be empty)."""
        for expect, result in results:
            self.sent += 1
            fate = classify(result, expect)
            setattr(self, fate, getattr(self, fate) + 1)
            wanted = {"complete": "completed", "refuse": "refused"}.get(expect, "failed")
            if fate != wanted and not (expect == "refuse" and fate == "completed"):
                self.problems.append(f"expected {expect}, got {fate}: {describe(result)}")

    def problem(self, what: str) -> None:
        self.problems.append(what)


def classify(result: Result, expect: str) -> str:
    """The fate of one job: completed, failed, refused, hung, lost or wrong."""
    if isinstance(result, httpx.TimeoutException):
        return "hung"
    if isinstance(result, Exception):
        return "lost"
    status = result.status_code
    if status in (200, 202):
        return "completed"
    if expect.startswith("fail:"):
        _, want_status, want_reason = expect.split(":", 2)
        if status == int(want_status) and (not want_reason or reason_of(result) == want_reason):
            return "failed"
    if status in (429, 503):
        return "refused"
    return "wrong"


def reason_of(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("reason") if isinstance(body, dict) else None


def describe(result: Result) -> str:
    if isinstance(result, Exception):
        return f"{type(result).__name__}: {result}"
    return f"{result.status_code} {result.text[:300]}"


def usage(pid: int) -> tuple[int, int] | None:
    """(VmRSS in bytes, open fds) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None


def sidecar_pid(sidecar: Sidecar) -> int:
    assert sidecar.proc is not None
    return sidecar.proc.pid


def baseline(out: Outcome, sidecar: Sidecar, bound_s: float) -> None:
    """Run one small job (so lazily made things exist), then note RSS and fds."""
    response = post_job(sidecar, {"prompt": basic_prompt(batch=1, prefix="base")}, bound_s)
    if not isinstance(response, httpx.Response) or response.status_code != 200:
        raise AssertionError(f"the baseline job failed: {describe(response)}")
    seen = usage(sidecar_pid(sidecar))
    if seen is not None:
        out.rss_before, out.fds_before = seen


def settle(out: Outcome, sidecar: Sidecar, timeout: float = 30) -> None:
    """Note RSS and fds after the runs; a problem unless fds come back to within FD_SLACK of
    the baseline within ``timeout`` s (a leak would not)."""
    pid = sidecar_pid(sidecar)
    if out.fds_before is None or usage(pid) is None:
        return
    limit = out.fds_before + FD_SLACK
    try:
        wait_for(
            lambda: (usage(pid) or (0, 0))[1] <= limit,
            timeout=timeout,
            interval=0.1,
            what=f"open fds back to <= {limit}",
        )
    except AssertionError as exc:
        out.problem(str(exc))
    seen = usage(pid)
    if seen is not None:
        out.rss_after, out.fds_after = seen


def post_job(sidecar: Sidecar, body: dict[str, Any], bound_s: float) -> Result:
    """POST /prompt with its own connection; the response, or the httpx error (a timeout
    after ``bound_s`` s means no answer: hung)."""
    try:
        return httpx.post(sidecar.url + "/prompt", json=body, timeout=bound_s)
    except httpx.HTTPError as exc:
        return exc


class Flight:
    """Jobs POSTed from threads (``workers`` at a time); :meth:`results` waits for them."""

    def __init__(self, sidecar: Sidecar, bound_s: float, workers: int = 16) -> None:
        self.sidecar = sidecar
        self.bound_s = bound_s
        self.pool = ThreadPoolExecutor(workers)
        self.jobs: list[tuple[str, Future[tuple[Result, float]]]] = []

    def send(self, prompt: dict[str, Any], expect: str, **fields: Any) -> Future[Any]:
        def run() -> tuple[Result, float]:
            result = post_job(self.sidecar, {"prompt": prompt, **fields}, self.bound_s)
            return result, time.monotonic()

        future = self.pool.submit(run)
        self.jobs.append((expect, future))
        return future

    def results(self) -> list[tuple[str, Result]]:
        """``(expectation, result)`` of every job, once all answered (or timed out)."""
        return [(expect, future.result()[0]) for expect, future in self.timed()]

    def timed(self) -> list[tuple[str, Future[tuple[Result, float]]]]:
        for _, future in self.jobs:
            future.result()
        self.pool.shutdown()
        return self.jobs


def children(sidecar: Sidecar) -> list[int]:
    """Pids of the sidecar's child processes now (ComfyUI)."""
    try:
        pid = sidecar_pid(sidecar)
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def comfy(sidecar: Sidecar, path: str, body: Any = None) -> Any:
    """POST to the double's test-only controls (``/__double__/...``)."""
    return httpx.post(f"http://127.0.0.1:{sidecar.comfy_port}{path}", json=body, timeout=10).json()


# --- the harness -----------------------------------------------------------------------------


@dataclass
class Harness:
    """Starts sidecars for the scenarios: ``spawn_sidecar(backend, **env) -> Sidecar`` (the
    ``spawn`` fixture in tests; bench/chaos.py's own) in front of ``kind`` ComfyUIs under
    ``tmp``. ``bound_s``: seconds a job may take before it counts as hung; ``ready_s``:
    seconds a (re)start may take."""

    kind: str
    tmp: Path
    spawn_sidecar: SpawnFn
    made: int = 0

    @property
    def real(self) -> bool:
        return self.kind == "real"

    @property
    def bound_s(self) -> float:
        return 600 if self.real else 120

    @property
    def ready_s(self) -> float:
        return 240 if self.real else 60

    def spawn(self, cmd: Callable[[Backend], str] | None = None, **env: str) -> Sidecar:
        backend = Backend(self.kind, self.tmp / f"comfy{self.made}")
        self.made += 1
        if cmd is not None:
            env["CMD"] = cmd(backend)
        return self.spawn_sidecar(backend, **env)


# --- the scenarios ---------------------------------------------------------------------------


def send_started(flight: Flight, prompt: dict[str, Any], expect: str, bound_s: float) -> None:
    """Send ``prompt`` and wait until the sidecar has seen ComfyUI start it (its job is
    ``in_progress``: the ``execution_start`` frame arrived). ComfyUI's ``/queue`` shows it
    running a moment earlier; a child killed in between takes a job the sidecar rightly
    counts as not started, and runs again elsewhere."""
    job_id = str(uuid.uuid4())
    flight.send(prompt, expect, id=job_id)
    wait_for(
        lambda: flight.sidecar.get(f"/jobs/{job_id}").json().get("status") == "in_progress",
        timeout=bound_s,
        interval=0.02,
        what="the sidecar to see ComfyUI start the job",
    )


def sigkill_mid_job(h: Harness, runs: int, budget_s: float) -> Outcome:
    """ComfyUI SIGKILLed mid-job: that job fails 503 ``comfyui_exited`` at once, jobs arriving
    during the restart wait in the sidecar's queue and complete."""
    out = Outcome("sigkill mid-job", h.kind)
    sidecar = h.spawn(ALWAYS_RESTART_COMFYUI="true", RESTART_MAX=str(runs + 5))
    sidecar.wait_ready(h.ready_s)
    baseline(out, sidecar, h.bound_s)
    for _ in out.rounds(runs, budget_s):
        flight = Flight(sidecar, h.bound_s)
        send_started(flight, slow_prompt(8), "fail:503:comfyui_exited", h.ready_s)
        os.kill(sidecar.child_pid(), signal.SIGKILL)
        for i in range(2):
            flight.send(basic_prompt(batch=1, prefix=f"after{i}"), "complete")
        out.count(flight.results())
        sidecar.wait_ready(h.ready_s)
    settle(out, sidecar)
    return out


def sigstop_mid_job(h: Harness, runs: int, budget_s: float) -> Outcome:
    """ComfyUI frozen (SIGSTOP) mid-job: after COMFYUI_HANG_TIMEOUT_S /ready turns 503, the
    running job fails 503 ``comfyui_hung``, the frozen process group is SIGKILLed and
    restarted, and the jobs behind it complete."""
    hang_s = 2.0
    out = Outcome("sigstop mid-job (hang)", h.kind)
    sidecar = h.spawn(
        ALWAYS_RESTART_COMFYUI="true",
        RESTART_MAX=str(runs + 5),
        COMFYUI_HANG_TIMEOUT_S=str(hang_s),
        PROMPT_TIMEOUT_S="600",
    )
    sidecar.wait_ready(h.ready_s)
    baseline(out, sidecar, h.bound_s)
    for _ in out.rounds(runs, budget_s):
        flight = Flight(sidecar, h.bound_s)
        send_started(flight, slow_prompt(12), "fail:503:comfyui_hung", h.ready_s)
        child = sidecar.child_pid()
        os.kill(child, signal.SIGSTOP)
        for i in range(2):
            flight.send(basic_prompt(batch=1, prefix=f"behind{i}"), "complete")
        try:
            wait_for(
                lambda: sidecar.get("/ready", timeout=5).status_code == 503,
                timeout=hang_s + 30,
                interval=0.05,
                what="/ready to turn 503 for the hung ComfyUI",
            )
        except AssertionError as exc:
            out.problem(str(exc))
        out.count(flight.results())
        if not pid_gone(child):
            wait_for(
                functools.partial(pid_gone, child), timeout=30, what="the frozen child to be killed"
            )
        sidecar.wait_ready(h.ready_s)
    settle(out, sidecar)
    return out


def websocket_cut(h: Harness, runs: int, budget_s: float) -> Outcome:
    """The websocket to ComfyUI is cut with 2 jobs in flight and 3 arriving while it is held
    down (the double refuses new sockets until they arrived): all 5 complete, none refused
    (double only: it cuts its own sockets)."""
    out = Outcome("websocket cut", h.kind)
    sidecar = h.spawn(COMFYUI_QUIET_RECONCILE_S="0.4")
    sidecar.wait_ready(h.ready_s)
    baseline(out, sidecar, h.bound_s)
    for _ in out.rounds(runs, budget_s):
        flight = Flight(sidecar, h.bound_s)
        for _ in range(2):
            flight.send(slow_prompt(2), "complete")
        sidecar.wait_comfy_running(h.ready_s)
        comfy(sidecar, "/__double__/refuse_websockets", {"refused": True})
        if comfy(sidecar, "/__double__/drop_websockets")["dropped"] < 1:
            out.problem("the double had no websocket to drop")
        wait_for(
            lambda: not sidecar.get("/health").json()["instances"][0]["connected"],
            timeout=h.bound_s,
            what="the sidecar to see its websocket down",
        )
        for i in range(3):
            flight.send(basic_prompt(batch=1, prefix=f"arr{i}"), "complete")
        wait_for(
            lambda: sidecar.get("/health").json()["queue"]["waiting"] >= 1,
            timeout=h.bound_s,
            what="the arriving jobs to wait in the sidecar's queue",
        )
        comfy(sidecar, "/__double__/refuse_websockets", {"refused": False})
        out.count(flight.results())
    settle(out, sidecar)
    return out


def _exited(job: Future[Any], sidecar: Sidecar, before: list[int]) -> bool:
    """Whether ``job`` answered or the sidecar's child changed since ``before``."""
    return job.done() or children(sidecar) != before


def exit_code_zero(h: Harness, runs: int, budget_s: float) -> Outcome:
    """ComfyUI exits with code 0 mid-job (the double's DoubleExit node): that job fails 503
    ``comfyui_exited``, ComfyUI is restarted, jobs arriving meanwhile complete."""
    out = Outcome("comfyui exit 0", h.kind)
    sidecar = h.spawn(ALWAYS_RESTART_COMFYUI="true", RESTART_MAX=str(runs + 5))
    sidecar.wait_ready(h.ready_s)
    baseline(out, sidecar, h.bound_s)
    exit_prompt = {"1": {"class_type": "DoubleExit", "inputs": {"code": 0}}}
    for _ in out.rounds(runs, budget_s):
        before = children(sidecar)
        flight = Flight(sidecar, h.bound_s)
        exiting = flight.send(exit_prompt, "fail:503:comfyui_exited")
        wait_for(
            functools.partial(_exited, exiting, sidecar, before),
            timeout=h.ready_s,
            interval=0.02,
            what="ComfyUI to exit",
        )
        for i in range(2):
            flight.send(basic_prompt(batch=1, prefix=f"arr{i}"), "complete")
        out.count(flight.results())
        sidecar.wait_ready(h.ready_s)
    if sidecar.log().count("exited with code 0") < out.runs:
        out.problem("the sidecar's log does not show each exit with code 0")
    settle(out, sidecar)
    return out


def _crash_cmd(condition: str) -> Callable[[Backend], str]:
    """A CMD that exits 3 at start while the shell ``condition`` holds, else runs the
    backend's ComfyUI (``{port}`` templated)."""

    def cmd(backend: Backend) -> str:
        script = (
            f"if {condition}; then echo 'crashing at start' >&2; exit 3; fi; "
            f"exec {backend.cmd('{port}')}"  # type: ignore[arg-type]  # the template
        )
        return f"sh -c {shlex.quote(script)}"

    return cmd


def crash_loop_one_of_two(h: Harness, runs: int, budget_s: float) -> Outcome:
    """Two instances; instance 1 dies at start every time. Jobs sent while it loops complete
    on instance 0, it gives up after RESTART_MAX, and the sidecar stays up and ready."""
    out = Outcome("crash loop (1 of 2 instances)", h.kind)
    for _ in out.rounds(runs, budget_s):
        sidecar = h.spawn(
            _crash_cmd("[ {instance} = 1 ]"),
            COMFYUI_INSTANCES="2",
            ALWAYS_RESTART_COMFYUI="true",
            RESTART_MAX="3",
        )
        sidecar.wait_ready(h.ready_s)
        baseline(out, sidecar, h.bound_s)
        flight = Flight(sidecar, h.bound_s)
        for i in range(4):
            flight.send(basic_prompt(batch=1, prefix=f"loop{i}"), "complete")
        out.count(flight.results())

        wait_for(
            functools.partial(_instance_in, sidecar, 1, "failed"),
            timeout=h.ready_s,
            interval=0.1,
            what="instance 1 to give up",
        )
        if "giving up" not in sidecar.log():
            out.problem("the crash loop was not reported ('giving up')")
        for path in ("/health", "/ready"):
            status = sidecar.get(path, timeout=10).status_code
            if status != 200:
                out.problem(f"{path} answered {status} after instance 1 gave up")
        flight = Flight(sidecar, h.bound_s)
        for i in range(4):
            flight.send(basic_prompt(batch=1, prefix=f"after{i}"), "complete")
        out.count(flight.results())
        assert sidecar.proc is not None
        if sidecar.proc.poll() is not None:
            out.problem(f"the sidecar exited ({sidecar.proc.returncode})")
        settle(out, sidecar)
        sidecar.stop()
    return out


def _instance_in(sidecar: Sidecar, index: int, phase: str) -> bool:
    """Whether instance ``index`` is in ``phase``, by ``/ready``'s body."""
    instances: list[dict[str, Any]] = sidecar.get("/ready", timeout=5).json()["instances"]
    return bool(instances[index]["phase"] == phase)


def crash_loop_only_instance(h: Harness, runs: int, budget_s: float) -> Outcome:
    """The only ComfyUI comes up, then dies at every start. Jobs arriving during the loop wait;
    when RESTART_MAX is spent they get a clear 503 (no hang, no reset), later jobs are refused
    503, and the sidecar exits 1 (by design: the orchestrator replaces the container)."""
    out = Outcome("crash loop (only instance)", h.kind)
    for run in out.rounds(runs, budget_s):
        marker = h.tmp / f"crash{run}"
        sidecar = h.spawn(
            _crash_cmd(f"[ -e {shlex.quote(str(marker))} ]"),
            ALWAYS_RESTART_COMFYUI="true",
            RESTART_MAX="2",
        )
        sidecar.wait_ready(h.ready_s)
        baseline(out, sidecar, h.bound_s)
        marker.touch()
        os.kill(sidecar.child_pid(), signal.SIGKILL)
        flight = Flight(sidecar, h.bound_s)
        for i in range(3):
            flight.send(basic_prompt(batch=1, prefix=f"loop{i}"), "refuse")
        out.count(flight.results())
        try:
            code = sidecar.wait_exit(60)
        except subprocess.TimeoutExpired:
            out.problem("the sidecar did not exit after the crash loop")
        else:
            if code != 1:
                out.problem(f"the sidecar exited {code}, not 1")
        if "giving up" not in sidecar.log():
            out.problem("the crash loop was not reported ('giving up')")
        sidecar.stop()
    return out


def _comfy_holds(sidecar: Sidecar, count: int) -> bool:
    """Whether ComfyUI's ``/queue`` holds ``count`` jobs (running and pending)."""
    return sum(len(v) for v in sidecar.comfy_queue().values()) == count


def sigterm_with_jobs(h: Harness, runs: int, budget_s: float) -> Outcome:
    """SIGTERM to the sidecar with 4 jobs running and 4 arriving: the running ones complete
    within SHUTDOWN_GRACE_S, the arriving ones get 503 — never a hang or a reset — and the
    sidecar exits 0."""
    grace_s = 120.0 if h.real else 30.0
    out = Outcome("sigterm, 4 running + 4 arriving", h.kind)
    for _ in out.rounds(runs, budget_s):
        sidecar = h.spawn(MAX_JOBS_PER_INSTANCE="4", SHUTDOWN_GRACE_S=str(grace_s))
        sidecar.wait_ready(h.ready_s)
        baseline(out, sidecar, h.bound_s)
        flight = Flight(sidecar, h.bound_s)
        for _ in range(4):
            flight.send(slow_prompt(1), "complete")
        wait_for(
            functools.partial(_comfy_holds, sidecar, 4),
            timeout=h.ready_s,
            interval=0.02,
            what="4 jobs in ComfyUI",
        )
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        sidecar.wait_status("/ready", 503, 30)
        for i in range(4):
            flight.send(basic_prompt(batch=1, prefix=f"late{i}"), "refuse")
        timed = flight.timed()
        out.count([(expect, future.result()[0]) for expect, future in timed])
        for _, future in timed[:4]:
            took = future.result()[1] - signalled
            if took > grace_s:
                out.problem(f"a running job ended {took:.1f} s after SIGTERM (> {grace_s:g})")
        try:
            code = sidecar.wait_exit(grace_s + 30)
        except subprocess.TimeoutExpired:
            out.problem("the sidecar did not exit after SIGTERM")
        else:
            if code != 0:
                out.problem(f"the sidecar exited {code} after SIGTERM")
        sidecar.stop()
    return out


def disk_full_cache(h: Harness, runs: int, budget_s: float) -> Outcome:
    """CACHE_DIR on a 1 MiB tmpfs; an input URL of 3 MiB fills it. That job answers 507, no
    partial entry stays in the cache, and the next jobs (a small URL input, a plain prompt)
    complete: the sidecar keeps serving."""
    out = Outcome("disk-full cache (tmpfs)", h.kind)
    cache = h.tmp / "cachefs"
    try:
        mount_tmpfs(cache, 1024 * 1024)
    except TmpfsUnavailable as exc:
        out.skipped = str(exc)
        return out
    files = FileServer()
    try:
        files.files["big.png"] = os.urandom(3 * 1024 * 1024)
        sidecar = h.spawn(CACHE_DIR=str(cache))
        sidecar.wait_ready(h.ready_s)
        baseline(out, sidecar, h.bound_s)
        for run in out.rounds(runs, budget_s):
            files.files[f"small{run}.png"] = png_bytes((8 + run, 8))
            entries = set(os.listdir(cache))
            free = os.statvfs(cache).f_bfree
            big = post_job(sidecar, {"prompt": _load_url(files.url("/files/big.png"))}, h.bound_s)
            out.count([("fail:507:", big)])
            if isinstance(big, httpx.Response) and str(h.tmp) in big.text:
                out.problem("the disk-full answer names a server path")
            left = set(os.listdir(cache)) - entries
            if left:
                out.problem(f"the failed download left {sorted(left)} in the cache")
            if os.statvfs(cache).f_bfree < free - 8:
                out.problem("the failed download left blocks in use in the cache")
            small = _load_url(files.url(f"/files/small{run}.png"))
            out.count([("complete", post_job(sidecar, {"prompt": small}, h.bound_s))])
            plain = basic_prompt(batch=1, prefix=f"after{run}")
            out.count([("complete", post_job(sidecar, {"prompt": plain}, h.bound_s))])
        settle(out, sidecar)
        sidecar.stop()
    finally:
        files.stop()
        unmount(cache)
    return out


def _load_url(url: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": url}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "url"}},
    }


class ResetServer:
    """Accepts connections, reads the request, and resets the connection (RST, no answer)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                except OSError:
                    pass
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with self.lock:
                self.connections += 1

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()


def bad_webhook_receivers(h: Harness, runs: int, budget_s: float) -> Outcome:
    """Async jobs whose webhook receiver hangs, resets the connection, or answers 500: each
    job is accepted (202), its webhook tried exactly PROMPT_WEBHOOK_RETRIES times and then
    given up; meanwhile the sidecar stays healthy and serves, and its fds come back."""
    attempts = 2
    out = Outcome("webhook hangs / resets / 500", h.kind)
    hanging = Receiver(hang=True)
    failing = Receiver(default_status=500)
    resetting = ResetServer()
    try:
        sidecar = h.spawn(PROMPT_WEBHOOK_RETRIES=str(attempts), WEBHOOK_TIMEOUT_S="1")
        sidecar.wait_ready(h.ready_s)
        baseline(out, sidecar, h.bound_s)
        for run in out.rounds(runs, budget_s):
            flight = Flight(sidecar, h.bound_s)
            for name, url in (
                ("hang", hanging.url),
                ("reset", resetting.url),
                ("500", failing.url),
            ):
                prompt = basic_prompt(batch=1, prefix=f"hook{name}")
                flight.send(prompt, "complete", webhook_v2=url, id=f"hook-{name}-{run}")
            out.count(flight.results())
            served = post_job(sidecar, {"prompt": basic_prompt(batch=1)}, 30)
            if not isinstance(served, httpx.Response) or served.status_code != 200:
                out.problem(f"a sync job during the webhook retries: {describe(served)}")
        jobs = out.runs * 3
        try:
            wait_for(
                lambda: sidecar.log().count(f"after {attempts} attempts") >= jobs,
                timeout=60,
                interval=0.1,
                what=f"{jobs} webhooks given up",
            )
        except AssertionError as exc:
            out.problem(str(exc))
        tried = {
            "hang": len(hanging.snapshot()),
            "500": len(failing.snapshot()),
            "reset": resetting.connections,
        }
        for name, count in tried.items():
            if count != attempts * out.runs:
                out.problem(f"receiver {name} got {count} attempts, not {attempts * out.runs}")
        never = sum(max(0, out.runs - count) for count in tried.values())
        out.lost += never  # an accepted job whose webhook was never tried
        for path in ("/health", "/ready"):
            status = sidecar.get(path, timeout=10).status_code
            if status != 200:
                out.problem(f"{path} answered {status}")
        settle(out, sidecar)
        sidecar.stop()
    finally:
        hanging.stop()
        failing.stop()
        resetting.stop()
    return out


def recycle_under_load(h: Harness, runs: int, budget_s: float) -> Outcome:
    """RECYCLE_AFTER_JOBS=2 and 8 jobs at 4 at a time: all complete, none refused, while the
    child is replaced every couple of jobs."""
    out = Outcome("recycle under load", h.kind)
    sidecar = h.spawn(RECYCLE_AFTER_JOBS="2")
    sidecar.wait_ready(h.ready_s)
    baseline(out, sidecar, h.bound_s)
    recycled = sidecar.log().count("recycled ComfyUI")
    for run in out.rounds(runs, budget_s):
        flight = Flight(sidecar, h.bound_s, workers=4)
        for i in range(8):
            flight.send(basic_prompt(batch=1, prefix=f"r{run}x{i}"), "complete")
        out.count(flight.results())
    sidecar.wait_ready(h.ready_s)
    recycles = sidecar.log().count("recycled ComfyUI") - recycled
    out.notes.append(f"{recycles} recycles")
    if recycles < 2 * out.runs - 1:
        out.problem(f"only {recycles} recycles for {8 * out.runs} jobs with RECYCLE_AFTER_JOBS=2")
    settle(out, sidecar)
    return out


@dataclass(frozen=True)
class Scenario:
    """A named scenario; ``real``: it has a real-ComfyUI variant (the others need the
    double's knobs); ``budget_s``: its time bound per backend kind."""

    name: str
    run: Callable[[Harness, int, float], Outcome]
    real: bool
    budget_s: float = 180.0

    def __call__(self, h: Harness, runs: int) -> Outcome:
        started = time.monotonic()
        budget = self.budget_s * (4 if h.real else 1)
        out = self.run(h, runs, budget)
        out.seconds = time.monotonic() - started
        return out


SCENARIOS = [
    Scenario("sigkill", sigkill_mid_job, real=True),
    Scenario("sigstop", sigstop_mid_job, real=True),
    Scenario("websocket_cut", websocket_cut, real=False),
    Scenario("exit_zero", exit_code_zero, real=False),
    Scenario("crash_loop_one_of_two", crash_loop_one_of_two, real=True),
    Scenario("crash_loop_only_instance", crash_loop_only_instance, real=True),
    Scenario("sigterm", sigterm_with_jobs, real=True),
    Scenario("disk_full", disk_full_cache, real=True),
    Scenario("webhooks", bad_webhook_receivers, real=True),
    Scenario("recycle", recycle_under_load, real=True),
]

BY_NAME = {s.name: s for s in SCENARIOS}

__all__ = ["BY_NAME", "SCENARIOS", "Harness", "Outcome", "Scenario"]
