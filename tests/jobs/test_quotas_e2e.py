"""Per-key quotas, priorities and job ownership end to end (issue 23, section 3): sidecars in front
of the ComfyUI double with a YAML API_KEYS_FILE, in-process and in queue mode (JOB_QUEUE_URL) with
one and two replicas on a real redis-server. Jobs are held running with slow prompts while the
test counts; every wait is on a condition."""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Backend, Sidecar, basic_prompt, slow_prompt
from tests.redis_server import REDIS_SERVER, RedisServer
from tests.waiting import wait_for

KEYS = {
    "team-a": "alpha-key-0123456789abcdef",
    "team-b": "beta-key-0123456789abcdef",
    "team-q": "queue-key-0123456789abcdef",
    "team-m": "minute-key-0123456789abcdef",
    "low": "low-key-0123456789abcdef",
    "high": "high-key-0123456789abcdef",
}
KEY_FILE = f"""\
# quotas and priorities by key name
keys:
  - key: {KEYS["team-a"]}
    name: team-a
    max_concurrent_jobs: 2
  - key: {KEYS["team-b"]}
    name: team-b
  - key: {KEYS["team-q"]}
    name: team-q
    max_queue: 1
  - key: {KEYS["team-m"]}
    name: team-m
    jobs_per_minute: 2
  - key: {KEYS["low"]}
    name: low
  - key: {KEYS["high"]}
    name: high
    priority: 10
"""

MODES = ["local", "queue-1", "queue-2"]


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, spawn: Callable[..., Sidecar], tmp_path: Path
) -> Iterator[Callable[..., list[Sidecar]]]:
    """``cluster(mode, **env)``: ready sidecars sharing one key file: one in-process
    (``local``), or one or two replicas on a redis-server (``queue-1``, ``queue-2``)."""
    servers: list[RedisServer] = []

    def start(mode: str, **env: str) -> list[Sidecar]:
        key_file = tmp_path / "keys.yaml"
        key_file.write_text(KEY_FILE)
        settings = {"API_KEYS_FILE": str(key_file), **env}
        count = 1
        if mode != "local":
            if REDIS_SERVER is None:
                pytest.skip("redis-server is not installed (apt-get install redis-server)")
            server = RedisServer(tmp_path / "redis")
            server.start()
            servers.append(server)
            settings |= {"JOB_QUEUE_URL": server.url, "JOB_LEASE_S": "2"}
            count = int(mode.split("-")[1])
        started = [
            spawn(Backend("double", tmp_path / f"comfy{i}"), SHUTDOWN_GRACE_S="5", **settings)
            for i in range(count)
        ]
        for sidecar in started:
            sidecar.wait_ready()
        return started

    yield start
    for server in servers:
        server.stop()


def as_key(name: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[name]}


def submit(
    sidecar: Sidecar, key: str, prompt: dict[str, Any], path: str = "/jobs"
) -> httpx.Response:
    return httpx.post(sidecar.url + path, json={"prompt": prompt}, headers=as_key(key), timeout=60)


