"""Convert still-image outputs to JPEG or WebP with Pillow (``convert_output``).

comfyui-api does this with sharp (its B22): ``sharp(buf).jpeg(options)`` / ``.webp(options)``
applied to every output file, the name taking the new extension. Here each sharp option is mapped
to Pillow's nearest equivalent; the full table, with the options libjpeg-turbo/libwebp-through-
Pillow cannot honour, is in ``docs/convert_workflows.md``. Differences from comfyui-api:

* WebP options are honoured (comfyui-api's union matches the JPEG schema first and drops them).
* Only still images are converted; animated images, video and audio are passed through by the
  caller after :func:`is_convertible` says ``False`` (sharp would turn an animated WebP into its
  first frame, and fails noisily on video).

Both functions block (decoding and encoding run in C, holding the GIL part of the time): call
them with ``asyncio.to_thread``, one conversion at a time (:class:`Converter` does): a decoded
image holds 4 bytes a pixel and the encoder about as much again, so a 4096x4096 output takes
about 165 MB while it converts. An image over ``max_pixels`` (CONVERT_MAX_PIXELS, Pillow's own
``Image.MAX_IMAGE_PIXELS`` default) is refused with :class:`ImageTooLarge` before it is decoded.
The image buffers go back to the system once freed because the sidecar fixes glibc's mmap
threshold at start-up (``comfy_sidecar.__main__``); with glibc's default the worker threads'
heaps kept them (bench/rss_bench.py).
Pillow is imported lazily, inside the functions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_sidecar.schemas import (
    ConvertJpeg,
    ConvertJpg,
    ConvertOutput,
    ConvertWebp,
    JpegOptions,
    WebpOptions,
)
from comfy_sidecar.storage.errors import DiskFullError, is_disk_full

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "CONVERTIBLE_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "ConversionError",
    "Converter",
    "ImageTooLarge",
    "convert_image",
    "converted_name",
    "is_convertible",
]

log = logging.getLogger(__name__)

#: Pillow format names of the still images we convert (single frame only).
CONVERTIBLE_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF"})
# Plugins to try when opening (MPO is opened by the JPEG plugin).
_OPEN_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")

#: Background a transparent image is flattened onto for JPEG, as (R, G, B). Black, like sharp
#: (libvips flattens alpha onto its default ``background`` of 0 when the saver has no alpha).
JPEG_BACKGROUND: tuple[int, int, int] = (0, 0, 0)

# mozjpeg's quant_tbl_master_idx 1 is a flat table (every step 16); Pillow scales custom tables
# by `quality` exactly as libjpeg scales its Annex K default, so only the base table differs.
_FLAT_QTABLE: list[int] = [16] * 64


#: Pillow's default ``Image.MAX_IMAGE_PIXELS`` (a 1/4 GiB image at 3 bytes a pixel, about
#: 9459x9459): the default of CONVERT_MAX_PIXELS.
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3


class ConversionError(Exception):
    """The file could not be converted; ``str(err)`` says which file and why.

    The caller keeps the original output (comfyui-api keeps the original bytes and name too).
    """


class ImageTooLarge(Exception):
    """The image has more pixels than the conversion may decode (``max_pixels``); nothing was
    decoded. ``str(err)`` names the file, its size and the limit. Not a
    :class:`ConversionError`: the caller asked for a conversion that cannot be made at this
    size, and the pipeline answers it (400, ``location: convert_output``)."""

    def __init__(self, name: str, size: str, limit: int) -> None:
        super().__init__(
            f"{name} is {size} pixels, more than CONVERT_MAX_PIXELS ({limit}) allows converting"
        )


def converted_name(name: str, spec: ConvertOutput) -> str:
    """The output's file name after conversion: the last extension replaced by the format's.

    ``"ComfyUI_00001_.png"`` with ``jpg`` -> ``"ComfyUI_00001_.jpg"``; with ``jpeg`` ->
    ``".jpeg"`` (comfyui-api uses the requested format string as the extension, too). A name
    without an extension gets one appended.
    """
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or "/" in ext:
        return f"{name}.{_format_of(spec)}"
    return f"{stem}.{_format_of(spec)}"


def _format_of(spec: ConvertOutput) -> str:
    if isinstance(spec, ConvertJpeg):
        return "jpeg"
    if isinstance(spec, ConvertJpg):
        return "jpg"
    return "webp"


def is_convertible(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """True when ``path`` is a still image Pillow can decode (PNG, JPEG, WebP, BMP, TIFF), or
    one too large to (over twice ``max_pixels``: :func:`convert_image` refuses it).

    False for animated images (``is_animated``/``n_frames > 1``: animated WebP, APNG, multi-page
    TIFF), GIF (treated as animation), video, audio, text, missing or unreadable files. Only the
    header is read. Never raises.
    """
    from PIL import Image, UnidentifiedImageError

    _limit_pillow(max_pixels)
    try:
        with Image.open(path, formats=_OPEN_FORMATS) as im:
            if im.format not in CONVERTIBLE_FORMATS:
                return False
            return not _is_animated(im)
    except Image.DecompressionBombError:
        return True  # a still image, but too large: convert_image raises ImageTooLarge
    except (UnidentifiedImageError, OSError, ValueError):
        return False


def _is_animated(im: Image.Image) -> bool:
    return bool(getattr(im, "is_animated", False)) or int(getattr(im, "n_frames", 1)) > 1


def _limit_pillow(max_pixels: int) -> None:
    """Pillow's own decompression-bomb limit follows CONVERT_MAX_PIXELS (the sidecar uses
    Pillow for nothing else): it refuses to open a file of more than twice that many pixels.
    Its warning above the limit is silenced: :func:`convert_image` refuses those itself."""
    from PIL import Image

    if max_pixels != Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def convert_image(src: Path, spec: ConvertOutput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """Encode ``src`` as ``spec.format`` into ``<src.parent>/<converted_name(src.name)>``.

    Returns the new path. Nothing is removed: the caller decides whether to delete ``src``
    (when the new path equals ``src``, e.g. ``x.jpeg`` converted to ``jpeg``, the file is
    replaced). The result is written to a temporary file in the same directory and renamed into
    place, so a reader never sees a partial file. ICC profiles are kept; other metadata (the
    PNG text chunks where ComfyUI stores the prompt and workflow, EXIF) is dropped, as sharp does
    by default.

    Raises :class:`ImageTooLarge` when ``src`` has more than ``max_pixels`` pixels (read from
    its header; nothing is decoded), :class:`ConversionError` when ``src`` is not a convertible
    still image (see :func:`is_convertible`) or Pillow fails to decode or encode it, and
    :class:`~comfy_sidecar.storage.errors.DiskFullError` when the disk is full (no partial file
    is left either way). Blocking; run it in a thread, one at a time (see the module's text).
    """
    from PIL import Image, UnidentifiedImageError

    _limit_pillow(max_pixels)
    dest = src.with_name(converted_name(src.name, spec))
    try:
        with Image.open(src, formats=_OPEN_FORMATS) as im:
            if _is_animated(im):
                raise ConversionError(f"{src.name}: animated images are not converted")
            width, height = im.size
            if width * height > max_pixels:
                raise ImageTooLarge(src.name, f"{width}x{height} = {width * height}", max_pixels)
            im.load()
            icc = im.info.get("icc_profile")
            if isinstance(spec, ConvertWebp):
                out, params = _webp(im, spec.options)
                pil_format = "WEBP"
            else:
                out, params = _jpeg(im, spec.options)
                pil_format = "JPEG"
            if icc:
                params["icc_profile"] = icc
            _save_atomically(out, dest, pil_format, params, src.stat().st_mode & 0o777)
    except (ConversionError, ImageTooLarge):
        raise
    except Image.DecompressionBombError:  # Pillow refused to open it: over twice the limit
        raise ImageTooLarge(src.name, f"over {2 * max_pixels}", max_pixels) from None
    except UnidentifiedImageError:
        raise ConversionError(f"{src.name}: not a still image Pillow can read") from None
    except OSError as err:
        if is_disk_full(err):
            raise DiskFullError(
                "converting an output failed: no space left in OUTPUT_DIR"
            ) from None
        raise ConversionError(f"{src.name}: cannot convert to {_format_of(spec)}: {err}") from err
    except (ValueError, SyntaxError) as err:
        raise ConversionError(f"{src.name}: cannot convert to {_format_of(spec)}: {err}") from err
    return dest


class Converter:
    """Converts outputs off the event loop, one at a time in the whole sidecar, none over
    ``max_pixels`` (CONVERT_MAX_PIXELS). A conversion holds its decoded image and the
    encoder's copy, about 10 bytes a pixel (165 MB for 4096x4096): four jobs converting at
    once took over 900 MB at the peak (bench/rss_bench.py). ``convert`` is :func:`convert_image`
    (tests pass one that watches the calls)."""

    def __init__(
        self,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        convert: Callable[[Path, ConvertOutput, int], Path] | None = None,
    ) -> None:
        self.max_pixels = max_pixels
        self._convert = convert or convert_image
        self._one = asyncio.Lock()

    async def convertible(self, path: Path) -> bool:
        """:func:`is_convertible`, in a worker thread."""
        return await asyncio.to_thread(is_convertible, path, self.max_pixels)

    async def convert(self, path: Path, spec: ConvertOutput) -> Path:
        """:func:`convert_image` in a worker thread once no other conversion runs; raises
        what it raises."""
        async with self._one:
            return await asyncio.to_thread(self._convert, path, spec, self.max_pixels)


def _save_atomically(
    im: Image.Image, dest: Path, pil_format: str, params: dict[str, Any], mode: int
) -> None:
    """Save to a temporary sibling with the source's permission bits, then rename over dest."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fp:
            im.save(fp, pil_format, **params)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


# --- mode handling ------------------------------------------------------------------------


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode == "P" and "transparency" in im.info
    )


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit greyscale (``I;16``, ``I``, ``F``) to ``L``, scaled, not clipped."""
    if im.mode.startswith("I;16"):
        return im.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if im.mode == "I":
        # PNG stores 16-bit greyscale as "I" in some Pillow versions: same 0..65535 range.
        return im.point(lambda v: v * (1 / 257)).convert("L")
    if im.mode == "F":
        return im.point(lambda v: v * 255).convert("L")
    return im


def _flatten(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite an image with alpha onto ``background``; the result is RGB or L."""
    from PIL import Image

    grey = im.mode in ("LA", "La")
    rgba = im.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    base.alpha_composite(rgba)
    return base.convert("L" if grey else "RGB")


