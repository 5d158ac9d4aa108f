"""API keys (issue 14): API_KEYS / API_KEYS_FILE, Bearer or X-API-Key, 401 before the body is
read, SIGHUP re-reads the file, probes and docs open, keys never logged, the OpenAPI document
declares the schemes. Against a sidecar in front of the ComfyUI double."""

from __future__ import annotations

import hmac
import re
import signal
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.config import ConfigError, load_settings
from comfy_sidecar.config.keys import KeyPolicy, parse_key_file
from comfy_sidecar.config.parsers import parse_keys
from comfy_sidecar.http.apikeys import ApiKeys
from comfy_sidecar.http.auth import METRICS_PATH, OPEN_PATHS, open_paths, presented_keys
from tests.conftest import Backend, Sidecar, basic_prompt, make_sidecar
from tests.waiting import wait_for

# Subprocess sidecars: the module shares one sidecar, which a test SIGHUPs.
pytestmark = pytest.mark.sidecar_process

STATIC_KEY = "static-key-0123456789"
FILE_KEY = "file-key-abcdefghij"
NEW_FILE_KEY = "rotated-key-zyxwvu"
WRONG_KEY = "wrong-key-never-valid"
ALL_KEYS = (STATIC_KEY, FILE_KEY, NEW_FILE_KEY, WRONG_KEY)


# --- units ------------------------------------------------------------------------------------


def test_key_file_lines() -> None:
    text = "# keys for prod\n\n  one  \n#two\nthree\n   \n"
    assert parse_keys(text) == ["one", "three"]


def test_every_key_is_compared_without_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ApiKeys(["a", "b", "c"])
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(x: bytes, y: bytes) -> bool:
        calls.append(1)
        return real(x, y)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert keys.check("a")  # the first key matches; the other two are still compared
    assert len(calls) == 3
    assert not keys.check("d")
    assert not keys.check("")
    assert len(calls) == 9


def test_presented_keys() -> None:
    from litestar.datastructures import Headers

    assert presented_keys(Headers({"Authorization": "Bearer k1"})) == ["k1"]
    assert presented_keys(Headers({"authorization": "bearer  k1 "})) == ["k1"]
    assert presented_keys(Headers({"Authorization": "Basic dXNlcjpwdw=="})) == []
    assert presented_keys(Headers({"X-API-Key": "k2"})) == ["k2"]
    both = Headers({"Authorization": "Bearer k1", "X-API-Key": "k2"})
    assert presented_keys(both) == ["k1", "k2"]


def test_metrics_open_unless_required() -> None:
    assert open_paths(load_settings({})) == OPEN_PATHS | {METRICS_PATH}
    assert open_paths(load_settings({"METRICS_REQUIRE_AUTH": "true"})) == OPEN_PATHS


def test_key_file_must_be_readable_and_hold_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^API_KEYS_FILE: .*No such file"):
        load_settings({"API_KEYS_FILE": str(tmp_path / "missing")})
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match=r"^API_KEYS_FILE: .*holds no keys"):
        load_settings({"API_KEYS_FILE": str(empty)})
    good = tmp_path / "good"
    good.write_text("k\n")
    assert load_settings({"API_KEYS_FILE": str(good), "API_KEYS": "a, b"}).api_keys == ["a", "b"]


YAML_KEYS = """\
# team keys
keys:
  - key: alpha-key-0123456789
    name: team-a
    max_concurrent_jobs: 2
    jobs_per_minute: 30
    max_queue: 1
    priority: 10
  - key: beta-key-0123456789
    name: team-b
  - key: beta-key-rotated-98765
    name: team-b
"""


