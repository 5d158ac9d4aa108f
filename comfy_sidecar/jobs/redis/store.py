"""Jobs, their events and their queue in Redis (``JOB_QUEUE_URL``), shared by every replica.

Keys (``P`` = :data:`PREFIX`):

- ``P:jobs``: the work stream, one entry ``{id}`` per submitted job, read by the consumer group
  ``P:workers`` (XREADGROUP); an entry stays pending until the replica that ran it ACKs it.
  A replica heartbeats the entries it holds (XCLAIM to itself, which resets their idle time);
  one idle longer than ``lease_s`` is taken over by another replica (XAUTOCLAIM).
- ``P:job:{id}``: a hash: ``view`` (the ``GET /jobs/{id}`` body, JSON), ``request`` (the
  ``/prompt`` body, JSON), ``fingerprint``, ``attempts`` (JSON list of ``{replica, started_at}``),
  ``seq`` (the last event id), ``entry`` (its work-stream entry id: its queue position),
  ``after`` (a job adapter's after-end action, JSON: see :class:`comfy_sidecar.jobs.spec.AfterEnd`),
  ``trace`` (the W3C traceparent the run continues: the submitting replica's span).
- ``P:events:{id}``: the job's event stream (XADD with MAXLEN; entries ``{n, type, data}``, ``n``
  the SSE id). Chosen over pub/sub + a list because one stream both replays from
  ``Last-Event-ID`` and blocks for the next event (XREAD BLOCK), on every replica, and survives
  a restart from the AOF with the rest.
- ``P:out:{id}:{n}``: output ``n``'s bytes when kept inline (at most JOB_INLINE_OUTPUT_MB per job).
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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from comfy_sidecar.jobs.model import (
    DifferentBody,
    JobEvent,
    JobStatus,
    JobView,
    decode_view,
    iso,
    now_ms,
)

log = logging.getLogger("comfy_sidecar.jobs.redis")

PREFIX = "comfy-sidecar"
WORK = f"{PREFIX}:jobs"
GROUP = f"{PREFIX}:workers"
INDEX = f"{PREFIX}:index"
ORDER = f"{PREFIX}:order"
CANCEL = f"{PREFIX}:cancel"
#: Most events kept per job (approximate trimming).
EVENTS_MAX = 10_000


#: Most jobs counted ahead of one for its queue position.
POSITION_MAX = 10_000

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

#: KEYS job hash, index, order counter, event stream, work stream; ARGV id, view, request,
#: events' MAXLEN, the first status event's data, its after-end action (``''``: none), its
#: traceparent (``''``: none). Stores a new job, its first event and its work-stream entry
#: together.
CREATE = """
local order = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], 'view', ARGV[2], 'request', ARGV[3], 'attempts', '[]')
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'after', ARGV[6])
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[1], 'trace', ARGV[7])
end
redis.call('ZADD', KEYS[2], order, ARGV[1])
local n = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
           'n', n, 'type', 'status', 'data', ARGV[5])
local entry = redis.call('XADD', KEYS[5], '*', 'id', ARGV[1])
redis.call('HSET', KEYS[1], 'entry', entry)
return entry
"""

#: KEYS job hash; ARGV the attempt (JSON). Appends it to the ``attempts`` list (kept as
#: written: spliced, not re-encoded); returns the list (JSON).
BEGIN_ATTEMPT = """
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


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    """A stream entry id (``ms-seq``) as a comparable pair."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


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


#: Bytes of an inline output written or read per round trip.
CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a replica reads of a job it claimed: ``ended`` (it has ended, or is not kept:
    then the rest is None / empty), its ``/prompt`` ``request`` (JSON), its ``attempts``,
    its ``view``, its adapter's ``after``-end action (JSON), its ``fingerprint`` and the
    ``trace`` context (a W3C traceparent) its run continues."""

    ended: bool
    request: bytes | None
    attempts: list[dict[str, Any]]
    view: JobView | None
    after: bytes | None
    fingerprint: bytes
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

    async def chunks(self, first: int, last: int) -> AsyncIterator[bytes]:
        """Bytes ``first``..``last`` (inclusive), :data:`CHUNK` at a time (GETRANGE)."""
        at = first
        while at <= last:
            end = min(last, at + CHUNK - 1)
            chunk: bytes = await self.redis.getrange(self.key, at, end)
            if not chunk:
                return
            yield chunk
            at += len(chunk)

    async def read(self) -> bytes:
        """Every byte."""
        data: bytes | None = await self.redis.get(self.key)
        return data or b""


