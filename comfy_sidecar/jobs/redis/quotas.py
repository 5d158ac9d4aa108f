"""API keys' quotas in Redis (JOB_QUEUE_URL): the counters every replica shares, so a key's
limits hold however many replicas take its jobs (a :class:`~comfy_sidecar.jobs.quotas.Quotas`).

Per key name ``n`` (``P`` = :data:`~comfy_sidecar.jobs.redis.store.PREFIX`):

- ``P:quota:n:active``: a sorted set of the key's jobs admitted and not ended
  (``max_concurrent_jobs``), each scored by the time (ms, Redis's clock) until which it counts
  without a question;
- ``P:quota:n:waiting``: those of them not running yet (``max_queue``), scored alike;
- ``P:quota:n:window``: its admissions of the last 60 s (``jobs_per_minute``), scored by their
  time.

A member is ``job:<id>`` for a job of the shared queue (given back by whichever replica ends
it, in the same transaction that writes its end: :meth:`RedisJobs.finish
<comfy_sidecar.jobs.redis.store.RedisJobs.finish>`; out of ``waiting`` once a replica claims
it) or ``run:<replica>:<id>:<n>`` for a job that runs on the replica that took it (``/prompt``,
the workflow endpoints), given back by that replica when it ends.

Nothing leaks when a replica dies: a member's score is its expiry. The replica running a
``run:`` job renews it with its lease heartbeat (:meth:`RedisQuotas.refresh`); a dead replica's
expire within :attr:`RedisQuotas.hold_s`. A ``job:`` member past its score is checked at the
next admission: kept (and renewed) while the job's hash exists and it has not ended (it waits,
or runs, or will be taken over after its lease), dropped otherwise. The check and the count of
an admission are one script (:data:`TAKE`), atomic across replicas.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from redis.exceptions import RedisError

from comfy_sidecar.config.keys import KeyPolicy
from comfy_sidecar.errors import Unavailable
from comfy_sidecar.jobs.quotas import CONCURRENCY_RETRY_S, NO_HOLD, WINDOW_S, Hold, refused
from comfy_sidecar.jobs.redis.store import PREFIX, RedisJobs, quota_key, quota_member

log = logging.getLogger("comfy_sidecar.jobs.quotas")

__all__ = ["TAKE", "RedisQuotas"]

#: KEYS the key's active, waiting and window sets; ARGV the member, the hold (ms), the limits
#: (max_concurrent_jobs, max_queue, jobs_per_minute; 0: none), the window (ms), the job hashes'
#: and done keys' prefixes. Sweeps expired members (a ``job:`` one kept while its job lives),
#: then admits: ``{1, fresh}`` (fresh 0: the member was already admitted: a resubmission) or
#: ``{0, reason, retry after in ms}``; nothing is written on a refusal.
TAKE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local hold = tonumber(ARGV[2])
local function sweep(key)
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', now)) do
    local id = string.match(member, '^job:(.*)$')
    if id and redis.call('HEXISTS', ARGV[7] .. id, 'view') == 1
        and redis.call('EXISTS', ARGV[8] .. id) == 0 then
      redis.call('ZADD', key, now + hold, member)
    else
      redis.call('ZREM', key, member)
    end
  end
end
sweep(KEYS[1])
sweep(KEYS[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1, 0} end
local concurrent, queue, per_minute = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if concurrent > 0 and redis.call('ZCARD', KEYS[1]) >= concurrent then
  return {0, 'max_concurrent_jobs', 0}
end
if queue > 0 and redis.call('ZCARD', KEYS[2]) >= queue then
  return {0, 'max_queue', 0}
end
if per_minute > 0 then
  local window = tonumber(ARGV[6])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
  if redis.call('ZCARD', KEYS[3]) >= per_minute then
    local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    return {0, 'jobs_per_minute', tonumber(oldest[2]) + window - now}
  end
  redis.call('ZADD', KEYS[3], now, ARGV[1] .. ':' .. now)
  redis.call('PEXPIRE', KEYS[3], window + 1000)
end
redis.call('ZADD', KEYS[1], now + hold, ARGV[1])
redis.call('ZADD', KEYS[2], now + hold, ARGV[1])
return {1, 1}
"""

