"""Print conversion timings/sizes for a 1024x1024 PNG and workflow loading time.

Run: ``python bench/convert_workflows.py``. Prints numbers only; nothing is asserted.
"""

from __future__ import annotations

import random
import resource
import tempfile
import time
from pathlib import Path

import msgspec

from comfy_sidecar.pipeline.convert import convert_image
from comfy_sidecar.schemas import ConvertOutput
from comfy_sidecar.workflows import load_workflows

CASES = [
    {"format": "jpeg"},
    {"format": "jpeg", "options": {"quality": 95, "chromaSubsampling": "4:4:4"}},
    {"format": "jpeg", "options": {"progressive": True, "optimizeScans": True}},
    {"format": "webp"},
    {"format": "webp", "options": {"effort": 0}},
    {"format": "webp", "options": {"effort": 6}},
    {"format": "webp", "options": {"lossless": True}},
    {"format": "webp", "options": {"lossless": True, "effort": 0, "quality": 1}},
]


def make_png(path: Path, size: int = 1024) -> None:
    from PIL import Image, ImageFilter

    rng = random.Random(1)
    noise = Image.frombytes("RGB", (size // 8, size // 8), rng.randbytes(3 * (size // 8) ** 2))
    im = noise.resize((size, size), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    im.save(path)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ComfyUI_00001_.png"
        make_png(src)
        print(f"source: 1024x1024 RGB PNG, {src.stat().st_size} bytes")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for case in CASES:
            spec = msgspec.convert(case, ConvertOutput)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                dest = convert_image(src, spec)
                times.append(time.perf_counter() - t0)
            label = msgspec.json.encode(case).decode()
            print(f"{label:<80} {min(times) * 1000:7.1f} ms  {dest.stat().st_size:>8} bytes")
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak RSS growth during conversions: {(rss1 - rss0) / 1024:.1f} MiB")

    root = Path(__file__).resolve().parents[1] / "workflows"
    t0 = time.perf_counter()
    workflows = load_workflows(root)
    print(
        f"load_workflows({root.name}/): {len(workflows)} modules in "
        f"{(time.perf_counter() - t0) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
