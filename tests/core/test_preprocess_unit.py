"""Preprocessor on the prompts a real ComfyUI was sent (tests/transcripts): filename_prefix
rewriting, media inputs (data: URL, base64, a file in INPUT_DIR) and 400s naming the field."""

from __future__ import annotations

import asyncio
import base64
import copy
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.app import status_of
from comfy_sidecar.pipeline.preprocess import InputError, Prepared, Preprocessor
from tests.conftest import png_bytes
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
