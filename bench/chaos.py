"""The chaos table (issue 13): every scenario of tests/chaos/scenarios.py, run N times, with
the fate of every job and the sidecar's memory and open fds before and after.

    python bench/chaos.py [--runs 3] [--only sigkill,sigstop]
    python bench/chaos.py --real [--runs 2]   # a real ComfyUI: COMFY_HOME, or
                                              # ~/.cache/real-comfyui when it holds main.py

Columns: jobs sent, completed, failed with the status the failure calls for, refused (429/503
at the door: by design only when draining or when no instance can come up), hung (no answer
within the bound), lost (reset, or an async job whose webhook was never tried), wrong (any
other status); RSS (MiB) and open fds of the sidecar process before the first run and after
the last (the last run's own sidecar for scenarios that start one per run); seconds. The goal
is 0 hung, 0 lost, 0 wrong and 0 refused except by design, with RSS and fds flat. Scenarios
that need the double's knobs are left out with --real. Printed, never asserted; the tests in
tests/chaos assert the behaviour.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_REAL = Path.home() / ".cache" / "real-comfyui"


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    parser.add_argument("--real", action="store_true", help="against a real ComfyUI")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    return parser.parse_args()


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def num(value: int | None) -> str:
    return "-" if value is None else str(value)


def main() -> int:
    args = parse()
    if args.real and not os.environ.get("COMFY_HOME") and (DEFAULT_REAL / "main.py").is_file():
        os.environ["COMFY_HOME"] = str(DEFAULT_REAL)  # before tests.conftest reads it
    from tests.chaos.scenarios import BY_NAME, SCENARIOS, Harness, Outcome
    from tests.conftest import REAL_AVAILABLE, REAL_REASON, Backend, Sidecar, make_sidecar

    if args.real and not REAL_AVAILABLE:
        print(f"--real: {REAL_REASON}", file=sys.stderr)
        return 2
    kind = "real" if args.real else "double"
    chosen = [BY_NAME[n] for n in args.only.split(",") if n] or SCENARIOS
    chosen = [s for s in chosen if s.real or kind == "double"]

    header = (
        f"{'scenario':32} {'runs':>4} {'sent':>4} {'done':>4} {'fail✓':>5} {'refus':>5} "
        f"{'hung':>4} {'lost':>4} {'wrong':>5} {'rss MiB':>9} {'fds':>7} {'s':>6}  result"
    )
    load = Path("/proc/loadavg").read_text()[:14]
    print(f"chaos: {kind} ComfyUI, --runs {args.runs}, load {load}")
    print(header)
    print("-" * len(header))
    failures = 0
    for scenario in chosen:
        tmp = Path(tempfile.mkdtemp(prefix=f"chaos-{scenario.name}-"))
        started: list[Sidecar] = []

        def spawn(backend: Backend, **env: str) -> Sidecar:
            sub = tmp / f"sc{len(started)}"  # noqa: B023 - used within this iteration only
            sub.mkdir()
            sidecar = make_sidecar(backend, sub, **env)
            started.append(sidecar.start())  # noqa: B023
            return sidecar

        try:
            out: Outcome = scenario(Harness(kind, tmp, spawn), args.runs)
            if out.skipped:
                result = f"skipped: {out.skipped}"
            elif out.problems or out.hung or out.lost or out.wrong:
                failures += 1
                result = "PROBLEMS: " + "; ".join(out.problems)[:400]
            else:
                result = "ok"
            if out.notes:
                result += f" ({'; '.join(out.notes)})"
        except Exception as exc:
            failures += 1
            out = Outcome(scenario.name, kind)
            result = f"ERROR: {type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc(file=sys.stderr)
        finally:
            for sidecar in started:
                sidecar.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        row: list[Any] = [
            out.runs,
            out.sent,
            out.completed,
            out.failed,
            out.refused,
            out.hung,
            out.lost,
            out.wrong,
        ]
        print(
            f"{out.scenario:32} {row[0]:>4} {row[1]:>4} {row[2]:>4} {row[3]:>5} {row[4]:>5} "
            f"{row[5]:>4} {row[6]:>4} {row[7]:>5} "
            f"{mib(out.rss_before) + '→' + mib(out.rss_after):>9} "
            f"{num(out.fds_before) + '→' + num(out.fds_after):>7} {out.seconds:>6.1f}  {result}",
            flush=True,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
