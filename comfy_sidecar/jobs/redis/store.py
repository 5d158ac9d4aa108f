"""Jobs, their events and their queue in Redis (``JOB_QUEUE_URL``), shared by every replica.

Keys (``P`` = :data:`PREFIX`):

- ``P:jobs``: the work stream of priority 0, one entry ``{id}`` per submitted job, read by the
  consumer group ``P:workers`` (XREADGROUP); an entry stays pending until the replica that ran
  it ACKs it. A replica heartbeats the entries it holds (XCLAIM to itself, which resets their
  idle time); one idle longer than ``lease_s`` is taken over by another replica (XAUTOCLAIM).
- ``P:jobs:p{n}``: the work stream of the jobs of priority ``n`` (an API key's, see
  :mod:`comfy_sidecar.config.keys`), with the same group; one stream per priority level in use
  (a bounded set: the configured keys' priorities).
- ``P:levels``: a sorted set of the work streams, scored by their priority. A claim
  (:data:`CLAIM`) takes the first job a silent replica held, else the oldest entry of the
  highest-priority stream that has one, in one script: higher priority first, FIFO within one.
  A submission publishes on ``P:submitted`` so idle replicas claim at once.
- ``P:job:{id}``: a hash: ``view`` (the ``GET /jobs/{id}`` body, JSON), ``request`` (the
  ``/prompt`` body, JSON), ``fingerprint``, ``attempts`` (JSON list of ``{replica, started_at}``),
  ``seq`` (the last event id), ``entry`` and ``stream`` (its work-stream entry: its queue
  position), ``after`` (a job adapter's after-end action, JSON: see
  :class:`comfy_sidecar.jobs.spec.AfterEnd`), ``key`` (the policy of the API key that submitted
  it, JSON: :class:`comfy_sidecar.config.keys.KeyPolicy`; never the key), ``trace`` (the W3C
  traceparent the run continues: the submitting replica's span).
- ``P:quota:{name}:active``, ``P:quota:{name}:waiting``, ``P:quota:{name}:window``: API key
  ``name``'s quota counters (:mod:`comfy_sidecar.jobs.redis.quotas`): its jobs admitted and not
  ended, those not yet claimed, and its admissions of the last minute.
- ``P:events:{id}``: the job's event stream (XADD with MAXLEN; entries ``{n, type, data}``, ``n``
  the SSE id). Chosen over pub/sub + a list because one stream both replays from
  ``Last-Event-ID`` and blocks for the next event (XREAD BLOCK), on every replica, and survives
  a restart from the AOF with the rest.
- ``P:out:{id}:{n}``: output ``n``'s bytes when kept inline (at most JOB_INLINE_OUTPUT_MB per job),
  written when the job ends or, for an output published while the job runs, before its
  ``output`` event (:meth:`RedisJobs.keep_output`; kept :data:`EARLY_OUTPUT_TTL_S` until the
  job's end gives it the retention).
- ``P:idempotency:jobs:{key}``: a Comfy API v2 ``Idempotency-Key`` used by a job (its id), set
  with the job's creation (SET NX, :data:`~comfy_sidecar.jobs.spec.IDEMPOTENCY_TTL_S`).
- ``P:partner:{id}``: the job's partner key (ComfyUI's ``extra_data.api_key_comfy_org``), set
  with the job's creation, read by the replica that claims it, deleted with the job's end;
  at most :data:`PARTNER_KEY_TTL_S` seconds. Never in the job's hash, its events or a log.
- ``P:done:{id}``: set once (SET NX) by the attempt that ends the job (its token): only it
  sends the webhooks and writes the end; a later finisher (a replica that lost its lease)
  discards its result.
- ``P:index``: a sorted set of job ids scored by submission number (``P:order``, INCR): the
  listing's pages, whose cursor is that number.
- ``P:cancel``: a pub/sub channel of job ids to interrupt wherever they run.
- ``P:preview:{id}``: a pub/sub channel of the job's live ``preview`` events (never kept).

Ended jobs' keys expire after ``retention_s`` seconds; pending and running jobs never do.
Writes that go together (an event with its id and the job's body, a submission, an attempt,
the end's claim) are Lua scripts (EVAL/EVALSHA, :data:`EMIT` and the others): one round trip
each, and atomic.
Every method raises :class:`redis.exceptions.RedisError` (``ConnectionError`` while Redis is
unreachable) unless it says otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from comfy_sidecar.errors import IdempotencyKeyReuse
from comfy_sidecar.jobs.model import (
    DifferentBody,
    JobEvent,
    JobStatus,
    JobView,
    decode_view,
    iso,
    labels_match,
    now_ms,
)
from comfy_sidecar.jobs.spec import IDEMPOTENCY_TTL_S, reuse_message
from comfy_sidecar.net.redisconn import connect, read_range, write_file
from comfy_sidecar.schemas.secret import Secret

log = logging.getLogger("comfy_sidecar.jobs.redis")

PREFIX = "comfy-sidecar"
WORK = f"{PREFIX}:jobs"
GROUP = f"{PREFIX}:workers"
INDEX = f"{PREFIX}:index"
ORDER = f"{PREFIX}:order"
CANCEL = f"{PREFIX}:cancel"
LEVELS = f"{PREFIX}:levels"
#: Published on by every submission (and every job given back): idle replicas claim then.
SUBMITTED = f"{PREFIX}:submitted"
#: Most events kept per job (approximate trimming).
EVENTS_MAX = 10_000


#: Most jobs counted ahead of one for its queue position.
POSITION_MAX = 10_000
#: Seconds an output kept while its job runs is kept before the job's end sets its retention
#: (bounds what a run that dies leaves behind).
EARLY_OUTPUT_TTL_S = 24 * 3600
#: Seconds a job's partner key is kept at most (a job waiting longer runs without it).
PARTNER_KEY_TTL_S = 24 * 3600

# Lua scripts: each runs in one round trip and atomically (Redis runs a script alone).

#: KEYS job hash, event stream, done key; ARGV events' MAXLEN, the new ``view`` ('' keeps
#: it), then ``type, data`` pairs. Appends the events in order (ids from the hash's ``seq``),
#: then replaces the view unless the job has ended. Returns the last event id (0: none).
EMIT = """
local n = 0
for i = 3, #ARGV, 2 do
  n = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*',
             'n', n, 'type', ARGV[i], 'data', ARGV[i + 1])
