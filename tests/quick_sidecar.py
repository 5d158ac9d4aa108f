"""``python -m tests.quick_sidecar``: the sidecar as ``python -m comfy_sidecar`` runs it, but with
a short quiet-socket interval (``QUIET_RECONCILE_S`` seconds instead of 10), so tests of the
quiet-socket reconciliation finish in about a second. Start it with
``spawn(backend, module="tests.quick_sidecar")``."""

from __future__ import annotations

import sys
from typing import Any

from comfy_sidecar import service
from comfy_sidecar.__main__ import main

QUIET_RECONCILE_S = 0.4


class QuickSidecar(service.Sidecar):
    def __init__(self, settings: Any) -> None:
        super().__init__(settings, quiet_reconcile_s=QUIET_RECONCILE_S)


if __name__ == "__main__":
    service.Sidecar = QuickSidecar  # type: ignore[misc]  # the one Sidecar that serve() builds
    sys.exit(main())
