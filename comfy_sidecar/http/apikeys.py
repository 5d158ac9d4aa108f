"""API keys: which keys the sidecar accepts, checked in constant time. No web framework here
(``API_KEYS_FILE`` is checked while settings load, before Litestar is imported).

Keys come from ``API_KEYS`` (a comma list) and ``API_KEYS_FILE`` (one key a line; blank lines and
lines starting with ``#`` are ignored), the file re-read by :meth:`ApiKeys.reload` (on SIGHUP).
Only each key's SHA-256 digest is kept. :meth:`ApiKeys.check` hashes the presented key and
compares it with every configured digest through :func:`hmac.compare_digest`, without stopping at
a match, so the time taken shows neither which key matched nor (digests being 32 bytes) how
long the keys are. No key is ever logged: only counts are.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from comfy_sidecar.config.parsers import read_key_file

if TYPE_CHECKING:
    from comfy_sidecar.config import Settings

log = logging.getLogger("comfy_sidecar.auth")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The accepted keys: ``keys`` (from ``API_KEYS``) plus those in ``file`` when given.

    Raises ``OSError``/``ValueError`` as :func:`read_key_file` when ``file`` cannot be used.
    """

    def __init__(self, keys: Iterable[str] = (), file: str | None = None) -> None:
        self._static = [_digest(key) for key in keys]
        self.file = file
        self._from_file = [_digest(key) for key in read_key_file(file)] if file else []

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

    def check(self, presented: str) -> bool:
        """Whether ``presented`` is one of the keys, compared with every key in constant time."""
        digest = _digest(presented)
        found = False
        for known in (*self._static, *self._from_file):
            found |= hmac.compare_digest(digest, known)
        return found

    def reload(self) -> bool:
        """Re-read ``API_KEYS_FILE``; True when its keys replaced the old ones.

        A file that cannot be read or holds no key leaves the keys as they were (logged as an
        error); without ``API_KEYS_FILE`` nothing changes.
        """
        if self.file is None:
            log.info("SIGHUP: API_KEYS_FILE is not set; API keys unchanged")
            return False
        try:
            keys = read_key_file(self.file)
        except (OSError, ValueError) as exc:
            log.error("API_KEYS_FILE: %s; keeping the %d keys in use", exc, len(self))
            return False
        self._from_file = [_digest(key) for key in keys]
        log.info("API_KEYS_FILE re-read: %d keys from it, %d in all", len(keys), len(self))
        return True
