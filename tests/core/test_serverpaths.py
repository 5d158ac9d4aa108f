"""comfy_sidecar.pipeline.serverpaths: server directories scrubbed from text callers see."""

from __future__ import annotations

from pathlib import Path

from comfy_sidecar.config import load_settings
from comfy_sidecar.pipeline.serverpaths import ServerPaths


def test_paths_under_each_directory_are_named_by_their_setting(tmp_path: Path) -> None:
    home = tmp_path / "ComfyUI"
    settings = load_settings(
        {"COMFY_HOME": str(home), "CACHE_DIR": str(tmp_path / "cache"), "HOME": str(tmp_path)}
    )
    paths = ServerPaths.from_settings(settings)
    text = (
        f"cannot identify image file '{home}/input/x.png'\n"
        f'  File "{home}/execution.py", line 518\n'
        f"{home}/output/sub/a.png {home}/temp/t.png {home}/models/checkpoints/m.ckpt "
        f"{tmp_path}/cache/abc.bin {home}"
    )
    assert paths.scrub_text(text) == (
        "cannot identify image file '<INPUT_DIR>/x.png'\n"
        '  File "<COMFY_HOME>/execution.py", line 518\n'
        "<OUTPUT_DIR>/sub/a.png <TEMP_DIR>/t.png <MODEL_DIR>/checkpoints/m.ckpt "
        "<CACHE_DIR>/abc.bin <COMFY_HOME>"
    )


def test_a_sibling_with_a_longer_name_is_not_under_the_directory(tmp_path: Path) -> None:
    paths = ServerPaths({"INPUT_DIR": str(tmp_path / "in")})
    assert paths.scrub_text(f"{tmp_path}/in-old/x {tmp_path}/in.bak") == (
        f"{tmp_path}/in-old/x {tmp_path}/in.bak"
    )


def test_a_symlinked_directory_is_scrubbed_under_both_names(tmp_path: Path) -> None:
    real = tmp_path / "disk" / "input"
    real.mkdir(parents=True)
    link = tmp_path / "input"
    link.symlink_to(real)
    paths = ServerPaths({"INPUT_DIR": str(link)})
    assert paths.scrub_text(f"{link}/a.png and {real}/b.png") == (
        "<INPUT_DIR>/a.png and <INPUT_DIR>/b.png"
    )


def test_nested_values_are_scrubbed_and_the_input_kept() -> None:
    paths = ServerPaths({"INPUT_DIR": "/srv/in", "COMFY_HOME": "/"})
    value = {"a": ["/srv/in/x", ("/srv/in/y", 3)], "/srv/in/k": None, "n": 1}
    assert paths.scrub(value) == {
        "a": ["<INPUT_DIR>/x", ["<INPUT_DIR>/y", 3]],
        "<INPUT_DIR>/k": None,
        "n": 1,
    }
    assert value["a"] == ["/srv/in/x", ("/srv/in/y", 3)]
    assert paths.scrub_text("/usr/lib/python3.11/x.py") == "/usr/lib/python3.11/x.py"
