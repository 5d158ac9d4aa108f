"""API keys and what each one may do: its name and its quotas (``API_KEYS``, ``API_KEYS_FILE``).

``API_KEYS_FILE`` takes two forms:

- the plain list: one key a line, blank lines and ``#`` comments ignored (as before);
- YAML: a top-level ``keys:`` list (or the list alone) of mappings, one per key::

      keys:
        - key: 6f1c...            # required: the secret
          name: team-a            # required: the key's name (metrics label, job owner)
          max_concurrent_jobs: 4  # its jobs admitted and not ended, at most
          jobs_per_minute: 60     # admissions in any 60 s, at most
          max_queue: 8            # its jobs waiting to run, at most
          priority: 10            # higher runs first (default 0)

The file is YAML when its first line that is neither blank nor a ``#`` comment starts with
``keys:`` or ``- ``; any other file is the plain list. A key of the plain list, or of
``API_KEYS``, has no quota and the name ``file-<n>`` / ``env-<n>`` (its position: a name that
moves when lines are removed; name keys in YAML when the name matters).

Every value is checked when the file is read: a bad one raises ``ValueError`` naming the entry
(``keys[2].jobs_per_minute: must be a whole number >= 1``), which start-up turns into the
one-line ``API_KEYS_FILE: ...`` error (exit 2) and a SIGHUP reload into a logged error that
keeps the keys in use. No message ever holds a key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from comfy_sidecar.config.parsers import parse_keys

__all__ = [
    "ANONYMOUS",
    "NAME_PATTERN",
    "KeyPolicy",
    "check_names",
    "env_keys",
    "parse_key_file",
    "read_key_file",
]

#: What a key's name may be: it labels metrics and owns jobs, so it is short and plain.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: The metrics label of jobs submitted without a key (no key configured; the warmup).
ANONYMOUS = "anonymous"
#: The quota fields of an entry (whole numbers >= 1; absent: no limit).
LIMITS = ("max_concurrent_jobs", "jobs_per_minute", "max_queue")
#: Every field an entry may have.
FIELDS = frozenset({"key", "name", "priority", *LIMITS})


class KeyPolicy(msgspec.Struct, kw_only=True, frozen=True):
    """What one API key may do: ``name`` (its metrics label and the owner of its jobs; never
    the key itself), ``max_concurrent_jobs`` (its jobs admitted and not yet ended),
    ``jobs_per_minute`` (admissions in any 60 s), ``max_queue`` (its jobs admitted and not
    yet running) — None: no limit — and ``priority`` (higher: its jobs leave the sidecar's
    queue and the shared Redis queue before those of lower ones; FIFO within one)."""

    name: str
    max_concurrent_jobs: int | None = None
    jobs_per_minute: int | None = None
    max_queue: int | None = None
    priority: int = 0

    @property
    def limited(self) -> bool:
        """True when any quota is set."""
        return (
            self.max_concurrent_jobs is not None
            or self.jobs_per_minute is not None
            or self.max_queue is not None
        )


def env_keys(keys: Sequence[str]) -> list[tuple[str, KeyPolicy]]:
    """``API_KEYS``' keys with their names ``env-1``, ``env-2``, ... and no quota."""
    return [(key, KeyPolicy(name=f"env-{n}")) for n, key in enumerate(keys, 1)]


def _is_yaml(text: str) -> bool:
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        return stripped.startswith(("keys:", "- ")) or stripped == "-"
    return False


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: must be a whole number >= 1")
    return value


def _entry(raw: Any, where: str) -> tuple[str, KeyPolicy]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a mapping with `key` and `name`")
    unknown = sorted(str(field) for field in raw if field not in FIELDS)
    if unknown:
        known = ", ".join(sorted(FIELDS))
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (known: {known})")
    key = raw.get("key")
    if not isinstance(key, str) or not key.strip() or key != key.strip():
        raise ValueError(f"{where}.key: must be a non-empty string without surrounding blanks")
    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{where}.name: must be 1-64 letters, digits, `_`, `.` or `-`, starting with a "
            "letter or digit"
        )
    if name == ANONYMOUS:
        raise ValueError(f"{where}.name: {ANONYMOUS!r} is reserved (jobs submitted without a key)")
    priority = raw.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -1000 <= priority <= 1000:
        raise ValueError(f"{where}.priority: must be a whole number from -1000 to 1000")
    limits = {field: _count(raw.get(field), f"{where}.{field}") for field in LIMITS}
    return key, KeyPolicy(name=name, priority=priority, **limits)


def _yaml_entries(text: str) -> list[tuple[str, KeyPolicy]]:
    import yaml

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"not valid YAML{where}") from None
    entries = document.get("keys") if isinstance(document, dict) else document
    if isinstance(document, dict) and set(document) != {"keys"}:
        raise ValueError("a YAML key file holds one field, `keys` (a list)")
    if not isinstance(entries, list):
        raise ValueError("`keys` must be a list of {key, name, ...} mappings")
    return [_entry(raw, f"keys[{index}]") for index, raw in enumerate(entries)]


def check_names(entries: Iterable[tuple[str, KeyPolicy]]) -> None:
    """Raise ``ValueError`` when one name comes with two different policies (two keys may share
    a name, e.g. while one replaces the other, when their quotas and priority agree)."""
    policies: dict[str, KeyPolicy] = {}
    for _, policy in entries:
        known = policies.setdefault(policy.name, policy)
        if known != policy:
            raise ValueError(
                f"name {policy.name!r} is given twice with different quotas or priority"
            )


def parse_key_file(text: str) -> list[tuple[str, KeyPolicy]]:
    """The ``(key, policy)`` pairs of a key file's ``text`` (see the module docstring): in
    YAML a key listed twice is refused; in the plain list it counts once. Raises
    ``ValueError`` naming the entry at fault."""
    if not _is_yaml(text):
        unique = list(dict.fromkeys(parse_keys(text)))
        return [(key, KeyPolicy(name=f"file-{n}")) for n, key in enumerate(unique, 1)]
    entries = _yaml_entries(text)
    seen: set[str] = set()
    for index, (key, _) in enumerate(entries):
        if key in seen:
            raise ValueError(f"keys[{index}].key: the same key is listed twice")
        seen.add(key)
    check_names(entries)
    return entries


def read_key_file(path: str) -> list[tuple[str, KeyPolicy]]:
    """The ``(key, policy)`` pairs in the file at ``path`` (:func:`parse_key_file`).

    Raises ``OSError`` when it cannot be read and ``ValueError`` when a value is bad or it holds
    no key (an empty file would otherwise open the API).
    """
    with open(path, encoding="utf-8") as handle:
        entries = parse_key_file(handle.read())
    if not entries:
        raise ValueError(f"{path!r} holds no keys")
    return entries