def accepted(response: httpx.Response) -> str:
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def view(sidecar: Sidecar, key: str, job_id: str, wait: float = 0) -> dict[str, Any]:
    response = sidecar.get(
        f"/jobs/{job_id}", params={"wait": wait}, headers=as_key(key), timeout=wait + 10
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_rate_limited(response: httpx.Response, key: str, reason: str) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["key"] == key and body["reason"] == reason, body
    assert int(response.headers["retry-after"]) == body["retry_after_s"] >= 1
    assert key in body["error"] and reason in body["error"]
    for secret in KEYS.values():
        assert secret not in response.text


@pytest.mark.sidecar_process  # reads the comfyui_key_* counters, process-wide
@pytest.mark.parametrize("mode", MODES)
def test_exactly_n_concurrent_jobs_for_a_key_and_the_others_429(
    cluster: Callable[..., list[Sidecar]], mode: str
) -> None:
    """team-a has max_concurrent_jobs 2: of six slow jobs submitted at once (to every replica),
    exactly two are taken and four answer 429 naming the reason; a /prompt of team-a is refused
    too while they run, another key is not; once they end (on whichever replica ran them),
    team-a submits again, and a cancelled job gives its place back at once."""
    sidecars = cluster(mode)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda n: submit(sidecars[n % len(sidecars)], "team-a", slow_prompt(2, 2048)),
                range(6),
            )
        )
    taken = [accepted(a) for a in answers if a.status_code == 202]
    refused = [a for a in answers if a.status_code != 202]
    assert len(taken) == 2 and len(refused) == 4, [a.status_code for a in answers]
    for answer in refused:
        assert_rate_limited(answer, "team-a", "max_concurrent_jobs")
        assert answer.headers["retry-after"] == "1"
    # A sync /prompt is a job of its key too (it runs on the replica that takes it).
    prompt = submit(sidecars[-1], "team-a", basic_prompt(batch=1), path="/prompt")
    assert_rate_limited(prompt, "team-a", "max_concurrent_jobs")
    # Another key has its own count.
    other = accepted(submit(sidecars[0], "team-b", basic_prompt(batch=1)))
    ended = [view(sidecars[-1], "team-a", job_id, wait=60) for job_id in taken]
    assert [v["status"] for v in ended] == ["completed", "completed"], ended
    assert all(v["owner"] == "team-a" for v in ended)
    # JOBS_VISIBLE_TO=all (the default): one team, every key reads every job.
    assert view(sidecars[0], "team-b", taken[0])["owner"] == "team-a"
    assert view(sidecars[0], "team-b", other, wait=60)["status"] == "completed"
    # Their places were given back: two more are taken, the third is refused.
    again = [
        accepted(submit(sidecars[n % len(sidecars)], "team-a", slow_prompt(2, 2048)))
        for n in range(2)
    ]
    assert_rate_limited(
        submit(sidecars[0], "team-a", basic_prompt(batch=1)), "team-a", "max_concurrent_jobs"
    )
    cancelled = sidecars[-1].post(f"/jobs/{again[1]}/cancel", headers=as_key("team-a"))
    assert cancelled.status_code == 200 and cancelled.json()["cancelled"], cancelled.text
    accepted(submit(sidecars[0], "team-a", basic_prompt(batch=1)))
    # Metrics name the key, never the key itself.
    exposition = "".join(s.get("/metrics").text for s in sidecars)
    rejections = sum(
        float(value)
        for value in re.findall(
            r'^comfyui_key_rejections_total\{key="team-a",reason="max_concurrent_jobs"\} (\S+)$',
            exposition,
            re.MULTILINE,
        )
    )
    assert rejections == 6.0, exposition
    assert re.search(
        r'^comfyui_key_jobs_total\{key="team-b",status="completed"\} 1\.0$', exposition, re.M
    )
    for secret in KEYS.values():
        assert secret not in exposition
    view(sidecars[0], "team-a", again[0], wait=60)


@pytest.mark.parametrize("mode", MODES)
def test_a_higher_priority_overtakes_the_queued_jobs_of_a_lower_one(
    cluster: Callable[..., list[Sidecar]], mode: str
) -> None:
    """Every slot (one per replica) runs a long job; three jobs of `low` (priority 0) wait,
    then one of `high` (priority 10) arrives: it is next in the queue and starts before every
    queued `low` job; the `low` ones keep their order."""
    sidecars = cluster(mode, MAX_JOBS_PER_INSTANCE="1")
    fillers = [accepted(submit(s, "low", slow_prompt(4, 2048))) for s in sidecars]
    wait_for(
        lambda: all(view(sidecars[0], "low", f)["status"] == "in_progress" for f in fillers),
        timeout=60,
        interval=0.05,
        what="every slot to run a long job",
    )
    lows = [
        accepted(submit(sidecars[n % len(sidecars)], "low", slow_prompt(1, 512))) for n in range(3)
    ]
    high = accepted(submit(sidecars[-1], "high", slow_prompt(1, 512)))
    waiting = [view(sidecars[0], "low", j)["queue_position"] for j in (high, *lows)]
    assert waiting == [0, 1, 2, 3], waiting
    ended = {j: view(sidecars[0], "low", j, wait=60) for j in (high, *lows)}
    assert all(v["status"] == "completed" for v in ended.values()), ended
    started = {j: v["started_at"] for j, v in ended.items()}
    assert all(started[high] < started[low] for low in lows), started
    if len(sidecars) == 1:  # one slot: the low ones ran one after another, in their order
        assert [started[low] for low in lows] == sorted(started[low] for low in lows)


