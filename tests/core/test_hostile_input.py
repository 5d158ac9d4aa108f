"""What an outside probe sent to /prompt (issue 13, findings 1-4), end to end against the
ComfyUI double and (with COMFY_HOME) a real ComfyUI: each is a 400 naming the field, decided
before anything is queued, with no server path in the message; ComfyUI keeps working after."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest

from tests.conftest import Sidecar, basic_prompt, png_bytes


def still_works(sidecar: Sidecar) -> None:
    """ComfyUI still runs a prompt (a prompt nested ~490 deep kills a real one's worker)."""
    answer = sidecar.post("/prompt", json={"prompt": basic_prompt(1)}, timeout=120)
    assert answer.status_code == 200, answer.text


def no_server_path(sidecar: Sidecar, text: str) -> None:
    for path in (sidecar.backend.base, sidecar.backend.comfy_home, "/etc"):
        assert str(path) not in text


def invert(image: str) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
    }


#: A prompt ComfyUI validates and queues (it ignores the extra input ``deep``).
VALID = (
    '{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, '
    '"batch_size": 1, "color": 0, "deep": DEEP}}, "9": {"class_type": "SaveImage", '
    '"inputs": {"images": ["1", 0], "filename_prefix": "deep"}}}}'
)


@pytest.mark.parametrize(
    ("template", "depth", "location"),
    [
        # 600 passes msgspec's decoder (about 900 levels) and killed ComfyUI's worker for good
        (VALID, 600, "prompt.1.inputs.deep"),
        (VALID, 5000, "prompt.1.inputs.deep"),
        (
            '{"prompt": {"1": {"class_type": "EmptyImage", "inputs": {}, "_meta": DEEP}}}',
            5000,
            "prompt.1._meta",
        ),
        ('{"prompt": {"1": DEEP}}', 5000, "prompt.1"),
        ("DEEP", 5000, "body"),
        ('{"id": DEEP, "prompt": {}}', 5000, "id"),
    ],
    ids=["inputs-600", "inputs-5000", "meta-5000", "node-5000", "top-level-5000", "id-5000"],
)
def test_a_body_nested_too_deep_is_a_400_naming_where(
    shared_sidecar: Sidecar, template: str, depth: int, location: str
) -> None:
    text = template.replace("DEEP", "[" * depth + "]" * depth)
    answer = shared_sidecar.post(
        "/prompt", content=text.encode(), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400, answer.text[:500]
    assert answer.json()["location"] == location, answer.text[:500]
    still_works(shared_sidecar)


@pytest.mark.parametrize("depth", [600, 5000])
@pytest.mark.parametrize(
    ("route", "field"), [("/jobs", "prompt"), ("/submit_workflow", "workflow")]
)
def test_the_job_routes_refuse_deep_nesting_too(
    shared_sidecar: Sidecar, route: str, field: str, depth: int
) -> None:
    text = VALID.replace('"prompt"', f'"{field}"', 1).replace("DEEP", "[" * depth + "]" * depth)
    answer = shared_sidecar.post(
        route, content=text.encode(), headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400, answer.text[:500]
    assert answer.json()["location"] == f"{field}.1.inputs.deep"


@pytest.mark.parametrize("comment", [150, 1000, 2900])
def test_plain_base64_images_of_256_to_4096_characters_run(
    shared_sidecar: Sidecar, comment: int
) -> None:
    value = base64.b64encode(png_bytes((8, 8), comment="a" * comment)).decode()
    assert 256 <= len(value) <= 4096 and "/" not in value  # one over-long "file name"
    answer = shared_sidecar.post("/prompt", json={"prompt": invert(value)})
    assert answer.status_code == 200, answer.text  # was 500 "[Errno 36] File name too long"


def test_a_long_value_neither_file_nor_base64_is_a_400_without_a_path(
    shared_sidecar: Sidecar,
) -> None:
    answer = shared_sidecar.post("/prompt", json={"prompt": invert("ab/" * 500 + "!")})
    assert answer.status_code == 400, answer.text
    assert answer.json()["location"] == "prompt.1.inputs.image"
    no_server_path(shared_sidecar, answer.text)


@pytest.mark.parametrize(
    "value",
    [
        "../{secret} [input]",
        "../{secret}X[input]",  # ComfyUI drops the character before the annotation
        "../{secret} [output]",
        "../{secret} [temp]",
        "{link} [input]",
        "{link}",
        "/etc/passwd [input]",
        "/etc/passwd",
    ],
)
def test_names_leaving_comfyuis_directories_are_a_400(shared_sidecar: Sidecar, value: str) -> None:
    base = shared_sidecar.backend.base  # input/, output/ and temp/ are inside it
    secret = f"secret-{uuid.uuid4().hex[:8]}.png"
    (base / secret).write_bytes(png_bytes())
    link = f"link-{uuid.uuid4().hex[:8]}.png"
    (shared_sidecar.backend.input_dir / link).symlink_to(base / secret)
    try:
        image = value.format(secret=secret, link=link)
        answer = shared_sidecar.post("/prompt", json={"prompt": invert(image)})
    finally:
        (shared_sidecar.backend.input_dir / link).unlink()
        (base / secret).unlink()
    assert answer.status_code == 400, answer.text
    assert answer.json()["location"] == "prompt.1.inputs.image"
    no_server_path(shared_sidecar, answer.text)


def test_an_annotated_name_inside_its_directory_runs(shared_sidecar: Sidecar) -> None:
    name = f"annotated-{uuid.uuid4().hex[:8]}.png"
    (shared_sidecar.backend.input_dir / name).write_bytes(png_bytes())
    try:
        answer = shared_sidecar.post("/prompt", json={"prompt": invert(f"{name} [input]")})
    finally:
        (shared_sidecar.backend.input_dir / name).unlink()
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    "prefix",
    [
        "../../etc/x",
        "/tmp/x",
        "sub/../../x",
        "a\x00b",
        "a\r\nX-Injected: 1",
        "a\tb",
        "a\x7fb",
        "a\x85b",
        "x" * 300,
        5,
        {"a": 1},
    ],
    ids=[
        "dotdot",
        "absolute",
        "sub-dotdot",
        "nul",
        "crlf",
        "tab",
        "del",
        "c1-nel",
        "300-chars",
        "number",
        "object",
    ],
)
def test_a_bad_filename_prefix_is_a_400_and_nothing_is_queued(
    shared_sidecar: Sidecar, prefix: Any
) -> None:
    output_dir = shared_sidecar.backend.output_dir
    before = sorted(output_dir.rglob("*"))
    prompt = basic_prompt(1)
    prompt["3"]["inputs"]["filename_prefix"] = prefix
    answer = shared_sidecar.post("/prompt", json={"prompt": prompt})
    assert answer.status_code == 400, answer.text
    assert answer.json()["location"] == "prompt.3.inputs.filename_prefix"
    no_server_path(shared_sidecar, answer.text)
    assert shared_sidecar.comfy_queue() == {"queue_running": [], "queue_pending": []}
    assert sorted(output_dir.rglob("*")) == before


@pytest.mark.parametrize(("prefix", "expected"), [("", "{id}"), ("sub/x", "sub/{id}_x")])
def test_empty_and_subfolder_prefixes(shared_sidecar: Sidecar, prefix: str, expected: str) -> None:
    job_id = f"prefix-{uuid.uuid4().hex[:8]}"
    answer = shared_sidecar.post(
        "/prompt", json={"prompt": basic_prompt(1, prefix=prefix), "id": job_id}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["prompt"]["3"]["inputs"]["filename_prefix"] == expected.format(id=job_id)
    assert body["filenames"][0].startswith(expected.format(id=job_id).rsplit("/", 1)[-1])