def test_a_yaml_key_file_names_each_key_with_its_quotas(tmp_path: Path) -> None:
    entries = parse_key_file(YAML_KEYS)
    assert entries == [
        (
            "alpha-key-0123456789",
            KeyPolicy(
                name="team-a", max_concurrent_jobs=2, jobs_per_minute=30, max_queue=1, priority=10
            ),
        ),
        ("beta-key-0123456789", KeyPolicy(name="team-b")),
        ("beta-key-rotated-98765", KeyPolicy(name="team-b")),  # a rotation: one name, two keys
    ]
    # The same entries as a top-level list.
    listed = textwrap.dedent("\n".join(YAML_KEYS.splitlines()[2:]))
    assert parse_key_file(listed) == entries
    # The plain list keeps working; its keys (and API_KEYS') are named by position.
    assert parse_key_file("# plain\nk1\nk2\nk1\n") == [
        ("k1", KeyPolicy(name="file-1")),
        ("k2", KeyPolicy(name="file-2")),
    ]
    path = tmp_path / "keys.yaml"
    path.write_text(YAML_KEYS)
    keys = ApiKeys(["env-key-one"], str(path))
    assert keys.identify("alpha-key-0123456789") == entries[0][1]
    assert keys.identify("beta-key-rotated-98765") == KeyPolicy(name="team-b")
    assert keys.identify("env-key-one") == KeyPolicy(name="env-1")
    assert keys.identify("nope") is None
    assert keys.names == ["env-1", "team-a", "team-b"]
    assert load_settings({"API_KEYS_FILE": str(path)}).api_keys_file == str(path)


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ("max_concurrent_jobs: 0", r"keys\[1\]\.max_concurrent_jobs: must be a whole number >= 1"),
        ("jobs_per_minute: -3", r"keys\[1\]\.jobs_per_minute: must be a whole number >= 1"),
        ("max_queue: 2.5", r"keys\[1\]\.max_queue: must be a whole number >= 1"),
        ("max_queue: true", r"keys\[1\]\.max_queue: must be a whole number >= 1"),
        ("priority: high", r"keys\[1\]\.priority: must be a whole number from -1000 to 1000"),
        ("max_jobs: 3", r"keys\[1\]: unknown field 'max_jobs'"),
        ("name: two words", r"keys\[1\]\.name: must be 1-64 letters"),
        ("name: anonymous", r"keys\[1\]\.name: 'anonymous' is reserved"),
        ("name: team-a\n    max_queue: 5", r"name 'team-a' is given twice with different quotas"),
        ("name: [x", r"not valid YAML \(line \d+\)"),
    ],
)
def test_a_bad_yaml_value_stops_the_start_naming_the_entry(
    tmp_path: Path, entry: str, error: str
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        "keys:\n  - key: alpha-key-0123456789\n    name: team-a\n"
        f"  - key: second-key-0123456789\n    {entry}\n"
    )
    if "name:" not in entry:
        path.write_text(path.read_text() + "    name: team-b\n")
    with pytest.raises(ConfigError, match=r"^API_KEYS_FILE: " + error) as raised:
        load_settings({"API_KEYS_FILE": str(path)})
    assert "\n" not in str(raised.value)
    assert "key-0123456789" not in str(raised.value), "no key in the message"


def test_a_key_listed_twice_or_missing_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {key: k1, name: a}\n  - {key: k1, name: b}\n")
    with pytest.raises(ConfigError, match=r"^API_KEYS_FILE: keys\[1\]\.key: the same key"):
        load_settings({"API_KEYS_FILE": str(path)})
    path.write_text("keys:\n  - {name: a}\n")
    with pytest.raises(ConfigError, match=r"^API_KEYS_FILE: keys\[0\]\.key: must be a non-empty"):
        load_settings({"API_KEYS_FILE": str(path)})
    path.write_text("keys: []\n")
    with pytest.raises(ConfigError, match=r"^API_KEYS_FILE: .*holds no keys"):
        load_settings({"API_KEYS_FILE": str(path)})
    # API_KEYS' names take part: a YAML name env-1 with quotas collides with API_KEYS' first.
    path.write_text("keys:\n  - {key: k1, name: env-1, max_queue: 2}\n")
    with pytest.raises(ConfigError, match=r"^API_KEYS_FILE: name 'env-1' is given twice"):
        load_settings({"API_KEYS_FILE": str(path), "API_KEYS": "k0"})


def test_a_reload_with_a_bad_value_keeps_the_keys_in_use(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(YAML_KEYS)
    keys = ApiKeys([], str(path))
    path.write_text("keys:\n  - {key: fresh-key-0123456789, name: team-c, jobs_per_minute: 0}\n")
    with caplog.at_level("ERROR", logger="comfy_sidecar.auth"):
        assert not keys.reload()
    assert "keys[0].jobs_per_minute: must be a whole number >= 1" in caplog.text
    assert "keeping the 3 keys in use" in caplog.text
    assert keys.identify("alpha-key-0123456789") is not None
    assert keys.identify("fresh-key-0123456789") is None
    path.write_text("keys:\n  - {key: fresh-key-0123456789, name: team-c, jobs_per_minute: 5}\n")
    assert keys.reload()
    assert keys.identify("fresh-key-0123456789") == KeyPolicy(name="team-c", jobs_per_minute=5)
    assert keys.identify("alpha-key-0123456789") is None
    assert "0123456789" not in caplog.text


# --- a sidecar with keys ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sidecar, Path]]:
    tmp = tmp_path_factory.mktemp("auth")
    key_file = tmp / "keys.txt"
    key_file.write_text(f"# operator keys\n\n{FILE_KEY}\n")
    sidecar = make_sidecar(
        Backend("double", tmp / "comfy"),
        tmp,
        API_KEYS=f"{STATIC_KEY}, ",
        API_KEYS_FILE=str(key_file),
        LOG_LEVEL="debug",
    )
    sidecar.start()
    try:
        sidecar.wait_ready()
        yield sidecar, key_file
    finally:
        sidecar.stop()


def _assert_refused(response: Any) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    body = response.json()
    if response.url.path.startswith("/api/v2/"):  # the Comfy API v2 envelope
        assert body["error"]["code"] == "unauthorized"
        body = {"error": body["error"]["message"], **body["error"]["details"]}
    assert body["location"] == "authorization"
    assert body["error"]
    for key in ALL_KEYS:
        assert key not in response.text


def test_probes_and_docs_need_no_key(keyed: tuple[Sidecar, Path]) -> None:
    sidecar, _ = keyed
    for path in ("/health", "/ready", "/docs", "/openapi.json", "/docs/openapi.json"):
        assert sidecar.get(path).status_code == 200, path
    assert sidecar.get("/docs/assets/swagger-ui.css").status_code == 200


def test_every_documented_route_but_the_probes_needs_a_key(keyed: tuple[Sidecar, Path]) -> None:
    sidecar, _ = keyed
    document = sidecar.get("/openapi.json").json()
    checked = 0
    for path, item in document["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "1", path)  # "1" fits str and int path parameters
        for method in item:
            if method not in ("get", "post", "put", "delete", "patch"):
                continue
            response = sidecar.client.request(method.upper(), sidecar.url + concrete, json={})
            if path in OPEN_PATHS | {METRICS_PATH}:  # /metrics: open by default
                assert response.status_code != 401, path
                continue
            _assert_refused(response)
            wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
            _assert_refused(
                sidecar.client.request(
                    method.upper(), sidecar.url + concrete, json={}, headers=wrong
                )
            )
            checked += 1
    assert checked >= 4  # /prompt, /interrupt, /download, /models at least


def test_either_header_with_a_valid_key_is_accepted(keyed: tuple[Sidecar, Path]) -> None:
    sidecar, _ = keyed
    for headers in (
        {"Authorization": f"Bearer {STATIC_KEY}"},
        {"authorization": f"bearer {FILE_KEY}"},
        {"X-API-Key": FILE_KEY},
        {"Authorization": f"Bearer {WRONG_KEY}", "X-API-Key": STATIC_KEY},
    ):
        response = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)}, headers=headers)
        assert response.status_code == 200, (headers, response.text)
        assert response.json()["images"]


