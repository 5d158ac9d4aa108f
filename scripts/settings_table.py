#!/usr/bin/env python3
"""Rewrite the README's table of environment variables from the ``Settings`` declaration.

    scripts/settings_table.py            # rewrite README.md in place
    scripts/settings_table.py --check    # exit 1 when README.md differs (nothing written)
    scripts/settings_table.py PATH ...   # another Markdown file with the same markers

The table sits between ``<!-- settings-table:start -->`` and ``<!-- settings-table:end -->``;
its rows come from :func:`comfy_sidecar.config.markdown_table`.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from comfy_sidecar.config import markdown_table  # noqa: E402

START = "<!-- settings-table:start -->\n"
END = "<!-- settings-table:end -->\n"


def with_table(text: str) -> str:
    """``text`` with everything between the markers replaced by the generated table.

    ``ValueError`` when the markers are missing or out of order.
    """
    start = text.find(START)
    end = text.find(END, start + len(START))
    if start < 0 or end < 0:
        raise ValueError(f"markers {START.strip()} ... {END.strip()} not found")
    return text[: start + len(START)] + markdown_table() + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift (exit 1)")
    parser.add_argument("path", nargs="?", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    text = args.path.read_text(encoding="utf-8")
    fresh = with_table(text)
    if fresh == text:
        return 0
    if args.check:
        print(f"{args.path}: settings table is out of date; run {sys.argv[0]}", file=sys.stderr)
        return 1
    args.path.write_text(fresh, encoding="utf-8")
    print(f"{args.path}: settings table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
