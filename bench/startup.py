"""Start-up figures (issue 16 goals 1 and 4): ComfyUI listening -> ready, warmup end -> ready,
and a cold start with a two-model manifest, each next to its parts.

    COMFY_HOME=~/.cache/real-comfyui python bench/startup.py [--boots 3] [--cold 1]
        [--model-mib 256] [--rate-mb 100]
    python bench/startup.py --double     # the ComfyUI double instead of a real ComfyUI

Each boot is a fresh ``python -m comfy_sidecar`` (LOG_LEVEL=info, the default
STARTUP_CHECK_INTERVAL_S) in front of a real ComfyUI (COMFY_HOME, ``--cpu``) or the double. The
bench stamps exec with ``time.time()`` and polls ``/ready`` every 5 ms, recording the first 200
and every ``phase`` the body names. The sidecar's log lines carry its wall-clock time (ms); it
tags ComfyUI's own lines (``comfyui: [err] To see the GUI go to: ...``), so the moments read
from the log are: ``phase launching: starting ComfyUI`` (the sidecar execs ComfyUI), ComfyUI's
``To see the GUI go to:`` (it listens), ``warmup finished`` (the warmup prompt ended) and
``phase provisioning: installing`` (the manifest starts).

- (a) no warmup: listening -> first ``/ready`` 200 (goal <= 0.15 s), next to ComfyUI's own
  start time (sidecar execs it -> it prints that it listens);
- (b) with a warmup prompt (EmptyImage 256² -> ImageInvert -> SaveImage): ``warmup finished``
  -> ready (goal <= 0.05 s). Boots (a) and (b) alternate; medians of ``--boots``.
- (c) cold start: exec -> ready with MANIFEST_JSON naming two ``--model-mib`` models served by
  tests/storage/servers.FileServer (a separate process; sparse files; each connection capped at
  ``--rate-mb`` MB/s on its ``/ranged/`` route) plus the warmup, printed next to the sum of its
  parts: the sidecar's own start (exec -> ``phase provisioning``), provisioning (-> ``phase
  launching``), launch (the sidecar's ``ComfyUI answered after X s``: exec of ComfyUI -> it
  answers and the websocket is open) and warmup (``warmup finished in Y s``); the rest is the
  glue between them.

Printed, never asserted; ``/proc/loadavg`` is printed with each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import REAL_AVAILABLE, Backend, basic_prompt, make_sidecar  # noqa: E402

SERVER = """
import sys
from pathlib import Path
from tests.storage.servers import FileServer
server = FileServer()
for path in sys.argv[2:]:
    server.paths[Path(path).name] = Path(path)