def test_refused_before_the_body_is_read(keyed: tuple[Sidecar, Path]) -> None:
    """Headers announce 50 MB and no byte of it is sent: the 401 comes anyway."""
    sidecar, _ = keyed
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        sock.sendall(
            b"POST /prompt HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000000\r\n\r\n"
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_openapi_declares_the_schemes(keyed: tuple[Sidecar, Path]) -> None:
    sidecar, _ = keyed
    document = sidecar.get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["BearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <API key>`",
    }
    assert schemes["ApiKeyAuth"]["in"] == "header"
    assert schemes["ApiKeyAuth"]["name"] == "X-API-Key"
    paths = document["paths"]
    assert paths["/prompt"]["post"]["security"] == [{"BearerAuth": []}, {"ApiKeyAuth": []}]
    assert "security" not in paths["/health"]["get"]
    assert "security" not in paths["/ready"]["get"]


def test_sighup_rereads_the_key_file(keyed: tuple[Sidecar, Path]) -> None:
    sidecar, key_file = keyed
    assert sidecar.proc is not None

    def status(key: str) -> int:
        return sidecar.get("/models", headers={"X-API-Key": key}).status_code

    assert status(FILE_KEY) != 401
    assert status(NEW_FILE_KEY) == 401
    key_file.write_text(f"{NEW_FILE_KEY}\n")
    sidecar.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: status(NEW_FILE_KEY) != 401, timeout=10, what="the new key to work")
    assert status(FILE_KEY) == 401
    assert status(STATIC_KEY) != 401  # API_KEYS stay
    # A file with no keys left is refused: the keys in use stay (the API never opens).
    key_file.write_text("# all revoked\n")
    sidecar.proc.send_signal(signal.SIGHUP)
    wait_for(
        lambda: "API_KEYS_FILE" in sidecar.log() and "holds no keys" in sidecar.log(),
        timeout=10,
        what="the refused reload to be logged",
    )
    assert status(NEW_FILE_KEY) != 401
    assert sidecar.get("/models").status_code == 401


def test_keys_are_never_logged(keyed: tuple[Sidecar, Path]) -> None:
    sidecar, _ = keyed
    sidecar.get("/models", headers={"Authorization": f"Bearer {WRONG_KEY}"})
    sidecar.post("/prompt", json={}, headers={"X-API-Key": WRONG_KEY})
    log = sidecar.log()
    assert "API keys required (2 configured)" in log
    for key in ALL_KEYS:
        assert key not in log


# --- no keys ----------------------------------------------------------------------------------


def test_without_keys_the_api_is_open_with_one_warning(tmp_path: Path) -> None:
    sidecar = make_sidecar(Backend("double", tmp_path / "comfy"), tmp_path)
    sidecar.start()
    try:
        sidecar.wait_ready()
        response = sidecar.post("/prompt", json={"prompt": basic_prompt(batch=1)})
        assert response.status_code == 200, response.text
        assert "securitySchemes" not in sidecar.get("/openapi.json").json()["components"]
        assert sidecar.log().count("API_KEYS and API_KEYS_FILE are not set") == 1
    finally:
        sidecar.stop()