@pytest.mark.parametrize("mode", ["local", "queue-1"])
def test_with_jobs_visible_to_owner_a_key_sees_only_its_own_jobs(
    cluster: Callable[..., list[Sidecar]], mode: str
) -> None:
    """JOBS_VISIBLE_TO=owner: team-b gets 404 for team-a's job on every job route (GET, long
    poll, events, outputs, cancel, the Modal adapter's GET and cancel, /interrupt) and lists only
    its own; team-a sees its job, owner named."""
    sidecar = cluster(mode, JOBS_VISIBLE_TO="owner")[0]
    mine = accepted(submit(sidecar, "team-a", basic_prompt(batch=1)))
    theirs = accepted(submit(sidecar, "team-b", basic_prompt(batch=1)))
    done = view(sidecar, "team-a", mine, wait=60)
    assert done["status"] == "completed" and done["owner"] == "team-a"
    assert view(sidecar, "team-b", theirs, wait=60)["owner"] == "team-b"
    b = as_key("team-b")
    for method, path in (
        ("GET", f"/jobs/{mine}"),
        ("GET", f"/jobs/{mine}?wait=1"),
        ("GET", f"/jobs/{mine}/events"),
        ("GET", f"/jobs/{mine}/outputs/0"),
        ("POST", f"/jobs/{mine}/cancel"),
        ("DELETE", f"/jobs/{mine}"),
        ("GET", f"/v1/jobs/{mine}"),
        ("DELETE", f"/v1/jobs/{mine}"),
        ("GET", f"/result/{mine}"),
    ):
        response = sidecar.client.request(method, sidecar.url + path, headers=b)
        assert response.status_code == 404, (method, path, response.text)
    assert sidecar.get(f"/jobs/{mine}/outputs/0", headers=as_key("team-a")).status_code == 200
    listed = {
        key: [j["id"] for j in sidecar.get("/jobs", headers=as_key(key)).json()["jobs"]]
        for key in ("team-a", "team-b", "low")
    }
    assert listed == {"team-a": [mine], "team-b": [theirs], "low": []}
    # /interrupt: another key's running job is not found (its own is interrupted).
    running = accepted(submit(sidecar, "team-a", slow_prompt(3, 2048)))
    wait_for(
        lambda: view(sidecar, "team-a", running)["status"] == "in_progress",
        timeout=30,
        interval=0.05,
        what="the job to run",
    )
    if mode == "local":  # the comfyui-api route: jobs of this process
        refused = sidecar.post("/interrupt", json={"id": running}, headers=b)
        assert refused.status_code == 404 and refused.json()["interrupted"] == "failed"
    stopped = sidecar.post(f"/jobs/{running}/cancel", headers=as_key("team-a"))
    assert stopped.status_code == 200 and stopped.json()["cancelled"], stopped.text


def test_max_queue_and_jobs_per_minute(cluster: Callable[..., list[Sidecar]]) -> None:
    """team-q may have one job waiting: with the only slot busy, its second job waits and its
    third is refused (max_queue); team-m may submit two jobs a minute: the third is refused
    with Retry-After until the first leaves the window."""
    sidecar = cluster("local", MAX_JOBS_PER_INSTANCE="1")[0]
    first = accepted(submit(sidecar, "team-q", slow_prompt(3, 2048)))
    wait_for(
        lambda: view(sidecar, "team-q", first)["status"] == "in_progress",
        timeout=30,
        interval=0.05,
        what="the first job to run (it no longer waits)",
    )
    second = accepted(submit(sidecar, "team-q", basic_prompt(batch=1)))
    assert view(sidecar, "team-q", second)["status"] == "pending"
    assert_rate_limited(submit(sidecar, "team-q", basic_prompt(batch=1)), "team-q", "max_queue")
    for _ in range(2):
        accepted(submit(sidecar, "team-m", basic_prompt(batch=1)))
    refused = submit(sidecar, "team-m", basic_prompt(batch=1), path="/prompt")
    assert_rate_limited(refused, "team-m", "jobs_per_minute")
    assert 1 <= refused.json()["retry_after_s"] <= 60
    assert view(sidecar, "team-q", second, wait=60)["status"] == "completed"


def test_a_comfy_api_v2_job_is_admitted_and_owned_by_its_key(
    cluster: Callable[..., list[Sidecar]],
) -> None:
    """POST /api/v2/jobs goes through the key's quotas as POST /jobs does (team-m: two a
    minute, the third 429 ``rate_limited`` in the v2 envelope with Retry-After) and the job
    records its key's name (its /jobs view's ``owner``); JOBS_VISIBLE_TO=owner hides it from
    another key on the v2 routes too."""
    sidecar = cluster("local", JOBS_VISIBLE_TO="owner")[0]
    m = as_key("team-m")

    def v2_submit() -> httpx.Response:
        return sidecar.post("/api/v2/jobs", json={"workflow": basic_prompt(batch=1)}, headers=m)

    made = [v2_submit() for _ in range(2)]
    assert [r.status_code for r in made] == [201, 201], [r.text for r in made]
    refused = v2_submit()
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    job_id = made[0].json()["id"]
    assert view(sidecar, "team-m", job_id, wait=60)["owner"] == "team-m"
    b = as_key("team-b")
    assert sidecar.get(f"/api/v2/jobs/{job_id}", headers=b).status_code == 404
    assert sidecar.get(f"/api/v2/jobs/{job_id}", headers=m).json()["status"] == "succeeded"
    assert sidecar.get("/api/v2/jobs", headers=b).json()["jobs"] == []