end
if ARGV[2] ~= '' and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[1], 'view', ARGV[2])
end
return n
"""

#: KEYS done key; ARGV token, seconds. 1 when the end is (or already was) this token's.
TAKE_END = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end
return 0
"""

#: KEYS job hash, index, order counter, event stream, work stream (its priority's), levels,
#: Idempotency-Key, partner key; ARGV id, view, request, events' MAXLEN, the first status
#: event's data, its after-end action (``''``: none), its key policy (JSON, ``''``: none), its
#: priority, the group, the channel to publish on, the Idempotency-Key's seconds (``''``: no
#: key), the partner key (``''``: none), its seconds and the traceparent (``''``: none).
#: Stores a new job, its first event and its work-stream entry together (the stream and its
#: group made on first use, and listed in the levels), after claiming its Idempotency-Key
#: (SET NX): a used key makes no job (the hash the caller just began is removed) and answers
#: ``{'reused', <the job that used it>}``.
CREATE = """
if ARGV[11] ~= '' then
  if not redis.call('SET', KEYS[7], ARGV[1], 'NX', 'EX', ARGV[11]) then
    local holder = redis.call('GET', KEYS[7])
    redis.call('DEL', KEYS[1])
    return {'reused', holder or ''}
  end
end
if ARGV[12] ~= '' then
  redis.call('SET', KEYS[8], ARGV[12], 'EX', ARGV[13])
end
local order = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'view', ARGV[2], 'request', ARGV[3], 'attempts', '[]')
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'after', ARGV[6])
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'key', ARGV[7])
end
if ARGV[14] ~= '' then
  redis.call('HSET', KEYS[1], 'trace', ARGV[14])
end
redis.call('ZADD', KEYS[2], order, ARGV[1])
local n = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
           'n', n, 'type', 'status', 'data', ARGV[5])
if redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[5], ARGV[9], '0', 'MKSTREAM')
end
redis.call('ZADD', KEYS[6], ARGV[8], KEYS[5])
local entry = redis.call('XADD', KEYS[5], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'entry', entry, 'stream', KEYS[5])
redis.call('PUBLISH', ARGV[10], '1')
return entry
"""

#: KEYS an API key's active and waiting sets; ARGV a job's member. The job (still admitted)
#: waits again: given back unstarted.
REWAIT = """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry then redis.call('ZADD', KEYS[2], expiry, ARGV[1]) end
"""

