"""convert_output: real PNG outputs converted with Pillow, checked by decoding the results."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
from PIL import Image, ImageChops, ImageCms, JpegImagePlugin

from comfy_sidecar.pipeline.convert import (
    ConversionError,
    Converter,
    ImageTooLarge,
    convert_image,
    converted_name,
    is_convertible,
)
from comfy_sidecar.schemas import ConvertOutput, PromptRequest

ANNEX_K_LUMA_ROW0 = [16, 11, 10, 16, 24, 40, 51, 61]  # libjpeg's table at quality 50


def spec(obj: dict[str, Any]) -> ConvertOutput:
    return cast(ConvertOutput, msgspec.convert(obj, ConvertOutput))


def opened(path: Path) -> Any:
    """The decoded image (typed Any: tests read plugin attributes and pixel tuples)."""
    im = Image.open(path)
    im.load()
    return im


# --- JPEG ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpeg", "jpg"])
def test_rgb_png_to_jpeg_defaults(outputs: dict[str, Path], fmt: str) -> None:
    src = outputs["rgb"]
    before = src.read_bytes()
    dest = convert_image(src, spec({"format": fmt}))
    assert dest == src.with_name(f"ComfyUI_00001_.{fmt}")
    im = opened(dest)
    assert (im.format, im.size, im.mode) == ("JPEG", (96, 64), "RGB")
    assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0 by default, like sharp
    assert not im.info.get("progressive")
    assert src.read_bytes() == before  # the original is left alone
    assert dest.stat().st_mode & 0o777 == src.stat().st_mode & 0o777
    assert not [p for p in dest.parent.iterdir() if p.name.endswith(".part")]


def test_jpeg_progressive_and_444(outputs: dict[str, Path]) -> None:
    dest = convert_image(
        outputs["rgb"],
        spec({"format": "jpg", "options": {"progressive": True, "chromaSubsampling": "4:4:4"}}),
    )
    im = opened(dest)
    assert im.info.get("progressive") == 1 and im.info.get("progression") == 1
    assert JpegImagePlugin.get_sampling(im) == 0


def test_jpeg_optimize_scans_and_mozjpeg_imply_progressive(outputs: dict[str, Path]) -> None:
    for options in ({"optimizeScans": True}, {"mozjpeg": True}):
        dest = convert_image(outputs["rgb"], spec({"format": "jpeg", "options": options}))
        assert opened(dest).info.get("progressive") == 1, options


def test_jpeg_quality_sets_the_quantisation_tables(outputs: dict[str, Path]) -> None:
    sizes = {}
    for quality in (10, 50, 95):
        dest = convert_image(
            outputs["rgb"], spec({"format": "jpeg", "options": {"quality": quality}})
        )
        im = opened(dest)
        if quality == 50:
            assert im.quantization[0][:8] == ANNEX_K_LUMA_ROW0
        sizes[quality] = dest.stat().st_size
    assert sizes[10] < sizes[50] < sizes[95]


def test_jpeg_quantisation_table_1_is_flat(outputs: dict[str, Path]) -> None:
    dest = convert_image(
        outputs["rgb"], spec({"format": "jpeg", "options": {"quality": 50, "quantisationTable": 1}})
    )
    assert set(opened(dest).quantization[0]) == {16}
    # Tables libjpeg-turbo does not have fall back to Annex K rather than failing.
    dest = convert_image(
        outputs["rgb"],
        spec(
            {
                "format": "jpeg",
                "options": {
                    "quality": 50,
                    "quantisationTable": 5,
                    "trellisQuantisation": True,
                    "overshootDeringing": True,
                },
            }
        ),
    )
    assert opened(dest).quantization[0][:8] == ANNEX_K_LUMA_ROW0


def test_jpeg_optimize_coding_shrinks_the_file(outputs: dict[str, Path]) -> None:
    on = convert_image(
        outputs["rgb"], spec({"format": "jpeg", "options": {"optimizeCoding": True}})
    )
    size_on = on.stat().st_size
    off = convert_image(
        outputs["rgb"], spec({"format": "jpeg", "options": {"optimizeCoding": False}})
    )
    assert size_on < off.stat().st_size


def test_rgba_to_jpeg_is_flattened_on_black(outputs: dict[str, Path]) -> None:
    src = opened(outputs["rgba"])
    im = opened(
        convert_image(
            outputs["rgba"],
            spec({"format": "jpeg", "options": {"quality": 100, "chromaSubsampling": "4:4:4"}}),
        )
    )
    assert im.mode == "RGB" and im.size == src.size
    assert max(im.getpixel((10, 30))) <= 8  # fully transparent -> black background
    r, g, b = im.getpixel((70, 30))  # opaque: colour kept
    r0, g0, b0 = src.getpixel((70, 30))[:3]
    assert abs(r - r0) <= 12 and abs(g - g0) <= 12 and abs(b - b0) <= 12
    half = im.getpixel((48, 30))  # half transparent: about half the colour
    full = src.getpixel((48, 30))
    assert abs(half[0] - full[0] * 128 // 255) <= 12


def test_grey_png_stays_grey(outputs: dict[str, Path]) -> None:
    im = opened(convert_image(outputs["l"], spec({"format": "jpeg"})))
    assert (im.format, im.mode) == ("JPEG", "L")


def test_16bit_png_is_scaled_not_clipped(outputs: dict[str, Path]) -> None:
    assert opened(outputs["i16"]).mode.startswith("I")
    jpeg = opened(
        convert_image(outputs["i16"], spec({"format": "jpeg", "options": {"quality": 100}}))
    )
    assert (jpeg.mode, jpeg.size) == ("L", (40, 30))
    assert abs(jpeg.getpixel((0, 0)) - 40000 // 257) <= 20  # clipping would give 255
    webp = opened(
        convert_image(outputs["i16"], spec({"format": "webp", "options": {"lossless": True}}))
    )
    assert webp.mode == "RGB" and webp.getpixel((0, 0)) == (155, 155, 155)


def test_48bit_rgb_png(outputs: dict[str, Path]) -> None:
    src = opened(outputs["rgb16"])
    assert src.size == (50, 20)
    for fmt in ("jpeg", "webp"):
        im = opened(
            convert_image(outputs["rgb16"], spec({"format": fmt, "options": {"quality": 100}}))
        )
        assert (im.mode, im.size) == ("RGB", (50, 20))
        r, g, b = im.getpixel((49, 19))
        assert r > 220 and g > 200 and abs(b - 50000 // 257) <= 12, fmt


def test_icc_profile_is_kept(tmp_path: Path) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = tmp_path / "icc.png"
    Image.new("RGB", (16, 16), "teal").save(src, icc_profile=icc)
    assert opened(convert_image(src, spec({"format": "jpeg"}))).info.get("icc_profile") == icc
    assert opened(convert_image(src, spec({"format": "webp"}))).info.get("icc_profile") == icc


# --- WebP ---------------------------------------------------------------------------------


def test_webp_options_are_honoured(outputs: dict[str, Path]) -> None:
    # comfyui-api drops every WebP option but quality; here lossless really is lossless.
    src = opened(outputs["rgba"])
    dest = convert_image(outputs["rgba"], spec({"format": "webp", "options": {"lossless": True}}))
    assert dest.name == "ComfyUI_00002_.webp"
    im = opened(dest)
    assert (im.format, im.mode, im.size) == ("WEBP", "RGBA", src.size)
    assert ImageChops.difference(im, src).getbbox() is None  # every RGBA value equal


def test_webp_near_lossless_is_encoded_lossless(outputs: dict[str, Path]) -> None:
    src = opened(outputs["rgb"])
    im = opened(
        convert_image(outputs["rgb"], spec({"format": "webp", "options": {"nearLossless": True}}))
    )
    assert im.mode == "RGB" and ImageChops.difference(im, src).getbbox() is None


def test_webp_lossy_quality_alpha_quality_and_effort(outputs: dict[str, Path]) -> None:
    def size(options: dict[str, Any]) -> int:
        return (
            convert_image(outputs["rgba"], spec({"format": "webp", "options": options}))
            .stat()
            .st_size
        )

    assert size({"quality": 5}) < size({"quality": 95})
    assert size({"alphaQuality": 0}) <= size({"alphaQuality": 100})
    im = opened(outputs["rgba"].with_suffix(".webp"))
    assert im.mode == "RGBA"  # alpha kept in lossy mode
    for effort in (0, 6):
        assert size({"effort": effort, "smartSubsample": True, "preset": "photo"}) > 0


def test_webp_of_rgb_and_grey(outputs: dict[str, Path]) -> None:
    assert opened(convert_image(outputs["rgb"], spec({"format": "webp"}))).mode == "RGB"
    assert opened(convert_image(outputs["l"], spec({"format": "webp"}))).mode == "RGB"


# --- what is converted, what passes through -----------------------------------------------


def test_is_convertible(outputs: dict[str, Path], tmp_path: Path) -> None:
    for key in ("rgb", "rgba", "l", "i16", "rgb16"):
        assert is_convertible(outputs[key]), key
    for fmt in ("JPEG", "WEBP", "BMP", "TIFF"):
        path = tmp_path / f"still.{fmt.lower()}"
        Image.new("RGB", (8, 8), "red").save(path, fmt)
        assert is_convertible(path), fmt
    for key in ("anim_webp", "apng", "gif", "wav", "mp4", "txt"):
        assert not is_convertible(outputs[key]), key
    assert not is_convertible(tmp_path / "missing.png")


def test_animated_and_non_images_are_refused(outputs: dict[str, Path]) -> None:
    for key in ("anim_webp", "apng", "wav", "mp4", "txt"):
        before = outputs[key].read_bytes()
        with pytest.raises(ConversionError, match=outputs[key].name):
            convert_image(outputs[key], spec({"format": "jpeg"}))
        assert outputs[key].read_bytes() == before
    leftovers = [p.name for p in outputs["rgb"].parent.iterdir() if p.suffix in (".jpeg", ".part")]
    assert leftovers == []


def test_truncated_png_raises_conversion_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "PNG")
    bad = tmp_path / "cut.png"
    bad.write_bytes(buf.getvalue()[:60])
    with pytest.raises(ConversionError, match=r"cut\.png"):
        convert_image(bad, spec({"format": "webp"}))
    assert not (tmp_path / "cut.webp").exists()


def test_mixed_outputs_off_the_event_loop(outputs: dict[str, Path]) -> None:
    """What the pipeline does: convert the still images in threads, pass the rest through."""
    target = spec({"format": "webp", "options": {"quality": 70}})

    async def post_process(paths: list[Path]) -> list[Path]:
        async def one(path: Path) -> Path:
            if not await asyncio.to_thread(is_convertible, path):
                return path
            return await asyncio.to_thread(convert_image, path, target)

        return list(await asyncio.gather(*(one(p) for p in paths)))

    paths = [outputs[k] for k in ("rgb", "anim_webp", "mp4", "rgba", "wav")]
    result = asyncio.run(post_process(paths))
    assert [p.name for p in result] == [
        "ComfyUI_00001_.webp",
        "anim_00001_.webp",
        "video_00001_.mp4",
        "ComfyUI_00002_.webp",
        "audio_00001_.wav",
    ]
    assert opened(result[1]).n_frames == 3  # the animation is untouched


def test_an_image_over_the_pixel_cap_is_refused_before_it_is_decoded(tmp_path: Path) -> None:
    """CONVERT_MAX_PIXELS bounds what a conversion may decode: an image over it raises
    ImageTooLarge (not a ConversionError: the pipeline answers 400) naming the file, its size
    and the cap, and writes nothing; one over twice the cap, which Pillow itself refuses to
    open, too. At the cap it converts."""
    src = tmp_path / "big.png"
    Image.new("RGB", (100, 50), (1, 2, 3)).save(src)
    with pytest.raises(ImageTooLarge, match=r"big\.png is 100x50 = 5000 pixels.*\(4999\)"):
        convert_image(src, spec({"format": "webp"}), 4999)
    with pytest.raises(ImageTooLarge, match=r"big\.png is over 4000 pixels.*\(2000\)"):
        convert_image(src, spec({"format": "webp"}), 2000)
    assert is_convertible(src, 2000)  # a still image, refused by convert_image with the reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png"]
    assert convert_image(src, spec({"format": "webp"}), 5000).name == "big.webp"


def test_converter_runs_one_conversion_at_a_time(tmp_path: Path) -> None:
    """Outputs of concurrent jobs convert one after the other (each holds its decoded image):
    four conversions started together never overlap in the worker threads."""
    running, most = 0, 0
    lock = threading.Lock()

    def watched(path: Path, target: ConvertOutput, max_pixels: int) -> Path:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return convert_image(path, target, max_pixels)
        finally:
            with lock:
                running -= 1

    paths = []
    for n in range(4):
        paths.append(tmp_path / f"out{n}.png")
        Image.new("RGB", (512, 512), (n, 2, 3)).save(paths[-1])
    converter = Converter(convert=watched)

    async def convert_all() -> list[Path]:
        target = spec({"format": "webp"})
        return list(await asyncio.gather(*(converter.convert(p, target) for p in paths)))

    assert [p.name for p in asyncio.run(convert_all())] == [f"out{n}.webp" for n in range(4)]
    assert most == 1


def test_same_extension_replaces_in_place(tmp_path: Path) -> None:
    src = tmp_path / "x.jpeg"
    Image.new("RGB", (20, 10), "blue").save(src, quality=95)
    dest = convert_image(src, spec({"format": "jpeg", "options": {"progressive": True}}))
    assert dest == src and opened(dest).info.get("progressive") == 1


def test_converted_name() -> None:
    assert converted_name("a_00001_.png", spec({"format": "jpg"})) == "a_00001_.jpg"
    assert converted_name("a.b.png", spec({"format": "jpeg"})) == "a.b.jpeg"
    assert converted_name("noext", spec({"format": "webp"})) == "noext.webp"
    assert converted_name(".hidden", spec({"format": "webp"})) == ".hidden.webp"


# --- option validation (400 before anything is queued) --------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"format": "png"},
        {"format": "jpeg", "options": {"quality": 0}},
        {"format": "jpeg", "options": {"quality": 101}},
        {"format": "jpeg", "options": {"quality": 80.5}},
        {"format": "jpeg", "options": {"chromaSubsampling": "4:2:2"}},
        {"format": "jpeg", "options": {"quantisationTable": 9}},
        {"format": "jpeg", "options": {"progressive": "yes"}},
        {"format": "jpg", "options": {"lossless": True}},
        {"format": "webp", "options": {"effort": 7}},
        {"format": "webp", "options": {"alphaQuality": -1}},
        {"format": "webp", "options": {"preset": "bogus"}},
        {"format": "webp", "options": {"progressive": True}},
        {"options": {"quality": 50}},
    ],
)
def test_invalid_options_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        spec(bad)
    body = msgspec.json.encode({"prompt": {}, "convert_output": bad})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.convert_output"):
        msgspec.json.decode(body, type=PromptRequest)


def test_webp_options_survive_decoding() -> None:
    decoded = spec({"format": "webp", "options": {"lossless": True, "effort": 6, "preset": "icon"}})
    assert decoded.options.lossless and decoded.options.effort == 6  # type: ignore[union-attr]