server.throttle_bps = float(sys.argv[1])
print(server.port, flush=True)
server.thread.join()
"""

MARKS = {
    "exec_comfy": "phase launching: starting ComfyUI",
    "listening": "To see the GUI go to:",
    "answered": "ComfyUI answered after",
    "warming": "phase warming",
    "warm_end": "warmup finished",
    "provisioning": "phase provisioning: installing",
}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def log_times(log: str) -> dict[str, float]:
    """First wall-clock time (s since epoch) of each MARKS line in the sidecar's log, and the
    durations the sidecar reports itself: ``answered_s`` (launch -> ComfyUI answered and its
    websocket open) and ``warmup_s``."""
    found: dict[str, float] = {}
    for line in log.splitlines():
        for key, mark in MARKS.items():
            if key not in found and mark in line:
                stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
                found[key] = stamp.timestamp()
                if key in ("answered", "warm_end"):
                    took = line.split(" after " if key == "answered" else " in ", 1)[1]
                    found[f"{key}_s"] = float(took.split()[0])
    return found


def boot(kind: str, tmp: Path, warmup: bool, manifest: dict[str, Any] | None) -> dict[str, float]:
    """One boot; moments in seconds after exec (``ready``, and each MARKS key found)."""
    backend = Backend(kind, tmp / "comfy")
    env: dict[str, str] = {"LOG_LEVEL": "info", "MODEL_DIR": str(backend.base / "models")}
    if warmup:
        (tmp / "warmup.json").parent.mkdir(parents=True, exist_ok=True)
        (tmp / "warmup.json").write_text(json.dumps(basic_prompt(batch=1, size=256, prefix="w")))
        env["WARMUP_PROMPT_FILE"] = str(tmp / "warmup.json")
    if manifest is not None:
        env["MANIFEST_JSON"] = json.dumps(manifest)
    sidecar = make_sidecar(backend, tmp, **env)
    # The sidecar's own defaults for the start-up checks (the harness sets test values).
    del sidecar.env["STARTUP_CHECK_INTERVAL_S"]
    sidecar.env["STARTUP_CHECK_MAX_TRIES"] = "300"
    started = time.time()
    sidecar.start()
    moments: dict[str, float] = {}
    try:
        with httpx.Client(timeout=2) as http:
            while time.time() - started < 600:
                assert sidecar.proc is not None
                if sidecar.proc.poll() is not None:
                    raise SystemExit(f"sidecar exited:\n{sidecar.log()[-3000:]}")
                try:
                    response = http.get(sidecar.url + "/ready")
                except httpx.HTTPError:
                    time.sleep(0.005)
                    continue
                now = time.time() - started
                moments.setdefault("phase " + response.json().get("phase", "?"), now)
                if response.status_code == 200:
                    moments["ready"] = now
                    break
                time.sleep(0.005)
    finally:
        sidecar.stop()
    for key, value in log_times(sidecar.log()).items():
        moments[key] = value if key.endswith("_s") else value - started
    return moments


def start_server(rate_bps: float, paths: list[Path]) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(rate_bps), *map(str, paths)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def ms(value: float) -> str:
    return f"{value * 1000:7.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", action="store_true", help="the ComfyUI double")
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--cold", type=int, default=1, help="cold-start boots")
    parser.add_argument("--model-mib", type=int, default=256)
    parser.add_argument("--rate-mb", type=float, default=100.0)
    args = parser.parse_args()
    kind = "double" if args.double or not REAL_AVAILABLE else "real"
    root = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    plain, warm = [], []
    plain_load, warm_load = [], []
    for i in range(args.boots):  # (a) and (b) alternate
        plain.append(boot(kind, root / f"a{i}", warmup=False, manifest=None))
        plain_load.append(loadavg())
        warm.append(boot(kind, root / f"b{i}", warmup=True, manifest=None))
        warm_load.append(loadavg())
    models = []
    for name in ("bench_a.safetensors", "bench_b.safetensors"):
        path = root / "served" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            handle.truncate(args.model_mib << 20)
        models.append(path)
    server, port = start_server(args.rate_mb * 1e6, models)
    cold = []
    try:
        for i in range(args.cold):
            base = root / f"c{i}"
            manifest = {
                "models": {
                    "before_start": [
                        {
                            "url": f"http://127.0.0.1:{port}/ranged/{p.name}",
                            "local_path": str(base / "comfy" / "models" / "checkpoints" / p.name),
                        }
                        for p in models
                    ]
                }
            }
            cold.append((boot(kind, base, warmup=True, manifest=manifest), loadavg()))
    finally:
        server.terminate()
        server.wait()
        subprocess.run(["rm", "-rf", str(root)], check=False)

    def med(runs: list[dict[str, float]], a: str, b: str) -> float:
        return statistics.median(r[b] - r[a] for r in runs)

    print(f"backend: {kind} ComfyUI; {args.boots} boots each, (a) and (b) alternating")
    print("(a) no warmup:")
    print(
        "    ComfyUI's own start (sidecar execs it -> it listens): "
        + ", ".join(ms(r["listening"] - r["exec_comfy"]).strip() for r in plain)
        + f"; median {ms(med(plain, 'exec_comfy', 'listening')).strip()}"
    )
    print(
        "    listening -> /ready 200: "
        + ", ".join(ms(r["ready"] - r["listening"]).strip() for r in plain)
        + f"; median {ms(med(plain, 'listening', 'ready')).strip()}   (goal <= 150 ms)"
        + f"   load {', '.join(plain_load)}"
    )
    print("(b) with a warmup prompt:")
    print(
        "    listening -> warmup finished: "
        + ", ".join(ms(r["warm_end"] - r["listening"]).strip() for r in warm)
    )
    print(
        "    warmup finished -> /ready 200: "
        + ", ".join(ms(r["ready"] - r["warm_end"]).strip() for r in warm)
        + f"; median {ms(med(warm, 'warm_end', 'ready')).strip()}   (goal <= 50 ms)"
        + f"   load {', '.join(warm_load)}"
    )
    print(
        f"(c) cold start, manifest of 2 x {args.model_mib} MiB at {args.rate_mb:g} MB/s per "
        "connection, plus the warmup:"
    )
    for r, load in cold:
        parts = {
            "sidecar start (exec -> provisioning)": r["provisioning"],
            "provisioning (-> launching)": r["exec_comfy"] - r["provisioning"],
            "launch (sidecar's 'answered after')": r["answered_s"],
            "warmup (sidecar's 'warmup finished in')": r["warm_end_s"],
        }
        for name, value in parts.items():
            print(f"    {name:42} {ms(value)}")
        total = sum(parts.values())
        print(f"    {'sum of parts':42} {ms(total)}")
        print(f"    {'exec -> /ready 200':42} {ms(r['ready'])}   load {load}")
        print(f"    {'not in the parts (glue, ready poll)':42} {ms(r['ready'] - total)}")


if __name__ == "__main__":
    main()
