"""Host and URL globs: comfyui-api's credential ``url_pattern`` (:class:`Glob`, matched in
linear time) and host globs (``ALLOWED_URL_HOSTS``, ``HTTP_AUTH_HEADER_HOSTS``,
:func:`host_matches`)."""

from __future__ import annotations

import functools
import re

from comfy_sidecar.storage.errors import BadRequestError

#: Longest ``credentials[].url_pattern`` accepted, in characters.
MAX_GLOB_LENGTH = 2048
#: Most wildcards (``*``, ``**``, ``?``) in one ``url_pattern``.
MAX_GLOB_WILDCARDS = 32

# Glob tokens: a literal character, or one of these.
_ANY_ONE, _STAR, _GLOBSTAR = "?", "*", "**"


class Glob:
    """comfyui-api's credential glob over a whole URL: ``**`` any run of characters, ``*`` any
    run without ``/``, ``?`` one character, everything else literal.

    comfyui-api translates it to a backtracking regex (``"**"*8 + "Z"`` against 67 characters
    took 16.8 s); :meth:`match` simulates the glob as a set of positions instead, so a match
    costs at most len(url) x len(pattern) steps whatever the pattern. Build one per pattern
    (:func:`compile_glob` caches them). Raises :class:`BadRequestError` for a pattern longer
    than :data:`MAX_GLOB_LENGTH` or with more than :data:`MAX_GLOB_WILDCARDS` wildcards.
    """

    def __init__(self, pattern: str) -> None:
        problem = glob_problem(pattern)
        if problem is not None:
            raise BadRequestError(f"url_pattern: {problem}")
        tokens: list[str] = []
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                if not tokens or tokens[-1] != _GLOBSTAR:  # "****" is one "**"
                    tokens.append(_GLOBSTAR)
                i += 2
                continue
            tokens.append(pattern[i])
            i += 1
        self.pattern = pattern
        self._tokens = tokens

    def _closure(self, states: set[int]) -> set[int]:
        """``states`` plus every position reachable by letting ``*``/``**`` match nothing."""
        out = set(states)
        stack = list(states)
        while stack:
            i = stack.pop()
            if i < len(self._tokens) and self._tokens[i] in (_STAR, _GLOBSTAR) and i + 1 not in out:
                out.add(i + 1)
                stack.append(i + 1)
        return out

    def match(self, text: str) -> bool:
        """True when the glob matches the whole of ``text``."""
        tokens, end = self._tokens, len(self._tokens)
        states = self._closure({0})
        for ch in text:
            step: set[int] = set()
            for i in states:
                if i == end:
                    continue
                token = tokens[i]
                if token == _GLOBSTAR or (token == _STAR and ch != "/"):
                    step.add(i)
                elif token in (_ANY_ONE, ch):
                    step.add(i + 1)
            if not step:
                return False
            states = self._closure(step)
        return end in states


def glob_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not an acceptable ``url_pattern`` (too long, too many wildcards),
    or None."""
    if len(pattern) > MAX_GLOB_LENGTH:
        return f"longer than {MAX_GLOB_LENGTH} characters"
    wildcards = pattern.count("?") + len(re.findall(r"\*+", pattern))
    if wildcards > MAX_GLOB_WILDCARDS:
        return f"more than {MAX_GLOB_WILDCARDS} wildcards"
    return None


@functools.lru_cache(maxsize=1024)
def compile_glob(pattern: str) -> Glob:
    """The :class:`Glob` for ``pattern``, built once (cached). Raises
    :class:`BadRequestError`."""
    return Glob(pattern)


def host_matches(host: str, globs: list[str]) -> bool:
    """True when ``host`` (case-insensitive) matches one of the ``globs`` (``*`` = any run of
    characters within a host, e.g. ``*.example.com``)."""
    host = host.lower().rstrip(".")
    for pattern in globs:
        regex = "^" + re.escape(pattern.lower().strip()).replace(r"\*", "[^/]*") + "$"
        if re.match(regex, host):
            return True
    return False
