"""API keys: which keys the sidecar accepts and who each one is, checked in constant time. No web
framework here (``API_KEYS_FILE`` is checked while settings load, before Litestar is imported).

Keys come from ``API_KEYS`` (a comma list; names ``env-1``, ``env-2``, ...) and
``API_KEYS_FILE`` (the plain list or YAML with names and quotas:
:mod:`comfy_sidecar.config.keys`), the file re-read by :meth:`ApiKeys.reload` (on SIGHUP).
Only each key's SHA-256 digest is kept, beside its
:class:`~comfy_sidecar.config.keys.KeyPolicy`. :meth:`ApiKeys.identify` hashes the presented key
and compares it with every configured digest through :func:`hmac.compare_digest`, without
stopping at a match, so the time taken shows neither which key matched nor (digests being 32
bytes) how long the keys are. No key is ever logged: only counts and names are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from comfy_sidecar.config.keys import KeyPolicy, check_names, env_keys, read_key_file
from comfy_sidecar.observability import metrics

if TYPE_CHECKING:
    from comfy_sidecar.config import Settings

log = logging.getLogger("comfy_sidecar.auth")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The accepted keys: ``keys`` (from ``API_KEYS``) plus those in ``file`` when given.

    Raises ``OSError``/``ValueError`` as :func:`read_key_file` when ``file`` cannot be used,
    and ``ValueError`` when one name comes with two different policies.
    """

    def __init__(self, keys: Iterable[str] = (), file: str | None = None) -> None:
        static = env_keys(list(keys))
        self._static = [(_digest(key), policy) for key, policy in static]
        self.file = file
        from_file = read_key_file(file) if file else []
        check_names([*static, *from_file])
        self._from_file = [(_digest(key), policy) for key, policy in from_file]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        """The keys of ``API_KEYS`` and ``API_KEYS_FILE``."""
        return cls(settings.api_keys, settings.api_keys_file)

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (the API is open otherwise)."""
        return bool(self._static or self._from_file)

    def __len__(self) -> int:
        return len(self._static) + len(self._from_file)

    @property
    def names(self) -> list[str]:
        """Every key's name, once each, in order (the metrics' ``key`` label values)."""
        return list(dict.fromkeys(policy.name for _, policy in (*self._static, *self._from_file)))

    def identify(self, presented: str) -> KeyPolicy | None:
        """The policy of the key ``presented`` is, or None; compared with every key in constant
        time (no early exit)."""
        digest = _digest(presented)
        found: KeyPolicy | None = None
        for known, policy in (*self._static, *self._from_file):
            if hmac.compare_digest(digest, known) and found is None:
                found = policy
        return found

    def check(self, presented: str) -> bool:
        """Whether ``presented`` is one of the keys (:meth:`identify`)."""
        return self.identify(presented) is not None

    def reload(self) -> bool:
        """Re-read ``API_KEYS_FILE``; True when its keys replaced the old ones.

        A file that cannot be read, holds no key or a bad value leaves the keys as they were
        (logged as an error); without ``API_KEYS_FILE`` nothing changes.
        """
        if self.file is None:
            log.info("SIGHUP: API_KEYS_FILE is not set; API keys unchanged")
            return False
        try:
            entries = read_key_file(self.file)
            check_names([*(("", policy) for _, policy in self._static), *entries])
        except (OSError, ValueError) as exc:
            log.error("API_KEYS_FILE: %s; keeping the %d keys in use", exc, len(self))
            return False
        self._from_file = [(_digest(key), policy) for key, policy in entries]
        metrics.keys_known(self.names)
        log.info("API_KEYS_FILE re-read: %d keys from it, %d in all", len(entries), len(self))
        return True
