"""Preprocessor on the prompts a real ComfyUI was sent (tests/transcripts): filename_prefix
rewriting, media inputs (data: URL, base64, a file in INPUT_DIR) and 400s naming the field."""

from __future__ import annotations

import asyncio
import base64
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.errors import UpstreamFailed
from comfy_sidecar.http.errors import status_of
from comfy_sidecar.pipeline.preprocess import (
    MAX_NESTING_DEPTH,
    MAX_PROMPT_BYTES,
    InputError,
    Prepared,
    Preprocessor,
    check_size,
    nesting_exceeds,
)
from tests.conftest import fill_up, png_bytes
from tests.transcripts import posted_prompts

OUTPUT_NODES = {"SaveImage", "PreviewImage", "SaveAnimatedWEBP", "SaveAnimatedPNG"}


async def is_output_node(class_type: str) -> bool:
    return class_type in OUTPUT_NODES


class RecordingStaging:
    """A :class:`~comfy_sidecar.pipeline.preprocess.Staging` that fetches nothing: it records
    each URL it is asked for and names the input ``<stem>.png`` (models keep their name)."""

    def __init__(self, input_dir: Path) -> None:
        self.input_dir = input_dir
        self.asked: list[tuple[str, str, str]] = []

    async def input(self, url: str, stem: str, location: str) -> str:
        self.asked.append((url, stem, location))
        (self.input_dir / f"{stem}.png").parent.mkdir(parents=True, exist_ok=True)
        (self.input_dir / f"{stem}.png").write_bytes(png_bytes())
        return f"{stem}.png"

    async def model(self, url: str, folder: str, location: str) -> str:
        self.asked.append((url, folder, location))
        return url.rsplit("/", 1)[-1]


def prepare(
    tmp_path: Path,
    prompt: dict[str, Any],
    job_id: str = "job1",
    prepend: bool = True,
    staging: RecordingStaging | None = None,
) -> Prepared:
    pre = Preprocessor(str(tmp_path / "input"), prepend, is_output_node)
    staging = staging or RecordingStaging(tmp_path / "input")
    return asyncio.run(pre.prepare(prompt, job_id, staging))


def recorded(scenario: str) -> dict[str, Any]:
    return copy.deepcopy(posted_prompts(scenario)[0]["prompt"])


def load_image_prompt(image: str) -> dict[str, Any]:
    """execution_error_bad_image's prompt (LoadImage -> SaveImage) with ``image`` as input."""
    prompt = recorded("execution_error_bad_image")
    (node_id,) = [k for k, v in prompt.items() if v["class_type"] == "LoadImage"]
    prompt[node_id]["inputs"]["image"] = image
    return prompt


def image_value(prompt: dict[str, Any]) -> str:
    (node,) = [v for v in prompt.values() if v["class_type"] == "LoadImage"]
    return str(node["inputs"]["image"])


# --- filename_prefix ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prepend", "expected"),
    [
        (True, {"2": "sub/job1_rec_multi", "4": "job1_rec_anim", "5": "job1_rec_apng"}),
        (False, {"2": "sub/job1", "4": "job1", "5": "job1"}),
    ],
)
def test_filename_prefixes_are_rewritten_keeping_subfolders(
    tmp_path: Path, prepend: bool, expected: dict[str, str]
) -> None:
    prompt = recorded("multi_output_types")  # prefixes sub/rec_multi, rec_anim, rec_apng
    prepared = prepare(tmp_path, prompt, prepend=prepend)
    prefixes = {
        node_id: node["inputs"]["filename_prefix"]
        for node_id, node in prepared.prompt.items()
        if "filename_prefix" in node["inputs"]
    }
    assert prefixes == expected
    assert "filename_prefix" not in prepared.prompt["3"]["inputs"]  # PreviewImage has none


def test_a_prompt_without_an_output_node_is_refused(tmp_path: Path) -> None:
    prompt = recorded("validation_error_no_output")
    with pytest.raises(InputError) as caught:
        prepare(tmp_path, prompt)
    assert caught.value.location == "prompt"
    assert "output node" in str(caught.value)


def test_an_output_node_known_only_to_comfyui_counts(tmp_path: Path) -> None:
    prompt = recorded("multi_output_types")
    prompt = {"1": prompt["1"], "3": prompt["3"]}  # EmptyImage -> PreviewImage (no prefix)
    assert prepare(tmp_path, prompt).prompt == prompt


# --- media inputs -------------------------------------------------------------------------------


