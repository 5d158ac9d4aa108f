"""Run the sidecar (unfrozen) with some packages or modules made unimportable.

    python tests/deploy/_blocked_run.py pkg1,pkg2,...

Emulates a frozen binary built with those packages excluded (build.spec's EXCLUDES): any import
of them raises ModuleNotFoundError, exactly as it would inside the binary. Each blocked attempt
is appended to the file named by BLOCKED_LOG (if set), one ``name`` per line, so a test can tell
imports that were tried and tolerated from ones that broke something.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType


class Missing(importlib.abc.Loader):
    """Loads nothing: importing the module raises ModuleNotFoundError, as in the binary."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        raise ModuleNotFoundError(f"No module named {spec.name!r} (excluded)", name=spec.name)

    def exec_module(self, module: ModuleType) -> None:  # never reached
        raise ModuleNotFoundError(module.__name__)


class Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, roots: set[str], log: str | None) -> None:
        self.roots = roots
        self.log = log

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if any(fullname == name or fullname.startswith(name + ".") for name in self.roots):
            if self.log:
                with open(self.log, "a", encoding="utf-8") as fh:
                    fh.write(fullname + "\n")
            # A spec whose loader fails: ``import x`` raises ModuleNotFoundError as in the binary,
            # while ``importlib.util.find_spec`` probes (yarl's for pydantic_core) do not raise.
            return importlib.machinery.ModuleSpec(fullname, Missing())
        return None


def main() -> int:
    roots = {name for name in sys.argv[1].split(",") if name}
    already = sorted(name for name in roots if name in sys.modules)  # before the sidecar runs
    if already:
        print(f"already imported before blocking: {already}", file=sys.stderr)
        return 3
    sys.meta_path.insert(0, Blocker(roots, os.environ.get("BLOCKED_LOG")))
    sys.argv = ["comfy-sidecar"]
    from comfy_sidecar.__main__ import main as sidecar_main

    return sidecar_main()


if __name__ == "__main__":
    sys.exit(main())