def _log_ignored(encoder: str, options: list[tuple[str, bool]]) -> None:
    """Debug-log the sharp ``options`` (name, set) that are set but that ``encoder`` cannot
    honour; the image is encoded without them."""
    ignored = [name for name, on in options if on]
    if ignored:
        log.debug("convert_output: %s cannot honour %s; ignored", encoder, ", ".join(ignored))


# --- JPEG ---------------------------------------------------------------------------------


def jpeg_params(options: JpegOptions) -> dict[str, Any]:
    """Pillow ``Image.save(..., "JPEG", **params)`` arguments for sharp-style ``options``.

    * ``quality`` -> ``quality``; ``progressive`` -> ``progressive``;
      ``optimizeCoding`` -> ``optimize``;
    * ``chromaSubsampling`` "4:4:4" -> ``subsampling=0``, "4:2:0" -> ``subsampling=2``;
    * ``optimizeScans`` (or ``mozjpeg``) -> ``progressive=True`` (sharp: optimising scans
      forces progressive; libjpeg-turbo cannot search scan scripts, so only that part holds);
    * ``quantisationTable`` 0 -> libjpeg's Annex K tables (Pillow's default), 1 -> a flat table
      (mozjpeg's table 1) via ``qtables``, 2-8 -> Annex K (mozjpeg-only tables, logged);
      ``mozjpeg`` implies table 3, which is likewise not available;
    * ``trellisQuantisation``, ``overshootDeringing`` (and the same parts of ``mozjpeg``) need
      mozjpeg and are ignored.
    """
    params: dict[str, Any] = {
        "quality": options.quality,
        "optimize": options.optimizeCoding,
        "progressive": options.progressive or options.optimizeScans or options.mozjpeg,
        "subsampling": 0 if options.chromaSubsampling == "4:4:4" else 2,
    }
    table = 3 if options.mozjpeg and options.quantisationTable == 0 else options.quantisationTable
    if table == 1:
        params["qtables"] = [_FLAT_QTABLE, _FLAT_QTABLE]
    _log_ignored(
        "libjpeg-turbo",
        [
            ("mozjpeg", options.mozjpeg),
            ("trellisQuantisation", options.trellisQuantisation),
            ("overshootDeringing", options.overshootDeringing),
            (f"quantisationTable={table}", table >= 2),
        ],
    )
    return params