#: Stream ids compared as numbers (``ms-seq``), the last id a group handed out, and the
#: entries of a stream after it (handed to no replica yet), as Lua helpers.
STREAM_HELPERS = """
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
local function last_delivered(stream, group)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if not ok then return nil end
  for _, info in ipairs(groups) do
    local name, last = nil, nil
    for i = 1, #info, 2 do
      if info[i] == 'name' then name = info[i + 1] end
      if info[i] == 'last-delivered-id' then last = info[i + 1] end
    end
    if name == group then return last end
  end
  return nil
end
local function undelivered(stream, group, upto, most)
  local last = last_delivered(stream, group)
  if not last then return 0 end
  if upto and not before(last, upto) then return -1 end
  local top = upto and ('(' .. upto) or '+'
  return #redis.call('XRANGE', stream, '(' .. last, top, 'COUNT', most)
end
"""

#: KEYS job hash, levels; ARGV the group, the most entries counted, the priority-0 stream.
#: How many jobs wait ahead of the job (those of higher priority, and those of its own before
#: it), -1 once a replica has claimed it (or it is in no stream). One snapshot: atomic.
POSITION = (
    STREAM_HELPERS
    + """
local entry = redis.call('HGET', KEYS[1], 'entry')
if not entry then return -1 end
local stream = redis.call('HGET', KEYS[1], 'stream') or ARGV[3]
local ahead = undelivered(stream, ARGV[1], entry, tonumber(ARGV[2]))
if ahead < 0 then return -1 end
local priority = redis.call('ZSCORE', KEYS[2], stream) or '0'
for _, other in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. priority, '+inf')) do
  ahead = ahead + undelivered(other, ARGV[1], nil, tonumber(ARGV[2]))
end
return ahead
"""
)

#: KEYS levels; ARGV the group, the most entries counted per stream. Jobs no replica has
#: claimed yet, in every stream.
WAITING = (
    STREAM_HELPERS
    + """
local count = 0
for _, stream in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  count = count + undelivered(stream, ARGV[1], nil, tonumber(ARGV[2]))
end
return count
"""
)

#: KEYS levels; ARGV the group, this replica (the consumer), the lease in ms. One job for this
#: replica: the first whose holder stopped heartbeating for the lease (XAUTOCLAIM), else the
#: next entry of the highest-priority stream that has one (XREADGROUP, not blocking). Returns
#: ``{stream, entry, job id, deliveries}`` or nil. Entries a take-over finds trimmed away are
#: acknowledged.
CLAIM = """
local streams = redis.call('ZREVRANGE', KEYS[1], 0, -1)
for _, stream in ipairs(streams) do
  local found = redis.call('XAUTOCLAIM', stream, ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', 1)
  for _, item in ipairs(found[2]) do
    local fields = item[2]
    if type(fields) == 'table' and #fields >= 2 then
      local detail = redis.call('XPENDING', stream, ARGV[1], item[1], item[1], 1)
      local times = 1
      if detail[1] then times = detail[1][4] end
      return {stream, item[1], fields[2], times}
    end
    redis.call('XACK', stream, ARGV[1], item[1])
  end
end
for _, stream in ipairs(streams) do
  local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1,
                         'STREAMS', stream, '>')
  if got and got[1] and got[1][2][1] then
    local item = got[1][2][1]
    return {stream, item[1], item[2][2], 1}
  end
end
return nil
"""

#: KEYS job hash, its key's waiting set; ARGV the attempt (JSON), the job's member in that set
#: (``''``: none). Appends the attempt to the ``attempts`` list (kept as written: spliced, not
#: re-encoded) and takes the job out of the waiting set; returns the list (JSON).
BEGIN_ATTEMPT = """
if ARGV[2] ~= '' then
  redis.call('ZREM', KEYS[2], ARGV[2])
end
local raw = redis.call('HGET', KEYS[1], 'attempts')
local out
if not raw or string.match(raw, '^%s*%[%s*%]%s*$') or raw == '' then
  out = '[' .. ARGV[1] .. ']'
else
  out = string.gsub(raw, '%]%s*$', '') .. ',' .. ARGV[1] .. ']'
end
redis.call('HSET', KEYS[1], 'attempts', out)
return out
"""


def stream_of(priority: int) -> str:
    """The work stream of the jobs of ``priority``: :data:`WORK` for 0, ``WORK:p<n>`` else."""
    return WORK if priority == 0 else f"{WORK}:p{priority}"


def quota_key(name: str, kind: str) -> str:
    """API key ``name``'s quota counter ``kind``: ``active``, ``waiting`` or ``window``."""
    return f"{PREFIX}:quota:{name}:{kind}"


def quota_member(job_id: str) -> str:
    """A shared-queue job's member in its key's ``active`` and ``waiting`` sets."""
    return f"job:{job_id}"


