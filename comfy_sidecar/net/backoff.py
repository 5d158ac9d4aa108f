"""What retries share: the one retry-delay formula (capped exponential backoff with optional
jitter) and the one-line reason an HTTP attempt failed.

The delay is used by the webhook dispatcher (between delivery attempts), Salad's deletion-cost
sender (between failed PUTs), the ComfyUI websocket (between reconnects), the supervisor
(between ComfyUI restarts) and the job adapters' after-end webhooks in queue mode (between
reads of the action from Redis); the reason by the first two, in their retry warnings.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the websocket and the supervisor use the delay without httpx
    import httpx

__all__ = ["attempt_failure", "backoff_delay"]

# 2.0 ** 1024 overflows a float; past this exponent every delay is the cap anyway.
_MAX_EXPONENT = 1000


def backoff_delay(
    attempt: int,
    base_s: float,
    cap_s: float,
    jitter: float = 0.0,
    *,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after failure number ``attempt`` (1 for the first failure).

    The delay is ``min(cap_s, base_s * 2 ** (attempt - 1))`` times a factor drawn uniformly
    from ``[1 - jitter, 1]``, so it never exceeds ``cap_s`` and ``jitter=0`` gives the plain
    doubling (``base_s``, ``2 * base_s``, ... ``cap_s``). ``jitter`` is a fraction (0.25 =
    up to 25 % shorter). ``rng`` returns a float in ``[0, 1)`` (default
    :func:`random.random`; pass a fixed one in tests). Any ``attempt`` is safe (no overflow).
    ``ValueError`` if ``attempt < 1``, ``base_s < 0``, ``cap_s < 0`` or ``jitter`` is
    outside ``[0, 1]``.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1 (got {attempt})")
    if base_s < 0 or cap_s < 0:
        raise ValueError(f"base_s and cap_s must be >= 0 (got {base_s}, {cap_s})")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1] (got {jitter})")
    delay = min(cap_s, base_s * 2.0 ** min(attempt - 1, _MAX_EXPONENT))
    if jitter:
        delay *= 1.0 - jitter * rng()
    return float(delay)


def attempt_failure(exc: TimeoutError | httpx.HTTPError, timeout_s: float) -> str:
    """Why an HTTP attempt failed, for a log line: ``"no answer within <timeout_s> s"`` when
    the caller's ``asyncio.timeout`` fired (``exc`` a :class:`TimeoutError`), else
    ``"<httpx exception class>: <message>"``."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    return f"{type(exc).__name__}: {exc}"
