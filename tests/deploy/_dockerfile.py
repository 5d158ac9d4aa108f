"""A small reader for the Dockerfiles under docker/: instructions per stage, ARG defaults and ENV.

Only what the deployment tests need: continuation lines are joined, comments dropped, and ENV
values are split like a shell would (``KEY="a b"`` -> ``a b``) with ``${ARG}`` references to ARG
defaults and earlier ENV values expanded.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # the rest of the (joined) line


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def instructions(path: Path) -> list[Instruction]:
    """Every instruction in ``path``, in order (comments and parser directives dropped)."""
    joined: list[str] = []
    buffer = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        buffer += line
        joined.append(buffer)
        buffer = ""
    if buffer:
        joined.append(buffer)
    out = []
    for line in joined:
        keyword, _, args = line.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    return out


def stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults declared before the first FROM, stages in order)."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in instructions(path):
        if ins.keyword == "FROM":
            parts = ins.args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            result.append(Stage(parts[0], name))
        elif not result:
            if ins.keyword == "ARG":
                key, _, default = ins.args.partition("=")
                global_args[key.strip()] = default.strip().strip('"')
        else:
            result[-1].instructions.append(ins)
    return global_args, result


def expand(value: str, scope: dict[str, str]) -> str:
    """Expand ``${NAME}``, ``${NAME:-default}`` and ``$NAME`` from ``scope`` (unknown -> empty)."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        default = match.group(2)
        found = scope.get(name, "")
        return found if found or default is None else default

    return _VAR.sub(sub, value)


def stage_env(stage: Stage, global_args: dict[str, str]) -> dict[str, str]:
    """The ENV a container of ``stage`` starts with (ARG defaults expanded), as a dict."""
    scope = dict(global_args)
    env: dict[str, str] = {}
    for ins in stage.instructions:
        if ins.keyword == "ARG":
            key, _, default = ins.args.partition("=")
            key = key.strip()
            scope[key] = default.strip().strip('"') if default else global_args.get(key, "")
        elif ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                key, sep, value = token.partition("=")
                if not sep:
                    raise ValueError(f"ENV without '=': {ins.args!r}")
                value = expand(value, {**scope, **env, "PATH": "/usr/bin:/bin"})
                env[key] = value
    return env