def test_data_url_is_written_into_input_dir_and_removed_by_cleanup(tmp_path: Path) -> None:
    png = png_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    prepared = prepare(tmp_path, load_image_prompt(url))
    name = image_value(prepared.prompt)
    assert name == ".comfy-sidecar/job1_1.png"
    written = tmp_path / "input" / name
    assert written.read_bytes() == png
    assert prepared.input_files == [written]
    prepared.cleanup()
    assert not written.exists()


def test_plain_base64_gets_its_extension_from_the_bytes(tmp_path: Path) -> None:
    png = png_bytes()
    prepared = prepare(tmp_path, load_image_prompt(base64.b64encode(png).decode()))
    name = image_value(prepared.prompt)
    assert name == ".comfy-sidecar/job1_1.png"
    assert (tmp_path / "input" / name).read_bytes() == png


def test_a_file_in_input_dir_is_used_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "broken.png").write_bytes(b"not an image")
    prepared = prepare(tmp_path, load_image_prompt("broken.png"))
    assert image_value(prepared.prompt) == "broken.png"
    assert prepared.input_files == []  # not ours to remove


def test_a_path_leaving_input_dir_is_not_a_local_file(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes())
    with pytest.raises(InputError) as caught:
        prepare(tmp_path, load_image_prompt("../secret.png"))
    assert caught.value.location == "prompt.1.inputs.image"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64 at all!", "nor valid base64"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png,rawdata", "must be base64"),
        (base64.b64encode(b"plain text, not media").decode(), "could not tell the media type"),
    ],
)
def test_bad_media_input_names_its_field(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        prepare(tmp_path, load_image_prompt(value))
    assert caught.value.location == "prompt.1.inputs.image"
    assert status_of(caught.value) == 400
    assert message in str(caught.value)


def test_files_written_before_an_error_are_removed(tmp_path: Path) -> None:
    prompt = load_image_prompt(base64.b64encode(png_bytes()).decode())
    prompt["9"] = {"class_type": "LoadImage", "inputs": {"image": "not base64!"}}
    with pytest.raises(InputError) as caught:
        prepare(tmp_path, prompt)
    assert caught.value.location == "prompt.9.inputs.image"
    assert [p for p in (tmp_path / "input").rglob("*") if not p.is_dir()] == []


def test_url_inputs_go_through_staging_and_are_removed_by_cleanup(tmp_path: Path) -> None:
    staging = RecordingStaging(tmp_path / "input")
    prepared = prepare(tmp_path, load_image_prompt("https://example.com/cat.png"), staging=staging)
    ((url, stem, location),) = staging.asked
    assert (url, location) == ("https://example.com/cat.png", "prompt.1.inputs.image")
    assert image_value(prepared.prompt) == f"{stem}.png"
    assert (tmp_path / "input" / f"{stem}.png").is_file()
    prepared.cleanup()
    assert not (tmp_path / "input" / f"{stem}.png").exists()


def test_leftover_inputs_are_removed_but_user_files_kept(tmp_path: Path) -> None:
    """What a killed sidecar left in INPUT_DIR/.comfy-sidecar goes at the next start; the
    user's own files, also ones named like a job's input, stay."""
    from comfy_sidecar.pipeline.preprocess import INPUTS_SUBDIR, remove_leftover_inputs

    input_dir = tmp_path / "input"
    ours = input_dir / INPUTS_SUBDIR
    (ours / "job7").mkdir(parents=True)
    (ours / "job7" / "00000.png").write_bytes(b"x")
    (ours / "job7_1.png").write_bytes(b"x")
    (ours / "job7_2.png.part").write_bytes(b"x")
    (input_dir / "job7_1.png").write_bytes(b"user")
    (input_dir / "cat.png").write_bytes(b"user")
    assert remove_leftover_inputs(input_dir) == 3
    assert list(ours.iterdir()) == []
    assert sorted(p.name for p in input_dir.iterdir()) == [INPUTS_SUBDIR, "cat.png", "job7_1.png"]
    assert remove_leftover_inputs(tmp_path / "missing") == 0


# --- what an outside probe sent (issue 13, findings 1-4) ----------------------------------------


def nested(depth: int) -> Any:
    """A list nested ``depth`` deep (``[[...[]...]]``), built without recursion."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_NESTING_DEPTH + 1, 600, 5000])
def test_a_value_nested_too_deep_is_refused_naming_its_input(tmp_path: Path, depth: int) -> None:
    prompt = load_image_prompt(base64.b64encode(png_bytes()).decode())
    prompt["1"]["inputs"]["deep"] = nested(depth)
    with pytest.raises(InputError) as caught:
        prepare(tmp_path, prompt)
    assert caught.value.location == "prompt.1.inputs.deep"
    assert status_of(caught.value) == 400
    assert list((tmp_path / "input").glob("*")) == []  # refused before anything is written


def test_a_prompt_too_large_to_forward_is_refused_and_leaves_no_input(tmp_path: Path) -> None:
    """The prompt ComfyUI would get (inline media already written to files) is bounded: a 400
    at ``prompt``, and the input file written for it is removed again."""
    prompt = load_image_prompt(base64.b64encode(png_bytes()).decode())
    prompt["1"]["inputs"]["text"] = "x" * (MAX_PROMPT_BYTES + 1)
    with pytest.raises(InputError) as caught:
        prepare(tmp_path, prompt)
    assert (caught.value.location, status_of(caught.value)) == ("prompt", 400)
    assert [p for p in (tmp_path / "input").rglob("*") if p.is_file()] == []


def test_inline_media_do_not_count_toward_the_forwarded_size(tmp_path: Path) -> None:
    image = base64.b64encode(png_bytes((256, 256))).decode()
    prompt = load_image_prompt(image)
    prepared = prepare(tmp_path, prompt)
    check_size(prepared.prompt, limit=len(image) // 2)  # the image became a file name


def test_a_deep_meta_is_refused_and_the_limit_itself_passes(tmp_path: Path) -> None:
    prompt = recorded("multi_output_types")
    prompt["1"]["inputs"]["fine"] = nested(MAX_NESTING_DEPTH)
    prepare(tmp_path, copy.deepcopy(prompt))
    prompt["2"]["_meta"] = {"title": nested(5000)}
    with pytest.raises(InputError) as caught:
        prepare(tmp_path, prompt)
    assert caught.value.location == "prompt.2._meta"


def test_nesting_is_checked_without_recursion() -> None:
    assert nesting_exceeds(nested(100_000), MAX_NESTING_DEPTH)
    assert not nesting_exceeds({"a": [1, {"b": nested(3)}]}, 6)
    assert nesting_exceeds({"a": [1, {"b": nested(3)}]}, 5)


@pytest.mark.parametrize("comment", [150, 1000, 2900])
def test_plain_base64_of_any_length_is_not_taken_for_a_file_name(
    tmp_path: Path, comment: int
) -> None:
    png = png_bytes((8, 8), comment="a" * comment)
    value = base64.b64encode(png).decode()
    assert 256 <= len(value) <= 4096 and "/" not in value  # too long for one file name
    prepared = prepare(tmp_path, load_image_prompt(value))  # was OSError ENAMETOOLONG
    assert (tmp_path / "input" / image_value(prepared.prompt)).read_bytes() == png


def test_a_long_value_that_is_not_base64_is_a_400_without_a_path(tmp_path: Path) -> None:
    value = "a/" * 1000 + "!"
    with pytest.raises(InputError) as caught:
        prepare(tmp_path, load_image_prompt(value))
    assert caught.value.location == "prompt.1.inputs.image"
    assert str(tmp_path) not in str(caught.value.body())


def annotated_dirs(tmp_path: Path) -> Preprocessor:
    for name in ("input", "output", "temp"):
        (tmp_path / name).mkdir(exist_ok=True)
    return Preprocessor(
        str(tmp_path / "input"),
        True,
        is_output_node,
        output_dir=str(tmp_path / "output"),
        temp_dir=str(tmp_path / "temp"),
    )


@pytest.mark.parametrize(
    "value",
    [
        "../secret.png [input]",
        "../../secret.png [input]",
        "../secret.png [output]",
        "../secret.png [temp]",
        "../secret.pngX[input]",  # ComfyUI drops one character before the annotation
        "link.png [input]",  # a symlink inside INPUT_DIR to a file outside
        "link.png [output]",
        "/etc/passwd [input]",
        "missing.png [input]",
        "[input]",
    ],
)
def test_annotated_names_are_held_to_their_directory(tmp_path: Path, value: str) -> None:
    pre = annotated_dirs(tmp_path)
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (tmp_path / "input" / "link.png").symlink_to(tmp_path / "secret.png")
    (tmp_path / "output" / "link.png").symlink_to(tmp_path / "secret.png")
    staging = RecordingStaging(tmp_path / "input")
    with pytest.raises(InputError) as caught:
        asyncio.run(pre.prepare(load_image_prompt(value), "job1", staging))
    assert caught.value.location == "prompt.1.inputs.image"
    assert status_of(caught.value) == 400
    body = str(caught.value.body())
    assert str(tmp_path) not in body and "/etc" not in body


@pytest.mark.parametrize("kind", ["input", "output", "temp"])
def test_annotated_names_inside_their_directory_are_passed_on(tmp_path: Path, kind: str) -> None:
    pre = annotated_dirs(tmp_path)
    (tmp_path / kind / "sub").mkdir()
    (tmp_path / kind / "sub" / "real.png").write_bytes(png_bytes())
    value = f"sub/real.png [{kind}]"
    prepared = asyncio.run(
        pre.prepare(load_image_prompt(value), "job1", RecordingStaging(tmp_path / "input"))
    )
    assert image_value(prepared.prompt) == value  # ComfyUI resolves it


def test_a_plain_name_through_a_symlink_out_of_input_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "input").mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (tmp_path / "input" / "link.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(InputError) as caught:
        prepare(tmp_path, load_image_prompt("link.png"))
    assert caught.value.location == "prompt.1.inputs.image"


def save_prompt(prefix: Any) -> dict[str, Any]:
    """multi_output_types' EmptyImage -> a SaveImage with ``prefix``."""
    empty = recorded("multi_output_types")["1"]
    save = {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}
    return {"1": empty, "2": save}


@pytest.mark.parametrize(
    "prefix",
    [
        "../../etc/x",
        "/etc/x",
        "sub/../../x",
        "../",
        "a\x00b",
        "x" * 300,
        "sub/" + "x" * 300 + "/y",
        5,
        None,
        {"a": 1},
        ["not", "a link"],
    ],
)
def test_a_bad_filename_prefix_is_refused_before_anything_is_queued(
    tmp_path: Path, prefix: Any
) -> None:
    staging = RecordingStaging(tmp_path / "input")
    prompt = save_prompt(prefix)
    prompt["3"] = {"class_type": "LoadImage", "inputs": {"image": "https://example.com/a.png"}}
    with pytest.raises(InputError) as caught:
        prepare(tmp_path, prompt, staging=staging)
    assert caught.value.location == "prompt.2.inputs.filename_prefix"
    assert status_of(caught.value) == 400
    assert staging.asked == []  # no download started


@pytest.mark.parametrize(
    ("prefix", "prepend", "expected"),
    [
        ("", True, "job1"),
        ("", False, "job1"),
        ("sub/", True, "sub/job1"),
        ("sub/x", True, "sub/job1_x"),
        ("sub/../x", True, "sub/../job1_x"),  # stays inside OUTPUT_DIR
        ("%year%/x", True, "%year%/job1_x"),
        ("x" * 200, True, "job1_" + "x" * 200),
    ],
)
def test_filename_prefixes_inside_the_output_directory_are_kept(
    tmp_path: Path, prefix: str, prepend: bool, expected: str
) -> None:
    prepared = prepare(tmp_path, save_prompt(prefix), prepend=prepend)
    assert prepared.prompt["2"]["inputs"]["filename_prefix"] == expected


def test_a_linked_filename_prefix_is_left_to_comfyui(tmp_path: Path) -> None:
    prepared = prepare(tmp_path, save_prompt(["9", 0]))
    assert prepared.prompt["2"]["inputs"]["filename_prefix"] == ["9", 0]


def test_a_full_input_dir_is_the_sidecars_507_and_leaves_no_partial_file(
    tmp_path: Path, small_tmpfs: Callable[[int], Path]
) -> None:
    input_dir = small_tmpfs(64 * 1024)
    filler = fill_up(input_dir)
    pre = Preprocessor(str(input_dir), True, is_output_node)
    prompt = load_image_prompt(base64.b64encode(png_bytes((64, 64))).decode())
    with pytest.raises(UpstreamFailed) as caught:  # was OSError ENOSPC: a 500 naming the path
        asyncio.run(pre.prepare(prompt, "job1", RecordingStaging(input_dir)))
    assert (caught.value.location, status_of(caught.value)) == ("prompt.1.inputs.image", 507)
    assert str(input_dir) not in str(caught.value.body())
    assert sorted(p for p in input_dir.rglob("*") if not p.is_dir()) == [filler]