#: KEYS active and waiting sets of one key; ARGV the hold (ms), then members. Renews those
#: still there (ZADD XX).
RENEW = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
  redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
"""


class _RedisHold:
    """One admitted job's member in its key's sets (see the module docstring)."""

    def __init__(self, quotas: RedisQuotas, name: str, member: str, runs_here: bool) -> None:
        self.quotas = quotas
        self.name = name
        self.member = member
        self.runs_here = runs_here
        self.waiting = True
        self.held = True

    def started(self) -> None:
        """A job running here left the queue (a shared-queue job leaves it when claimed)."""
        if self.held and self.waiting and self.runs_here:
            self.waiting = False
            self.quotas.remove(self.name, self.member, active=False)

    def release(self) -> None:
        """The job ended here, or was refused after its admission."""
        if self.held:
            self.held = self.waiting = False
            self.quotas.remove(self.name, self.member, active=True)


class RedisQuotas:
    """The quotas of every replica, in Redis (see the module docstring); ``jobs`` is the
    replica's Redis job store (its connection, its replica name, its lease)."""

    def __init__(self, jobs: RedisJobs) -> None:
        self.jobs = jobs
        self.redis: Any = jobs.redis
        self._take = self.redis.register_script(TAKE)
        self._renew = self.redis.register_script(RENEW)
        #: Members of the jobs running on this replica, by key name: renewed by :meth:`refresh`.
        self.local: dict[str, set[str]] = {}
        self._numbers = itertools.count(1)
        self._writes: set[asyncio.Task[None]] = set()

    @property
    def hold_s(self) -> float:
        """How long a member counts without being renewed or checked: three leases."""
        return 3 * self.jobs.lease_s

    async def take(self, key: KeyPolicy, job_id: str, *, runs_here: bool = True) -> Hold:
        """See :meth:`~comfy_sidecar.jobs.quotas.Quotas.take`. Raises
        :class:`~comfy_sidecar.errors.Unavailable` (503) while Redis cannot be reached."""
        if not key.limited:
            return NO_HOLD
        name = key.name
        if runs_here:
            member = f"run:{self.jobs.replica}:{job_id}:{next(self._numbers)}"
        else:
            member = quota_member(job_id)
        try:
            answer = await self._take(
                keys=[quota_key(name, kind) for kind in ("active", "waiting", "window")],
                args=[
                    member,
                    int(self.hold_s * 1000),
                    key.max_concurrent_jobs or 0,
                    key.max_queue or 0,
                    key.jobs_per_minute or 0,
                    int(WINDOW_S * 1000),
                    f"{PREFIX}:job:",
                    f"{PREFIX}:done:",
                ],
            )
        except (RedisError, OSError) as exc:
            raise Unavailable(f"the job queue (Redis) is unreachable: {exc}") from None
        if int(answer[0]) == 0:
            reason = answer[1].decode() if isinstance(answer[1], bytes) else str(answer[1])
            wait_ms = int(answer[2])
            raise refused(key, reason, wait_ms / 1000 if wait_ms else CONCURRENCY_RETRY_S)
        if int(answer[1]) == 0:  # already admitted (the same job submitted twice at once)
            return NO_HOLD
        if runs_here:
            self.local.setdefault(name, set()).add(member)
        return _RedisHold(self, name, member, runs_here)

    def remove(self, name: str, member: str, *, active: bool) -> None:
        """Take ``member`` out of key ``name``'s waiting set (and, ``active``, its active set
        too), in the background; a failure is logged (the member expires)."""
        if active:
            members = self.local.get(name)
            if members is not None:
                members.discard(member)
                if not members:
                    del self.local[name]
        task = asyncio.ensure_future(self._remove(name, member, active))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _remove(self, name: str, member: str, active: bool) -> None:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(quota_key(name, "waiting"), member)
                if active:
                    pipe.zrem(quota_key(name, "active"), member)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("key %s: a quota place could not be given back (%s); it expires", name, exc)

    async def refresh(self) -> None:
        """Renew the members of the jobs running on this replica (called with the lease
        heartbeat). Raises ``RedisError``."""
        for name, members in list(self.local.items()):
            if members:
                await self._renew(
                    keys=[quota_key(name, "active"), quota_key(name, "waiting")],
                    args=[int(self.hold_s * 1000), *members],
                )