def _jpeg(im: Image.Image, options: JpegOptions) -> tuple[Image.Image, dict[str, Any]]:
    im = _to_8bit(im)
    if _has_alpha(im):
        im = _flatten(im, JPEG_BACKGROUND)
    elif im.mode == "1":
        im = im.convert("L")
    elif im.mode not in ("L", "RGB", "CMYK"):
        im = im.convert("RGB")
    params = jpeg_params(options)
    if im.mode == "L":
        params.pop("subsampling")  # one channel: nothing to subsample
    return im, params


# --- WebP ---------------------------------------------------------------------------------


def webp_params(options: WebpOptions) -> dict[str, Any]:
    """Pillow ``Image.save(..., "WEBP", **params)`` arguments for sharp-style ``options``.

    * ``quality`` -> ``quality`` (in lossless mode libwebp reads it as compression effort,
      which is what libvips passes it as, too); ``alphaQuality`` -> ``alpha_quality``;
      ``lossless`` -> ``lossless`` plus ``exact`` (RGB under transparent pixels is kept);
      ``effort`` -> ``method``;
    * ``nearLossless`` -> ``lossless=True``: Pillow has no near-lossless preprocessing knob,
      and sharp's near-lossless is lossless encoding of slightly quantised pixels, so the nearest
      honest equivalent is exact lossless (larger file, never worse pixels);
    * ``smartSubsample`` (libwebp ``use_sharp_yuv``) and ``preset`` are not exposed by Pillow's
      WebP encoder and are ignored (libwebp's "default" preset and plain RGB->YUV are used).
    """
    lossless = options.lossless or options.nearLossless
    params: dict[str, Any] = {
        "quality": options.quality,
        "alpha_quality": options.alphaQuality,
        "lossless": lossless,
        "method": options.effort,
        # libwebp may rewrite the RGB of fully transparent pixels unless told to keep them
        # exact; lossless here means every RGBA value survives (sharp leaves `exact` off).
        "exact": lossless,
    }
    _log_ignored(
        "Pillow's WebP encoder",
        [
            ("nearLossless (encoded lossless)", options.nearLossless and not options.lossless),
            ("smartSubsample", options.smartSubsample),
            (f"preset={options.preset}", options.preset != "default"),
        ],
    )
    return params


def _webp(im: Image.Image, options: WebpOptions) -> tuple[Image.Image, dict[str, Any]]:
    im = _to_8bit(im)
    mode = "RGBA" if _has_alpha(im) else "RGB"
    if im.mode != mode:  # convert() copies even to the same mode: 4 bytes a pixel
        im = im.convert(mode)
    return im, webp_params(options)