def job_key(job_id: str) -> str:
    """The hash of job ``job_id``."""
    return f"{PREFIX}:job:{job_id}"


def events_key(job_id: str) -> str:
    """The event stream of job ``job_id``."""
    return f"{PREFIX}:events:{job_id}"


def output_key(job_id: str, index: int) -> str:
    """Output ``index`` of job ``job_id`` kept inline."""
    return f"{PREFIX}:out:{job_id}:{index}"


def preview_channel(job_id: str) -> str:
    """The pub/sub channel of job ``job_id``'s live previews."""
    return f"{PREFIX}:preview:{job_id}"


def done_key(job_id: str) -> str:
    """Set once by the attempt that ends job ``job_id``."""
    return f"{PREFIX}:done:{job_id}"


def idempotency_key(key: str) -> str:
    """The Redis key of a Comfy API v2 job ``Idempotency-Key``."""
    return f"{PREFIX}:idempotency:jobs:{key}"


def partner_key(job_id: str) -> str:
    """Where job ``job_id``'s partner key waits for the replica that runs it."""
    return f"{PREFIX}:partner:{job_id}"


#: Bytes of an inline output written or read per round trip.
CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a replica reads of a job it claimed: ``ended`` (it has ended, or is not kept:
    then the rest is None / empty), its ``/prompt`` ``request`` (JSON), its ``attempts``,
    its ``view``, its adapter's ``after``-end action (JSON), its ``fingerprint``, its API
    ``key``'s policy (JSON), its ``partner_key`` and the ``trace`` context (a W3C
    traceparent) its run continues."""

    ended: bool
    request: bytes | None
    attempts: list[dict[str, Any]]
    view: JobView | None
    after: bytes | None
    fingerprint: bytes
    key: bytes | None = None
    partner_key: Secret | None = None
    trace: str | None = None


@dataclass
class RedisOutput:
    """An output kept inline in Redis (an :class:`~comfy_sidecar.jobs.backend.OutputBlob`
    once :attr:`filename` and :attr:`mime_type` are set from the job's view)."""

    redis: Any
    key: str
    size: int
    filename: str = ""
    mime_type: str = "application/octet-stream"

    def chunks(self, first: int, last: int) -> AsyncIterator[bytes]:
        """Bytes ``first``..``last`` (inclusive), :data:`CHUNK` at a time (GETRANGE)."""
        return read_range(self.redis, self.key, first, last, CHUNK)

    async def read(self) -> bytes:
        """Every byte."""
        data: bytes | None = await self.redis.get(self.key)
        return data or b""


@dataclass(frozen=True, slots=True)
class Claim:
    """One work-stream entry this replica holds: ``stream`` (its priority's work stream),
    ``entry`` (the stream id), the job's id, and ``deliveries`` (how many times the entry has
    been handed out, this one included)."""

    stream: str
    entry: str
    job_id: str
    deliveries: int

    @property
    def name(self) -> str:
        """The entry's name, unique across the streams: ``<stream> <entry>``."""
        return f"{self.stream} {self.entry}"


class RedisJobs:
    """The Redis side of the job store and queue for one replica (``replica`` names it: the
    consumer name in the group, and the ``replica`` of its attempts)."""

    def __init__(
        self, url: str, replica: str, *, retention_s: float, lease_s: float, max_attempts: int
    ) -> None:
        self.redis: Any = connect(url)
        self.replica = replica
        self._emit = self.redis.register_script(EMIT)
        self._take_end = self.redis.register_script(TAKE_END)
        self._create = self.redis.register_script(CREATE)
        self._begin_attempt = self.redis.register_script(BEGIN_ATTEMPT)
        self._claim = self.redis.register_script(CLAIM)
        self._position = self.redis.register_script(POSITION)
        self._waiting = self.redis.register_script(WAITING)
        self.retention_s = retention_s
        self.lease_s = lease_s
        self.max_attempts = max_attempts

    @property
    def _ttl(self) -> int:
        return max(1, int(self.retention_s))

    async def ensure_group(self) -> None:
        """Create the priority-0 work stream and its consumer group when missing (the other
        priorities' streams are made by their first job), and list it in the levels."""
        try:
            await self.redis.xgroup_create(WORK, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self.redis.zadd(LEVELS, {WORK: 0})

    async def ping(self) -> bool:
        """True when Redis answers (never raises)."""
        try:
            return bool(await self.redis.ping())
        except Exception:
            return False

    async def close(self) -> None:
        """Close the connections."""
        await self.redis.aclose()

    # --- records --------------------------------------------------------------------------

    async def enqueue(
        self,
        view: JobView,
        request: bytes,
        fingerprint: bytes,
        after: bytes | None = None,
        key: bytes | None = None,
        priority: int = 0,
        *,
        idempotency: str | None = None,
        partner: Secret | None = None,
        trace: str | None = None,
    ) -> tuple[JobView, bool]:
        """Store a new job (``view`` its first body, ``request`` its ``/prompt`` JSON,
        ``after`` its adapter's after-end action, ``key`` its API key's policy, ``partner``
        its partner key, ``trace`` the traceparent its run continues) and append it to the work
        stream of its ``priority``; returns (the stored view, created). An id already kept
        with the same ``fingerprint`` returns that job (created False); another fingerprint
        raises :class:`~comfy_sidecar.jobs.model.DifferentBody`. With ``idempotency`` (a v2
        ``Idempotency-Key``) the key is claimed in the same script: one used in the last 24 h
        raises :class:`~comfy_sidecar.errors.IdempotencyKeyReuse` and stores nothing."""
        job_id = view.id
        job_hash = job_key(job_id)
        if not await self.redis.hsetnx(job_hash, "fingerprint", fingerprint):
            kept = await self.redis.hget(job_hash, "fingerprint")
            if kept != fingerprint or not fingerprint:
                raise DifferentBody(job_id)
            existing = await self.get(job_id)
            if existing is not None:
                return existing, False
        answer = await self._create(
            keys=[
                job_hash,
                INDEX,
                ORDER,
                events_key(job_id),
                stream_of(priority),
                LEVELS,
                idempotency_key(idempotency or ""),
                partner_key(job_id),
            ],
            args=[
                job_id,
                msgspec.json.encode(view),
                request,
                EVENTS_MAX,
                msgspec.json.encode({"status": view.status}),
                after or b"",
                key or b"",
                priority,
                GROUP,
                SUBMITTED,
                IDEMPOTENCY_TTL_S if idempotency is not None else "",
                partner.reveal() if partner is not None else "",
                PARTNER_KEY_TTL_S,
                trace or "",
            ],
        )
        if isinstance(answer, list):
            holder = answer[1].decode() if isinstance(answer[1], bytes) else str(answer[1])
            raise IdempotencyKeyReuse(reuse_message(holder or None), "Idempotency-Key")
        return view, True

    async def position(self, job_id: str) -> int | None:
        """How many jobs wait ahead of job ``job_id`` (0: it is next): those of higher
        priority, then those of its own submitted before it; None once a replica has claimed
        it (or it is not in a stream). Counted in one script (:data:`POSITION`: one snapshot),
        at most :data:`POSITION_MAX` per stream."""
        ahead = int(
            await self._position(keys=[job_key(job_id), LEVELS], args=[GROUP, POSITION_MAX, WORK])
        )
        return None if ahead < 0 else ahead

    async def waiting(self) -> int:
        """How many jobs wait in the work streams, not yet claimed by any replica (0 before
        any stream exists)."""
        return int(await self._waiting(keys=[LEVELS], args=[GROUP, POSITION_MAX]))

    async def get(self, job_id: str) -> JobView | None:
        """Job ``job_id``'s view, or None when it is not kept."""
        raw = await self.redis.hget(job_key(job_id), "view")
        return None if raw is None else decode_view(raw)

    async def last_event_id(self, job_id: str) -> int:
        """The id of job ``job_id``'s last event (its hash's ``seq``; 0 when none)."""
        raw = await self.redis.hget(job_key(job_id), "seq")
        return int(raw) if raw else 0

    async def request(self, job_id: str) -> bytes | None:
        """Job ``job_id``'s ``/prompt`` body (JSON), or None."""
        raw: bytes | None = await self.redis.hget(job_key(job_id), "request")
        return raw

    async def load(self, job_id: str) -> Loaded:
        """What a replica reads of job ``job_id`` when it claims it, in one round trip (see
        :class:`Loaded`)."""
        fields = ["request", "attempts", "view", "after", "fingerprint", "key", "trace"]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(done_key(job_id))
            pipe.hmget(job_key(job_id), fields)
            pipe.get(partner_key(job_id))
            done, fields_read, partner = await pipe.execute()
            request, attempts, view, after, fingerprint, key, trace = fields_read
        return Loaded(
            ended=bool(done) or (request is None and view is None),
            request=request,
            attempts=msgspec.json.decode(attempts) if attempts else [],
            view=decode_view(view) if view is not None else None,
            after=after or None,
            fingerprint=fingerprint or b"",
            key=key or None,
            partner_key=Secret(partner.decode()) if partner else None,
            trace=trace.decode("ascii", "replace") if trace else None,
        )

    async def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """Job ``job_id``'s attempts so far: ``[{replica, started_at}]``."""
        raw = await self.redis.hget(job_key(job_id), "attempts")
        found: list[dict[str, Any]] = msgspec.json.decode(raw) if raw else []
        return found

    async def begin_attempt(self, job_id: str, owner: str | None = None) -> list[dict[str, Any]]:
        """Record that this replica starts a run of ``job_id`` (no longer waiting: it leaves
        the ``max_queue`` count of its API key, named ``owner``); returns every attempt."""
        attempt = {"replica": self.replica, "started_at": iso(now_ms())}
        # Without an owner the script touches no second key: the job's hash stands in.
        waiting = quota_key(owner, "waiting") if owner is not None else job_key(job_id)
        raw = await self._begin_attempt(
            keys=[job_key(job_id), waiting],
            args=[msgspec.json.encode(attempt), quota_member(job_id) if owner else ""],
        )
        found: list[dict[str, Any]] = msgspec.json.decode(raw)
        return found

    async def emit(self, job_id: str, events: list[tuple[str, Any]], view: JobView | None) -> int:
        """Append ``events`` (``(type, body)``, in order) to job ``job_id``'s stream, then
        replace its body with ``view`` unless the job has ended (None: keep it); one round
        trip, atomic. Returns the last event's id (the SSE ``id``; 0 without events)."""
        return int(
            await self._emit(keys=self._emit_keys(job_id), args=self._emit_args(events, view))
        )

    @staticmethod
    def _emit_keys(job_id: str) -> list[str]:
        return [job_key(job_id), events_key(job_id), done_key(job_id)]

    @staticmethod
    def _emit_args(events: list[tuple[str, Any]], view: JobView | None) -> list[Any]:
        args: list[Any] = [EVENTS_MAX, b"" if view is None else msgspec.json.encode(view)]
        for kind, body in events:
            args += [kind, msgspec.json.encode(body)]
        return args

    async def take_end(self, job_id: str, token: str) -> bool:
        """Claim the right to end job ``job_id`` for the attempt ``token`` (unique per
        attempt): True for the first caller and again for the same ``token``, False for every
        other (another attempt, or a cancel, ended it first). Atomic (SET NX): what lets only
        one attempt deliver the webhooks and the result, also when a replica that lost its
        lease finishes after the one that took the job over. The claim lasts
        ``2 * lease_s`` seconds until :meth:`finish` makes it permanent, so a replica dying
        between the two does not leave the job unended for good."""
        hold = max(1, int(2 * self.lease_s))
        return bool(await self._take_end(keys=[done_key(job_id)], args=[token, hold]))

    async def finish(
        self,
        job_id: str,
        view: JobView,
        outputs: Sequence[Path | None] = (),
        token: str | None = None,
    ) -> bool:
        """End job ``job_id`` with its final body ``view`` (and the files ``outputs``, kept
        inline; None for one kept while the job ran), once: the holder of the end
        (:meth:`take_end` with ``token``; without one a fresh claim is tried) writes it and
        returns True; everyone else writes nothing and returns False. Every key of the job
        then expires after the retention (its partner key is deleted). Each output is
        streamed in (SET, then APPEND of :data:`CHUNK` bytes at a time: never read whole),
        then one transaction writes the body, the ``done`` event and the expiries, and gives
        the job's places in its API key's quotas back."""
        if not await self.take_end(job_id, token or f"{self.replica}:{uuid.uuid4().hex}"):
            return False
        for index, path in enumerate(outputs):
            if path is not None:
                await self._write_output(output_key(job_id, index), path, self._ttl)
        async with self.redis.pipeline(transaction=True) as pipe:
            if isinstance(view.owner, str):  # its places in its key's quotas, given back
                pipe.zrem(quota_key(view.owner, "active"), quota_member(job_id))
                pipe.zrem(quota_key(view.owner, "waiting"), quota_member(job_id))
            pipe.hset(job_key(job_id), "view", msgspec.json.encode(view))
            pipe.delete(partner_key(job_id))
            for index in range(len(view.outputs)):
                pipe.expire(output_key(job_id, index), self._ttl)
            pipe.expire(done_key(job_id), self._ttl)
            # EVAL, not EVALSHA: a script in a pipeline costs redis-py a SCRIPT EXISTS first.
            emit_keys = self._emit_keys(job_id)
            pipe.eval(EMIT, len(emit_keys), *emit_keys, *self._emit_args([("done", view)], None))
            pipe.expire(job_key(job_id), self._ttl)
            pipe.expire(events_key(job_id), self._ttl)
            await pipe.execute()
        return True

    async def keep_output(self, job_id: str, index: int, path: Path) -> None:
        """Write output ``index`` of the running job ``job_id`` (the file ``path``) now, so
        every replica serves it once its ``output`` event is out; kept
        :data:`EARLY_OUTPUT_TTL_S` until :meth:`finish` gives it the retention."""
        await self._write_output(output_key(job_id, index), path, EARLY_OUTPUT_TTL_S)

    async def _write_output(self, key: str, path: Path, ttl_s: int) -> None:
        """Stream the file ``path`` into the string ``key`` (expiring in ``ttl_s`` seconds),
        a chunk of at most :data:`CHUNK` bytes per round trip, read off the event loop."""
        await write_file(self.redis, key, path, ttl_s, CHUNK)

    async def ended(self, job_id: str) -> bool:
        """True once job ``job_id`` has ended (or is not kept at all)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(done_key(job_id))
            pipe.exists(job_key(job_id))
            done, kept = await pipe.execute()
        return bool(done) or not kept

    async def output(self, job_id: str, index: int) -> RedisOutput | None:
        """Inline output ``index`` of job ``job_id`` (its size known, its bytes not read
        yet), or None."""
        key = output_key(job_id, index)
        size = int(await self.redis.strlen(key))
        if not size and not await self.redis.exists(key):
            return None
        return RedisOutput(self.redis, key, size)

    async def page(
        self,
        status: JobStatus | None,
        limit: int,
        cursor: int | None,
        owner: str | None = None,
        *,
        endpoint: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[list[JobView], int | None]:
        """Newest first: up to ``limit`` job bodies (with ``status``, submitted with the API
        key named ``owner``, through ``endpoint``, carrying every label of ``metadata``, when
        given) submitted before ``cursor`` (a submission number from a previous page);
        (bodies, next cursor)."""
        top = f"({cursor}" if cursor is not None else "+inf"
        found: list[JobView] = []
        last = None
        while len(found) <= limit:
            batch = await self.redis.zrevrangebyscore(
                INDEX, top, "-inf", start=0, num=limit + 1, withscores=True
            )
            if not batch:
                break
            for member, score in batch:
                job_id = member.decode()
                view = await self.get(job_id)
                top = f"({int(score)}"
                if view is None:
                    await self.redis.zrem(INDEX, job_id)
                    continue
                if (
                    (status is None or view.status is status)
                    and (owner is None or view.owner == owner)
                    and (endpoint is None or view.endpoint == endpoint)
                    and labels_match(view.metadata, metadata)
                ):
                    found.append(view)
                    last = int(score)
                    if len(found) > limit:
                        break
        more = len(found) > limit
        return found[:limit], (last if more else None)

    # --- events ---------------------------------------------------------------------------

    async def follow(
        self, job_id: str, after: int = 0, heartbeat_s: float = 15.0, previews: bool = False
    ) -> AsyncIterator[JobEvent | None]:
        """Job ``job_id``'s events with ids above ``after``, as they come (XREAD BLOCK); None
        every ``heartbeat_s`` seconds of silence. Ends after ``done``. With ``previews``, the
        ``preview`` events the running replica sends (:meth:`preview`, pub/sub: live only,
        id 0) are merged in as they arrive."""
        if not previews:
            async for event in self._logged(job_id, after, heartbeat_s):
                yield event
            return
        merged: asyncio.Queue[JobEvent | BaseException | None] = asyncio.Queue()
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(preview_channel(job_id))

        async def logged() -> None:
            try:
                async for event in self._logged(job_id, after, heartbeat_s):
                    merged.put_nowait(event)
            except Exception as exc:
                merged.put_nowait(exc)
            merged.put_nowait(StopAsyncIteration())

        async def live() -> None:
            try:
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        merged.put_nowait(JobEvent(0, "preview", message["data"]))
            except Exception as exc:
                merged.put_nowait(exc)

        tasks = [asyncio.ensure_future(logged()), asyncio.ensure_future(live())]
        try:
            while True:
                item = await merged.get()
                if isinstance(item, StopAsyncIteration):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await pubsub.aclose()

    async def preview(self, job_id: str, data: bytes) -> None:
        """Send a ``preview`` event (its JSON ``data``) to whoever follows job ``job_id``
        with previews now (pub/sub: not kept, not replayed)."""
        await self.redis.publish(preview_channel(job_id), data)

    async def _logged(
        self, job_id: str, after: int, heartbeat_s: float
    ) -> AsyncIterator[JobEvent | None]:
        position = "0-0"
        while True:
            answer = await self.redis.xread(
                {events_key(job_id): position}, count=100, block=int(heartbeat_s * 1000)
            )
            if not answer:
                if await self.ended(job_id) and not await self.redis.exists(events_key(job_id)):
                    return
                yield None
                continue
            for entry_id, fields in answer[0][1]:
                position = entry_id
                n = int(fields[b"n"])
                if n <= after:
                    continue
                kind = fields[b"type"].decode()
                yield JobEvent(n, kind, fields[b"data"])
                if kind == "done":
                    return

    async def request_cancel(self, job_id: str) -> None:
        """Ask whichever replica runs job ``job_id`` to interrupt it."""
        await self.redis.publish(CANCEL, job_id)

    async def notices(self) -> AsyncIterator[str | None]:
        """What other replicas announce (pub/sub), as it comes: a job id whose cancel was
        asked, or None when a job was submitted or given back (claim now). Yields None once
        subscribed too (anything submitted before was missed). Raises when the connection is
        lost (subscribe again then)."""
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(CANCEL, SUBMITTED)
            yield None
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                channel = message.get("channel")
                if channel in (CANCEL, CANCEL.encode()):
                    yield message["data"].decode()
                else:
                    yield None
        finally:
            await pubsub.aclose()

    # --- the work stream ------------------------------------------------------------------

    async def claim(self) -> Claim | None:
        """One job for this replica, or None (never blocks; :meth:`notices` says when to try
        again): the first one whose holder stopped heartbeating for ``lease_s``, else the next
        of the highest-priority stream that has one (:data:`CLAIM`, one script)."""
        found = await self._claim(
            keys=[LEVELS], args=[GROUP, self.replica, int(self.lease_s * 1000)]
        )
        if not found:
            return None
        stream, entry, job_id, deliveries = found
        return Claim(stream.decode(), entry.decode(), job_id.decode(), int(deliveries))

    async def heartbeat(self, claims: list[Claim]) -> list[Claim]:
        """Renew this replica's lease on those of ``claims`` it still holds (their idle time
        restarts); returns the others: taken over by another replica after this one went
        silent past ``lease_s`` (or ended and gone). Those are not claimed back, so a replica
        that comes back from a pause does not snatch a job from the one now running it."""
        if not claims:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for claim in claims:
                pipe.xpending_range(claim.stream, GROUP, min=claim.entry, max=claim.entry, count=1)
            details = await pipe.execute()
        held: dict[str, list[str]] = {}
        lost: list[Claim] = []
        for claim, detail in zip(claims, details, strict=True):
            owner = detail[0]["consumer"] if detail else None
            if owner in (self.replica, self.replica.encode()):
                held.setdefault(claim.stream, []).append(claim.entry)
            else:
                lost.append(claim)
        for stream, entries in held.items():
            await self.redis.xclaim(stream, GROUP, self.replica, 0, entries, justid=True)
        return lost

    async def release(self, claim: Claim, owner: str | None = None, *, began: bool = False) -> None:
        """Give ``claim``'s entry back at once (claimed, not started): its idle time is set
        past any lease, so another replica takes it at its next claim (XAUTOCLAIM), and the
        replicas are told. ``began``: this replica had recorded an attempt, struck from the
        job's attempts (it ran nothing, so it is neither listed nor counted against
        ``max_attempts``), and the job waits again in the ``max_queue`` count of its API key
        (named ``owner``)."""
        if began:
            found = await self.attempts(claim.job_id)
            mine = [i for i, a in enumerate(found) if a["replica"] == self.replica]
            if mine:
                del found[mine[-1]]
                await self.redis.hset(job_key(claim.job_id), "attempts", msgspec.json.encode(found))
        if began and owner is not None:
            await self.redis.eval(
                REWAIT,
                2,
                quota_key(owner, "active"),
                quota_key(owner, "waiting"),
                quota_member(claim.job_id),
            )
        await self.redis.xclaim(
            claim.stream, GROUP, self.replica, 0, [claim.entry], idle=10**9, justid=True
        )
        await self.redis.publish(SUBMITTED, "1")

    async def ack(self, claim: Claim) -> None:
        """The job of ``claim`` has ended: drop its entry from its work stream."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(claim.stream, GROUP, claim.entry)
            pipe.xdel(claim.stream, claim.entry)
            await pipe.execute()
