"""Entry point: `comfy-sidecar` / `python -m comfy_sidecar`.

Order matters for the probes: settings are parsed and the listening socket is bound within a few
milliseconds of exec, a tiny responder answers `/health` and `/ready` (503, phase `starting`) while
the web framework is imported, and then the real server takes the same socket over.
"""

from __future__ import annotations

import sys

from comfy_sidecar import __version__

USAGE = """\
usage: comfy-sidecar [--help] [--version]

Supervises ComfyUI (started from CMD) and serves a comfyui-api compatible HTTP API on HOST:PORT.
All configuration comes from environment variables; see README.md ("Configuration").

Environment variables:
"""


def _help() -> str:
    from comfy_sidecar.config import VARS

    width = max(len(var.name) for var in VARS)
    rows = []
    for var in VARS:
        default = "(not set)" if var.default is None else repr(var.default)
        rows.append(f"  {var.name:<{width}}  default {default}\n  {'':<{width}}  {var.doc}")
    return USAGE + "\n".join(rows) + "\n"


#: glibc's ``mallopt`` parameter (<malloc.h>) and the size from which blocks get a mapping.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1024 * 1024


def _give_back_large_blocks() -> None:
    """glibc: blocks of 1 MiB and more get their own mapping, returned to the system when
    freed. By default glibc raises that threshold (up to 32 MiB) whenever such a block is
    freed and keeps later ones in the heap, where the worker threads' arenas never give them
    back: four concurrent 4096x4096 conversions (Pillow's 16 MiB image blocks) left the
    sidecar 80 MB larger for good; with a fixed threshold, 7 MB (bench/rss_bench.py). Setting
    it turns that adjustment off, as ``MALLOC_MMAP_THRESHOLD_`` would. Nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a C library without mallopt
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def skip_unused_imports() -> None:
    """Make two optional imports of libraries fail at once, as they do where the module is
    missing (the frozen binary), by putting None in ``sys.modules``:

    - httpx imports its command-line client when click, rich and pygments are installed
      (Litestar brings them): 4 MB of the sidecar's memory for a tool it never runs
      (bench/rss_bench.py); httpx takes the fallback it has for a missing CLI;
    - Litestar probes for its OpenTelemetry plugin when an app is made, importing
      ``opentelemetry`` and its HTTP conventions (2 ms) whenever the API package is
      installed (a dependency of the sidecar's own tracing, which does not use the plugin);
      with tracing off the sidecar imports nothing of OpenTelemetry
      (:mod:`comfy_sidecar.observability.tracing`).
    """
    if "httpx" not in sys.modules:
        sys.modules["httpx._main"] = None  # type: ignore[assignment]
    if "litestar.app" not in sys.modules:
        sys.modules["litestar.plugins.opentelemetry"] = None  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    """Run the sidecar until it is stopped; returns the process exit status.

    0 after a clean SIGTERM/SIGINT drain, 1 when ComfyUI cannot be kept running (crash loop,
    start-up deadline, failed warmup, or exit without ALWAYS_RESTART_COMFYUI), 2 for bad
    configuration (one line on stderr naming the variable).
    """
    args = sys.argv[1:] if argv is None else argv
    if "--version" in args or "-V" in args:
        print(f"comfy-sidecar {__version__}")
        return 0
    if "--help" in args or "-h" in args:
        print(_help(), end="")
        return 0
    if args:
        print(f"comfy-sidecar: unknown argument {args[0]!r} (see --help)", file=sys.stderr)
        return 2

    _give_back_large_blocks()
    skip_unused_imports()

    from comfy_sidecar.boot import BootProbes, bind_socket
    from comfy_sidecar.config import ConfigError, load_settings

    try:
        settings = load_settings()
        sock = bind_socket(settings.host, settings.port)
    except ConfigError as exc:
        print(f"comfy-sidecar: {exc}", file=sys.stderr)
        return 2
    boot = BootProbes(sock, __version__)
    boot.start()

    from comfy_sidecar.runtime.lifecycle import run

    return run(settings, sock, boot)


if __name__ == "__main__":
    sys.exit(main())
