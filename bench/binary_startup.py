"""Start-up figures for the frozen binary: size, exec -> first /health answer, idle RSS, SIGTERM.

    python bench/binary_startup.py [--binary dist/comfy-sidecar] [--double | --cmd "<command>"]
                                   [--runs 5] [--idle 3]

Prints numbers; asserts nothing. ``--double`` runs the ComfyUI double (tests/comfy_double.py) as
ComfyUI with docker/warmup/cpu-warmup.json as the warmup prompt, so ``/health`` turns 200;
``--cmd`` passes any command as the sidecar's ``CMD`` (default: a process that never answers, so
only the boot probes and the idle sidecar are measured). ``--binary`` may also be
``"python -m comfy_sidecar"`` to compare with the unfrozen sidecar.

Figures printed per run:
- ``first_answer_s``: exec -> first HTTP response of any status on ``/health`` (probes must never
  see a refused connection; issue 7 goal <= 1.5 s);
- ``health_200_s``: exec -> first 200 on ``/health`` (only with a working ``--cmd``);
- ``rss_mb``: resident memory after ``--idle`` seconds, for the onefile bootloader (parent) and the
  sidecar (its Python child); ComfyUI's processes are not counted;
- ``stop_s`` and ``exit``: SIGTERM -> exit, and the exit status.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(port: int) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(
    binary: str, cmd: str | None, idle_s: float, timeout_s: float
) -> dict[str, float | None]:
    port, comfy_port = _free_port(), _free_port()
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ)
        env.update(
            {
                "PORT": str(port),
                "HOST": "127.0.0.1",
                "HOME": home,
                "COMFY_HOME": home,
                "INPUT_DIR": os.path.join(home, "input"),
                "OUTPUT_DIR": os.path.join(home, "output"),
                "COMFYUI_PORT_HOST": str(comfy_port),
                "STARTUP_CHECK_INTERVAL_S": "0.1",
                "STARTUP_CHECK_MAX_TRIES": "300",
                "LOG_LEVEL": "warn",
            }
        )
        if cmd is None:  # the ComfyUI double, with the CPU image's warmup prompt
            double = os.path.join(ROOT, "tests", "comfy_double.py")
            env["CMD"] = (
                f"{shlex.quote(sys.executable)} {shlex.quote(double)} --listen 127.0.0.1 "
                f"--port {comfy_port} --base-directory {shlex.quote(home)}"
            )
            env["WARMUP_PROMPT_FILE"] = os.path.join(ROOT, "docker", "warmup", "cpu-warmup.json")
        else:
            env["CMD"] = cmd
        start = time.perf_counter()
        proc = subprocess.Popen(
            shlex.split(binary), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        first: float | None = None
        ok: float | None = None
        deadline = start + timeout_s
        while time.perf_counter() < deadline and proc.poll() is None:
            status = _status(port)
            now = time.perf_counter() - start
            if status is not None and first is None:
                first = now
            if status == 200:
                ok = now
                break
            if first is not None and cmd == NEVER_ANSWERS:
                break
            time.sleep(0.005)
        time.sleep(idle_s)
        parent = _rss_kib(proc.pid)
        # Frozen: the onefile bootloader (proc) runs the sidecar as its only child and ComfyUI is
        # a grandchild. Unfrozen: proc is the sidecar and its child is ComfyUI.
        kids = _children(proc.pid)
        frozen = not binary.startswith(("python", sys.executable))
        if frozen:
            sidecar = _rss_kib(kids[0]) if kids else 0
        else:
            sidecar, parent = parent, 0
        stop_start = time.perf_counter()
        exit_code: int | None = None
        stop: float | None = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = proc.wait(timeout=60)
                stop = time.perf_counter() - stop_start
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        else:
            exit_code = proc.returncode
        return {
            "first_answer_s": first,
            "health_200_s": ok,
            "rss_parent_mb": parent / 1024,
            "rss_sidecar_mb": sidecar / 1024,
            "stop_s": stop,
            "exit": exit_code,
        }


NEVER_ANSWERS = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(3600)'"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--binary", default="dist/comfy-sidecar")
    ap.add_argument("--cmd", default=NEVER_ANSWERS)
    ap.add_argument("--double", action="store_true", help="run the ComfyUI double as ComfyUI")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args()

    first = shlex.split(args.binary)[0]
    if os.path.isfile(first):
        size = os.path.getsize(first)
        print(f"binary {first}: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB)")
    cmd = None if args.double else args.cmd
    results = [run_once(args.binary, cmd, args.idle, args.timeout) for _ in range(args.runs)]
    for i, r in enumerate(results, 1):
        print(f"run {i}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in r.items()))
    firsts = [r["first_answer_s"] for r in results if r["first_answer_s"] is not None]
    if firsts:
        print(
            f"first /health answer: median {statistics.median(firsts):.3f} s, "
            f"max {max(firsts):.3f} s over {len(firsts)} runs"
        )
    oks = [r["health_200_s"] for r in results if r["health_200_s"] is not None]
    if oks:
        print(f"first /health 200: median {statistics.median(oks):.3f} s")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


if __name__ == "__main__":
    main()
