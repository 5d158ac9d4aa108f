"""Fixtures for convert/workflow tests: real image files made with Pillow, a fake ComfyUI getter."""

from __future__ import annotations

import struct
import wave
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image


def gradient_rgb(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A colourful RGB test image (chroma detail makes subsampling visible)."""
    w, h = size
    im = Image.new("RGB", size)
    im.putdata(
        [((x * 255) // w, (y * 255) // h, ((x + y) * 7) % 256) for y in range(h) for x in range(w)]
    )
    return im


def write_png16_rgb(path: Path, size: tuple[int, int]) -> None:
    """A 48-bit (16 bits per channel) RGB PNG, which Pillow can read but not write."""
    w, h = size

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(
        b"\x00"
        + b"".join(struct.pack(">HHH", x * 65535 // w, y * 65535 // h, 50000) for x in range(w))
        for y in range(h)
    )
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def outputs(tmp_path: Path) -> dict[str, Path]:
    """Output files like ComfyUI writes: PNGs of several modes plus non-image outputs."""
    d = tmp_path / "output"
    d.mkdir()
    files: dict[str, Path] = {}

    rgb = gradient_rgb()
    rgb.save(files.setdefault("rgb", d / "ComfyUI_00001_.png"))

    rgba = gradient_rgb().convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, 32, 64))  # left third fully transparent
    alpha.paste(128, (32, 0, 64, 64))  # middle third half transparent
    rgba.putalpha(alpha)
    rgba.save(files.setdefault("rgba", d / "ComfyUI_00002_.png"))

    gradient_rgb().convert("L").save(files.setdefault("l", d / "grey_00001_.png"))

    g16 = Image.new("I;16", (40, 30))
    g16.putdata([(i * 997) % 65536 for i in range(40 * 30)])
    g16.putpixel((0, 0), 40000)
    g16.save(files.setdefault("i16", d / "deep_00001_.png"))

    write_png16_rgb(files.setdefault("rgb16", d / "deep_00002_.png"), (50, 20))

    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    frames[0].save(
        files.setdefault("anim_webp", d / "anim_00001_.webp"),
        save_all=True,
        append_images=frames[1:],
        duration=100,
        loop=0,
    )
    frames[0].save(
        files.setdefault("apng", d / "anim_00001_.png"),
        save_all=True,
        append_images=frames[1:],
        duration=100,
    )
    frames[0].save(
        files.setdefault("gif", d / "anim_00001_.gif"), save_all=True, append_images=frames[1:]
    )

    with wave.open(str(files.setdefault("wav", d / "audio_00001_.wav")), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * 800)
    # An MP4 header (ftyp box) followed by junk: what a video output looks like to a sniffer.
    files.setdefault("mp4", d / "video_00001_.mp4").write_bytes(
        b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 200
    )
    files.setdefault("txt", d / "notes.txt").write_text("not an image\n")
    return files


class FakeComfy:
    """An async JSON getter standing in for the ComfyUI client; counts calls per path."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.models: dict[str, list[str]] = {
            "checkpoints": ["sd15.safetensors", "sdxl.safetensors"],
            "upscale_models": ["tiny-compact-x2.safetensors"],
        }
        self.samplers = ["euler", "euler_ancestral", "dpmpp_2m_sde_gpu"]
        self.schedulers = ["normal", "simple", "exponential", "karras"]
        self.combo_style = False  # ComfyUI's newer ["COMBO", {"options": [...]}] encoding
        self.fail: Exception | None = None

    async def get_json(self, path: str) -> Any:
        self.calls.append(path)
        if self.fail is not None:
            raise self.fail
        if path == "/models":
            return list(self.models)
        if path.startswith("/models/"):
            folder = path.removeprefix("/models/")
            if folder not in self.models:
                raise LookupError(f"404 for {path}")
            return list(self.models[folder])
        if path == "/object_info/KSampler":

            def combo(names: list[str]) -> list[Any]:
                return (
                    ["COMBO", {"options": list(names)}] if self.combo_style else [list(names), {}]
                )

            return {
                "KSampler": {
                    "input": {
                        "required": {
                            "model": ["MODEL"],
                            "seed": ["INT", {"default": 0}],
                            "sampler_name": combo(self.samplers),
                            "scheduler": combo(self.schedulers),
                        }
                    }
                }
            }
        raise LookupError(f"404 for {path}")


@pytest.fixture
def comfy() -> FakeComfy:
    return FakeComfy()


@pytest.fixture
def write_module(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a workflow module at ``<tmp>/workflows/<relpath>``; returns the directory root."""
    root = tmp_path / "workflows"
    root.mkdir(exist_ok=True)

    def write(relpath: str, source: str) -> Path:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
        return root

    return write