@dataclass(frozen=True, slots=True)
class Claim:
    """One work-stream entry this replica holds: ``entry`` (the stream id), the job's id, and
    ``deliveries`` (how many times the entry has been handed out, this one included)."""

    entry: str
    job_id: str
    deliveries: int


class RedisJobs:
    """The Redis side of the job store and queue for one replica (``replica`` names it: the
    consumer name in the group, and the ``replica`` of its attempts)."""

    def __init__(
        self, url: str, replica: str, *, retention_s: float, lease_s: float, max_attempts: int
    ) -> None:
        # Any: redis-py's reply types are unions over RESP2/RESP3 that every call narrows.
        # A pooled connection that Redis closed (a restart) is retried on a new one.
        self.redis: Any = aioredis.Redis.from_url(
            url,
            socket_timeout=None,
            socket_connect_timeout=5,
            health_check_interval=10,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self.replica = replica
        self._emit = self.redis.register_script(EMIT)
        self._take_end = self.redis.register_script(TAKE_END)
        self._create = self.redis.register_script(CREATE)
        self._begin_attempt = self.redis.register_script(BEGIN_ATTEMPT)
        self.retention_s = retention_s
        self.lease_s = lease_s
        self.max_attempts = max_attempts

    @property
    def _ttl(self) -> int:
        return max(1, int(self.retention_s))

    async def ensure_group(self) -> None:
        """Create the work stream and its consumer group when missing."""
        try:
            await self.redis.xgroup_create(WORK, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

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
        trace: str | None = None,
    ) -> tuple[JobView, bool]:
        """Store a new job (``view`` its first body, ``request`` its ``/prompt`` JSON,
        ``after`` its adapter's after-end action, ``trace`` the traceparent its run
        continues) and append it to the work stream; returns
        (the stored view, created). An id already kept
        with the same ``fingerprint`` returns that job (created False); another fingerprint
        raises :class:`~comfy_sidecar.jobs.model.DifferentBody`."""
        job_id = view.id
        key = job_key(job_id)
        if not await self.redis.hsetnx(key, "fingerprint", fingerprint):
            kept = await self.redis.hget(key, "fingerprint")
            if kept != fingerprint or not fingerprint:
                raise DifferentBody(job_id)
            existing = await self.get(job_id)
            if existing is not None:
                return existing, False
        await self._create(
            keys=[key, INDEX, ORDER, events_key(job_id), WORK],
            args=[
                job_id,
                msgspec.json.encode(view),
                request,
                EVENTS_MAX,
                msgspec.json.encode({"status": view.status}),
                after or b"",
                trace or "",
            ],
        )
        return view, True

    async def position(self, job_id: str) -> int | None:
        """How many jobs wait in the work stream ahead of job ``job_id`` (0: it is next), or
        None once a replica has claimed it (or it is not in the stream). Counts the entries
        between the group's last delivered one and the job's (XRANGE, at most
        :data:`POSITION_MAX`)."""
        entry: bytes | None = await self.redis.hget(job_key(job_id), "entry")
        if entry is None:
            return None
        last = await self._last_delivered()
        if _stream_id(entry) <= _stream_id(last):
            return None
        ahead = await self.redis.xrange(WORK, min=b"(" + last, max=b"(" + entry, count=POSITION_MAX)
        return len(ahead)

    async def waiting(self) -> int:
        """How many jobs wait in the work stream, not yet claimed by any replica (the entries
        after the group's last delivered one, counted with XRANGE, at most
        :data:`POSITION_MAX`; 0 before the stream exists)."""
        try:
            last = await self._last_delivered()
        except ResponseError:  # no stream yet: no replica has started
            return 0
        ahead = await self.redis.xrange(WORK, min=b"(" + last, max="+", count=POSITION_MAX)
        return len(ahead)

    async def _last_delivered(self) -> bytes:
        """The id of the work-stream entry last handed to a replica (``0-0``: none yet)."""
        last: bytes = b"0-0"
        for group in await self.redis.xinfo_groups(WORK):
            if group["name"] in (GROUP, GROUP.encode()):
                last = group["last-delivered-id"]
        return last

    async def get(self, job_id: str) -> JobView | None:
        """Job ``job_id``'s view, or None when it is not kept."""
        raw = await self.redis.hget(job_key(job_id), "view")
        return None if raw is None else decode_view(raw)

    async def request(self, job_id: str) -> bytes | None:
        """Job ``job_id``'s ``/prompt`` body (JSON), or None."""
        raw: bytes | None = await self.redis.hget(job_key(job_id), "request")
        return raw

    async def load(self, job_id: str) -> Loaded:
        """What a replica reads of job ``job_id`` when it claims it, in one round trip (see
        :class:`Loaded`)."""
        fields = ["request", "attempts", "view", "after", "fingerprint", "trace"]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(done_key(job_id))
            pipe.hmget(job_key(job_id), fields)
            done, (request, attempts, view, after, fingerprint, trace) = await pipe.execute()
        return Loaded(
            ended=bool(done) or (request is None and view is None),
            request=request,
            attempts=msgspec.json.decode(attempts) if attempts else [],
            view=decode_view(view) if view is not None else None,
            after=after or None,
            fingerprint=fingerprint or b"",
            trace=trace.decode("ascii", "replace") if trace else None,
        )

    async def after(self, job_id: str) -> bytes | None:
        """Job ``job_id``'s after-end action (JSON, see
        :class:`comfy_sidecar.jobs.spec.AfterEnd`), or None when its adapter stored none."""
        raw: bytes | None = await self.redis.hget(job_key(job_id), "after")
        return raw

    async def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """Job ``job_id``'s attempts so far: ``[{replica, started_at}]``."""
        raw = await self.redis.hget(job_key(job_id), "attempts")
        found: list[dict[str, Any]] = msgspec.json.decode(raw) if raw else []
        return found

    async def begin_attempt(self, job_id: str) -> list[dict[str, Any]]:
        """Record that this replica starts a run of ``job_id``; returns every attempt."""
        attempt = {"replica": self.replica, "started_at": iso(now_ms())}
        raw = await self._begin_attempt(keys=[job_key(job_id)], args=[msgspec.json.encode(attempt)])
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
        outputs: Sequence[Path] = (),
        token: str | None = None,
    ) -> bool:
        """End job ``job_id`` with its final body ``view`` (and the files ``outputs``, kept
        inline), once: the holder of the end (:meth:`take_end` with ``token``; without one a
        fresh claim is tried) writes it and returns True; everyone else writes nothing and
        returns False. Every key of the job then expires after the retention. Each output is
        streamed in (SET, then APPEND of :data:`CHUNK` bytes at a time: never read whole),
        then one transaction writes the body, the ``done`` event and the expiries."""
        if not await self.take_end(job_id, token or f"{self.replica}:{uuid.uuid4().hex}"):
            return False
        for index, path in enumerate(outputs):
            await self._write_output(output_key(job_id, index), path)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job_id), "view", msgspec.json.encode(view))
            pipe.expire(done_key(job_id), self._ttl)
            # EVAL, not EVALSHA: a script in a pipeline costs redis-py a SCRIPT EXISTS first.
            emit_keys = self._emit_keys(job_id)
            pipe.eval(EMIT, len(emit_keys), *emit_keys, *self._emit_args([("done", view)], None))
            pipe.expire(job_key(job_id), self._ttl)
            pipe.expire(events_key(job_id), self._ttl)
            await pipe.execute()
        return True

    async def _write_output(self, key: str, path: Path) -> None:
        """Stream the file ``path`` into the string ``key`` (expiring with the job), a chunk
        of at most :data:`CHUNK` bytes per round trip, read off the event loop."""
        first = True
        with path.open("rb") as handle:
            while True:
                chunk = await asyncio.to_thread(handle.read, CHUNK)
                if first:
                    await self.redis.set(key, chunk, ex=self._ttl)
                    first = False
                elif chunk:
                    await self.redis.append(key, chunk)
                if len(chunk) < CHUNK:
                    return

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
        self, status: JobStatus | None, limit: int, cursor: int | None
    ) -> tuple[list[JobView], int | None]:
        """Newest first: up to ``limit`` job bodies (with ``status``, when given) submitted
        before ``cursor`` (a submission number from a previous page); (bodies, next cursor)."""
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
                if status is None or view.status is status:
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

    async def cancels(self) -> AsyncIterator[str]:
        """Job ids whose cancel was asked on any replica (pub/sub), as they come. Raises
        when the connection is lost (subscribe again then)."""
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(CANCEL)
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    yield message["data"].decode()
        finally:
            await pubsub.aclose()

    # --- the work stream ------------------------------------------------------------------

    async def claim(self, block_s: float) -> Claim | None:
        """One job for this replica: first one whose holder stopped heartbeating for
        ``lease_s`` (XAUTOCLAIM), else a new one (XREADGROUP, waiting up to ``block_s``)."""
        reclaimed = await self.redis.xautoclaim(
            WORK, GROUP, self.replica, int(self.lease_s * 1000), "0-0", count=1
        )
        for entry, fields in reclaimed[1]:
            if fields:
                return await self._with_deliveries(entry, fields)
            await self.redis.xack(WORK, GROUP, entry)  # its entry was trimmed away
        answer = await self.redis.xreadgroup(
            GROUP, self.replica, {WORK: ">"}, count=1, block=max(1, int(block_s * 1000))
        )
        if not answer or not answer[0][1]:
            return None
        entry, fields = answer[0][1][0]
        return Claim(entry.decode(), fields[b"id"].decode(), 1)

    async def _with_deliveries(self, entry: bytes, fields: dict[bytes, bytes]) -> Claim:
        detail = await self.redis.xpending_range(WORK, GROUP, min=entry, max=entry, count=1)
        deliveries = int(detail[0]["times_delivered"]) if detail else 1
        return Claim(entry.decode(), fields[b"id"].decode(), deliveries)

    async def heartbeat(self, entries: list[str]) -> list[str]:
        """Renew this replica's lease on those of ``entries`` it still holds (their idle time
        restarts); returns the others: taken over by another replica after this one went
        silent past ``lease_s`` (or ended and gone). Those are not claimed back, so a replica
        that comes back from a pause does not snatch a job from the one now running it."""
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.xpending_range(WORK, GROUP, min=entry, max=entry, count=1)
            details = await pipe.execute()
        held: list[str] = []
        lost: list[str] = []
        for entry, detail in zip(entries, details, strict=True):
            owner = detail[0]["consumer"] if detail else None
            mine = owner in (self.replica, self.replica.encode())
            (held if mine else lost).append(entry)
        if held:
            await self.redis.xclaim(WORK, GROUP, self.replica, 0, held, justid=True)
        return lost

    async def release(self, entry: str, job_id: str | None = None) -> None:
        """Give ``entry`` back at once (claimed, not started): its idle time is set past any
        lease, so another replica takes it at its next claim (XAUTOCLAIM). With ``job_id``,
        this replica's last attempt at it is struck from its attempts (it ran nothing, so
        it is neither listed nor counted against ``max_attempts``)."""
        if job_id is not None:
            found = await self.attempts(job_id)
            mine = [i for i, a in enumerate(found) if a["replica"] == self.replica]
            if mine:
                del found[mine[-1]]
                await self.redis.hset(job_key(job_id), "attempts", msgspec.json.encode(found))
        await self.redis.xclaim(WORK, GROUP, self.replica, 0, [entry], idle=10**9, justid=True)

    async def ack(self, entry: str) -> None:
        """The job of ``entry`` has ended: drop it from the work stream."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(WORK, GROUP, entry)
            pipe.xdel(WORK, entry)
            await pipe.execute()
