"""Walk a prompt before it is queued: filename prefixes, media inputs, output nodes.

Copies comfyui-api's ``preprocessNodes`` where it is right and fixes it where it is not:

* no value nests lists and objects deeper than :data:`MAX_NESTING_DEPTH` (checked without
  recursion; ComfyUI's prompt worker dies on a prompt nested about 490 deep), and the prompt
  forwarded to ComfyUI (media inputs already written to files) is at most
  :data:`MAX_PROMPT_BYTES` of JSON (``location: "prompt"``);
* every ``filename_prefix`` is rewritten (``PREPEND_FILENAMES``): ``<id>_<prefix>`` or ``<id>``
  (an empty prefix gives ``<id>``); a subfolder in the prefix (``videos/clip``) stays a
  subfolder (``videos/<id>_clip``). A prefix that would leave OUTPUT_DIR (absolute, ``..``
  above it), holds a control character (NUL, CR, LF, ...), is not a string (a link
  ``[node, index]`` is passed on), or whose file name is longer than
  :data:`MAX_PREFIX_NAME_BYTES` is a 400 (ComfyUI's SaveImage answers the first two with a
  500);
* media inputs (``image`` of any node, ``video``/``file`` of the video loaders, ``audio`` of
  ``LoadAudio``, ``directory`` lists of ``VHS_LoadImages*``) are resolved in a fixed order:
  ``data:`` URL, then a URL (http(s), s3), then a file that exists in ``INPUT_DIR``, then strictly
  validated base64; anything else is a 400 naming ``prompt.<node>.inputs.<field>``.
  ComfyUI's annotated names (``x.png [input]``, ``[output]``, ``[temp]``, read the way its
  ``folder_paths.annotated_filepath`` reads them) and plain names must name a file whose real
  path (symlinks followed) is inside that directory; otherwise they are a 400 too.
  Decoded and downloaded files are written inside ``INPUT_DIR/.comfy-sidecar/``
  (:data:`INPUTS_SUBDIR`; never symlinked, ComfyUI >= 0.28 rejects links that leave it) and
  removed when the job ends; what a killed sidecar left there is removed at the next start
  (:func:`remove_leftover_inputs`). comfyui-api writes them at the top of ``INPUT_DIR``;
  this folder keeps the sidecar's files apart from the user's;
* a prompt without an output node is refused (``location: "prompt"``); a node counts as an output
  when it has a ``filename_prefix`` (unless ``save_output`` is false) or ComfyUI's
  ``/object_info`` says ``output_node``.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import re
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from comfy_sidecar.errors import InputError, UpstreamFailed
from comfy_sidecar.net.bounded import gather_bounded
from comfy_sidecar.net.urls import is_url
from comfy_sidecar.pipeline.media import decode_base64, decode_data_url, sniff_extension
from comfy_sidecar.storage.errors import DiskFullError, is_disk_full
from comfy_sidecar.storage.files import link_or_copy

log = logging.getLogger("comfy_sidecar.preprocess")

#: The folder of INPUT_DIR that holds the sidecar's per-job input files (and nothing else):
#: ``<job id>_<n>.<ext>`` for media inputs, ``<job id>/`` for ``VHS_LoadImages*`` lists.
INPUTS_SUBDIR = ".comfy-sidecar"


def media_dir(job_id: str) -> str:
    """The folder, relative to INPUT_DIR, holding job ``job_id``'s staged request files (a
    job adapter's media, :mod:`comfy_sidecar.pipeline.staging`); removed with the job's other
    inputs when the job ends."""
    return f"{INPUTS_SUBDIR}/{job_id}-media"


def remove_leftover_inputs(input_dir: str | Path) -> int:
    """Delete what a killed predecessor left in ``INPUT_DIR/.comfy-sidecar`` (call it at
    start-up, before any job runs); returns how many entries went. Nothing outside that
    folder is touched: the user's own input files stay."""
    folder = Path(input_dir) / INPUTS_SUBDIR
    removed = 0
    if folder.is_symlink() or not folder.is_dir():
        return 0
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("removed %d input file(s) left by an earlier run", removed)
    return removed


def write_input(path: Path, data: bytes, location: str) -> None:
    """:func:`write_atomically` for the input at ``location`` (``prompt.<node>.inputs.<field>``):
    a full INPUT_DIR raises :class:`UpstreamFailed` caused by :class:`DiskFullError` (507 at the
    edge) naming that field."""
    try:
        write_atomically(path, data)
    except DiskFullError as full:
        raise UpstreamFailed(
            f"could not write the input: {full}", cause=full, location=location
        ) from None


#: Linux's longest file name (NAME_MAX), in bytes.
NAME_MAX = 255
#: What :func:`write_atomically` adds to a file's name while it writes it.
PART_SUFFIX = ".part"
#: The longest name, in UTF-8 bytes, of an input file written with :func:`write_atomically`
#: (a Modal media item's ``name``): NAME_MAX less :data:`PART_SUFFIX`.
MAX_INPUT_NAME_BYTES = NAME_MAX - len(PART_SUFFIX)


def place_input(src: Path, dest: Path, location: str) -> None:
    """Put the file ``src`` at ``dest`` for the input at ``location``: a hard link, else a
    streamed copy written atomically (never read into memory; never a symlink, which
    ComfyUI >= 0.28 refuses out of its input directory). A full INPUT_DIR raises
    :class:`UpstreamFailed` caused by :class:`DiskFullError` (507 at the edge)."""
    try:
        link_or_copy(src, dest, atomic=True)
    except OSError as exc:
        if is_disk_full(exc):
            full = DiskFullError("copying an input file failed: no space left in INPUT_DIR")
            raise UpstreamFailed(
                f"could not write the input: {full}", cause=full, location=location
            ) from None
        raise


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a ``.part`` sibling (:data:`PART_SUFFIX`) renamed
    into place; nothing is left when the write fails. A full disk raises
    :class:`DiskFullError`, other failures the ``OSError``."""
    tmp = path.with_name(path.name + PART_SUFFIX)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise DiskFullError(
                "writing an input file failed: no space left in INPUT_DIR"
            ) from None
        raise


IMAGE_LOADER_FIELDS = ("image",)
VIDEO_LOADERS = frozenset(
    {
        "LoadVideo",
        "VHS_LoadVideo",
        "VHS_LoadVideoPath",
        "VHS_LoadVideoFFmpeg",
        "VHS_LoadVideoFFmpegPath",
    }
)
AUDIO_LOADERS = frozenset({"LoadAudio", "VHS_LoadAudio", "VHS_LoadAudioUpload"})
IMAGE_DIR_LOADERS = frozenset({"VHS_LoadImages", "VHS_LoadImagesPath"})

#: ComfyUI's annotations (``folder_paths.annotated_filepath``): a name ending in one of these
#: is read from that directory, with the annotation and the one character before it (the
#: space in ``x.png [input]``) removed.
ANNOTATIONS = ("output", "input", "temp")

#: The deepest nesting of lists and objects in one input value (or in a node's ``_meta``) that
#: is forwarded to ComfyUI. Its prompt worker ``copy.deepcopy``s every queued prompt and that
#: thread dies of RecursionError from about 490 levels (no later job then runs); real prompts
#: nest 2 or 3 levels deep.
MAX_NESTING_DEPTH = 64

#: The largest prompt forwarded to ComfyUI, in bytes of JSON, once inline media are written to
#: files: ComfyUI ``deepcopy``s and validates it on its single prompt worker, so one huge prompt
#: stalls every job behind it. Real API-format prompts are kilobytes; thousands of nodes stay
#: far below this.
MAX_PROMPT_BYTES = 16 * 1024 * 1024

#: The longest file-name part of a rewritten ``filename_prefix`` (and of each of its folders),
#: in UTF-8 bytes: NAME_MAX (255) less room for ComfyUI's ``_00001_.webp``-style suffix.
MAX_PREFIX_NAME_BYTES = 240

#: Linux's longest path: a longer media value is never a file name.
PATH_MAX = 4096


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def rewrite_prefix(prefix: str, job_id: str, prepend: bool) -> str:
    """comfyui-api's filename_prefix rule, keeping any subfolder part a subfolder:
    ``<id>_<prefix>`` (``prepend``) or ``<id>``; an empty file-name part gives ``<id>``."""
    head, sep, tail = prefix.rpartition("/")
    new_tail = f"{job_id}_{tail}" if prepend and tail else job_id
    return f"{head}{sep}{new_tail}"


#: Control characters (Unicode category Cc: C0, DEL, C1). In a file name they break every
#: header that carries it (CR/LF end an HTTP header line) and every log line.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_prefix(prefix: str, location: str) -> None:
    """Raise :class:`InputError` at ``location`` unless ``prefix`` (a rewritten
    ``filename_prefix``) stays inside OUTPUT_DIR: relative, no ``..`` above its top, no
    control character (NUL, CR, LF, tab, DEL, C1: :data:`CONTROL_CHARACTERS`), each part at
    most :data:`MAX_PREFIX_NAME_BYTES` bytes. ComfyUI refuses the first two in SaveImage, after
    queueing, with a 500 that names its output directory; it takes CR/LF, and the output
    then cannot be served (``Content-Disposition`` cannot hold it)."""
    if CONTROL_CHARACTERS.search(prefix):
        raise InputError("must not contain control characters (NUL, CR, LF, tab, ...)", location)
    normal = posixpath.normpath(prefix)
    if posixpath.isabs(normal) or normal == ".." or normal.startswith("../"):
        raise InputError(
            "must stay inside the output directory (no absolute path, no .. above it)", location
        )
    if any(len(part.encode()) > MAX_PREFIX_NAME_BYTES for part in prefix.split("/")):
        raise InputError(
            f"too long: each part (with the job id) must be at most {MAX_PREFIX_NAME_BYTES} bytes",
            location,
        )


def nesting_exceeds(value: Any, limit: int) -> bool:
    """True when ``value`` nests lists/dicts more than ``limit`` deep (a scalar is 0 deep,
    ``[1]`` 1). Walks with an explicit stack, so any depth is safe to check."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth + 1 > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def check_size(prompt: dict[str, Any], limit: int = MAX_PROMPT_BYTES) -> None:
    """Raise :class:`InputError` (``location: "prompt"``) when ``prompt`` encodes to more than
    ``limit`` bytes of JSON. Call it once inline media were replaced by file names."""
    size = len(msgspec.json.encode(prompt))
    if size > limit:
        raise InputError(
            f"the prompt is {size} bytes of JSON once its media inputs are written to files; "
            f"at most {limit} are forwarded to ComfyUI",
            "prompt",
        )


def check_nesting(prompt: dict[str, Any], limit: int = MAX_NESTING_DEPTH) -> None:
    """Raise :class:`InputError` naming ``prompt.<node>.inputs.<name>`` (or ``prompt.<node>``,
    ``prompt.<node>._meta``) when a value nests deeper than ``limit``."""
    for node_id, node in prompt.items():
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key == "inputs" and isinstance(value, dict):
                named = [(f"prompt.{node_id}.inputs.{name}", v) for name, v in value.items()]
            else:
                named = [(f"prompt.{node_id}.{key}", value)]
            for location, item in named:
                if nesting_exceeds(item, limit):
                    raise InputError(
                        f"nested deeper than {limit} levels of lists and objects", location
                    )


def split_annotation(value: str) -> tuple[str, str] | None:
    """``(name, "input"|"output"|"temp")`` for a name ComfyUI reads from another directory,
    the way its ``folder_paths.annotated_filepath`` does (``"x.png [output]"`` gives
    ``("x.png", "output")``); None for a plain name."""
    for kind in ANNOTATIONS:
        if value.endswith(f"[{kind}]"):
            return value[: -len(kind) - 3], kind
    return None


def file_inside(directory: Path, name: str) -> Path | None:
    """The real path of ``name`` under ``directory`` when it is an existing file whose real
    path (symlinks followed) is inside ``directory``; None otherwise, including for any name
    the OS refuses (too long, NUL, ...)."""
    if "\x00" in name or len(name) > PATH_MAX:  # never a file; resolving it would be slow
        return None
    try:
        root = directory.resolve()
        candidate = (root / name).resolve()
        if candidate.is_relative_to(root) and candidate.is_file():
            return candidate
    except (OSError, ValueError):
        pass
    return None


# Loader nodes whose inputs may be a model URL, and the model folder each input reads.
# (comfyui-api sends UNETLoader to `diffusers` and CLIPVisionLoader to `text_encoders`; these
# are the folders ComfyUI's nodes actually list.)
MODEL_LOADERS: dict[str, dict[str, str]] = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "unCLIPCheckpointLoader": {"ckpt_name": "checkpoints"},
    "CheckpointLoader": {"ckpt_name": "checkpoints", "config_name": "configs"},
    "LoraLoader": {"lora_name": "loras"},
    "LoraLoaderModelOnly": {"lora_name": "loras"},
    "VAELoader": {"vae_name": "vae"},
    "ControlNetLoader": {"control_net_name": "controlnet"},
    "DiffControlNetLoader": {"control_net_name": "controlnet"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "StyleModelLoader": {"style_model_name": "style_models"},
    "GLIGENLoader": {"gligen_name": "gligen"},
    "UpscaleModelLoader": {"model_name": "upscale_models"},
}

MAX_CONCURRENT_DOWNLOADS = 8

NO_OUTPUT_NODE = (
    'Prompt must contain an output node, such as "SaveImage" (a node with a '
    '"filename_prefix" input, or one ComfyUI marks as an output node)'
)
NOT_MEDIA = (
    "not a file in the input directory, a URL (http, https, s3), a data: URL, nor valid base64"
)
UNKNOWN_MEDIA = (
    "decoded the base64 but could not tell the media type (expected an image, video or audio file)"
)


class Staging(Protocol):
    """Downloads for one job (the storage facade, the job's credentials and cache lease)."""

    async def input(self, url: str, stem: str, location: str) -> str:
        """Download ``url`` and link it into INPUT_DIR as ``<stem><ext>``; returns that name
        relative to INPUT_DIR. Raises :class:`InputError`."""
        ...

    async def model(self, url: str, folder: str, location: str) -> str:
        """Download ``url`` into the model folder ``folder``; returns the file name ComfyUI
        lists. Raises :class:`InputError`."""
        ...


@dataclass
class Prepared:
    """A prompt ready to queue, and the per-job input files to remove afterwards."""

    prompt: dict[str, Any]
    input_files: list[Path] = field(default_factory=list)
    input_dirs: list[Path] = field(default_factory=list)
    #: Folders removed whole (the job's staged request files).
    trees: list[Path] = field(default_factory=list)

    def cleanup(self) -> None:
        """Remove the job's input files and directories (missing ones are ignored)."""
        for tree in self.trees:
            shutil.rmtree(tree, ignore_errors=True)
        for path in self.input_files:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        for directory in self.input_dirs:
            try:
                directory.rmdir()
            except OSError:
                pass


def media_fields(class_type: str, inputs: dict[str, Any]) -> list[str]:
    """The node's inputs that take media: a non-empty ``image`` of any node, ``video`` and
    ``file`` of the video loaders, ``audio`` of the audio loaders (string values only)."""
    fields: list[str] = []
    if isinstance(inputs.get("image"), str) and inputs["image"]:
        fields.append("image")
    if class_type in VIDEO_LOADERS:
        fields += [f for f in ("video", "file") if isinstance(inputs.get(f), str)]
    if class_type in AUDIO_LOADERS and isinstance(inputs.get("audio"), str):
        fields.append("audio")
    return fields


@dataclass
class _Walk:
    """One :meth:`Preprocessor.prepare` call: the prompt being rewritten, its job, the
    downloads queued so far and a counter that names each media input's file."""

    prepared: Prepared
    job_id: str
    staging: Staging
    downloads: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    counter: int = 0

    def next_stem(self) -> str:
        """``.comfy-sidecar/<job id>_<n>``: the name relative to INPUT_DIR (without
        extension) of the next media input."""
        self.counter += 1
        return f"{INPUTS_SUBDIR}/{self.job_id}_{self.counter}"


class Preprocessor:
    """Prepares prompts for one sidecar. ``is_output_node(class_type)`` asks ComfyUI.
    ``output_dir`` and ``temp_dir`` are ComfyUI's, for ``[output]`` and ``[temp]`` names
    (refused when not given)."""

    def __init__(
        self,
        input_dir: str,
        prepend_filenames: bool,
        is_output_node: Callable[[str], Awaitable[bool]],
        *,
        output_dir: str | None = None,
        temp_dir: str | None = None,
    ) -> None:
        self.input_dir = Path(input_dir)
        self.prepend_filenames = prepend_filenames
        self._is_output_node = is_output_node
        self._annotated_dirs: dict[str, Path | None] = {
            "input": self.input_dir,
            "output": Path(output_dir) if output_dir else None,
            "temp": Path(temp_dir) if temp_dir else None,
        }

    async def prepare(self, prompt: dict[str, Any], job_id: str, staging: Staging) -> Prepared:
        """Rewrite ``prompt`` (a plain dict, modified in place) for job ``job_id``.

        URL values (media inputs, model loader inputs) are downloaded through ``staging``, all
        of one prompt at once (at most 8 at a time).
        Returns :class:`Prepared`. Raises :class:`InputError` for a caller's mistake and
        :class:`UpstreamFailed` caused by a :class:`DiskFullError` when INPUT_DIR (or the cache)
        is full; files it wrote before the error are removed.
        """
        prepared = Prepared(prompt, trees=[self.input_dir / media_dir(job_id)])
        try:
            await self._prepare(prepared, job_id, staging)
        except BaseException:
            prepared.cleanup()
            raise
        return prepared

    async def _prepare(self, prepared: Prepared, job_id: str, staging: Staging) -> None:
        """Walk the nodes in prompt order, then run the downloads and check for an output."""
        walk = _Walk(prepared, job_id, staging)
        check_nesting(prepared.prompt)
        has_output = False
        for node_id, node in prepared.prompt.items():
            inputs = node.get("inputs")
            if not isinstance(inputs, dict):
                continue
            class_type = str(node.get("class_type", ""))
            has_output = self._rewrite_prefix(inputs, job_id, node_id) or has_output
            await self._media_inputs(walk, node_id, class_type, inputs)
            self._model_inputs(walk, node_id, class_type, inputs)
            await self._image_directory(walk, node_id, class_type, inputs)
        check_size(prepared.prompt)
        await gather_bounded(walk.downloads, MAX_CONCURRENT_DOWNLOADS)
        if not has_output and not await self._any_output_node(prepared.prompt):
            raise InputError(NO_OUTPUT_NODE, "prompt")

    async def check(
        self,
        prompt: dict[str, Any],
        job_id: str,
        check_url: Callable[[str, str], Awaitable[None]],
        known_output_node: Callable[[str], bool | None],
    ) -> None:
        """Refuse what :meth:`prepare` would refuse, without its side effects: nothing is
        downloaded, written or asked of ComfyUI (a job of the shared queue is checked on the
        replica that takes the request and prepared on the one that runs it).

        Checks nesting and size, every ``filename_prefix``, every media value (a ``data:``
        URL or base64 decodes to a known media type, a name is a file inside its directory)
        and every URL (``check_url(url, location)``: scheme and the SSRF guard), and that an
        output node exists: one with a ``filename_prefix``, or a class_type for which
        ``known_output_node`` (ComfyUI's ``/object_info`` as cached) says True. A prompt
        whose class_types it does not all know (None) is let through: the running replica
        decides. ``prompt`` is not modified. Raises :class:`InputError` naming the field."""
        prompt = msgspec.json.decode(msgspec.json.encode(prompt))  # a copy to rewrite
        check_nesting(prompt)
        has_output = False
        for node_id, node in prompt.items():
            inputs = node.get("inputs")
            if not isinstance(inputs, dict):
                continue
            class_type = str(node.get("class_type", ""))
            has_output = self._rewrite_prefix(inputs, job_id, node_id) or has_output
            for name in media_fields(class_type, inputs):
                location = f"prompt.{node_id}.inputs.{name}"
                inputs[name] = await self._check_media(inputs[name], location, check_url)
            for name in MODEL_LOADERS.get(class_type, {}):
                if isinstance(inputs.get(name), str) and is_url(inputs[name]):
                    await check_url(inputs[name], f"prompt.{node_id}.inputs.{name}")
            directory = inputs.get("directory")
            if class_type in IMAGE_DIR_LOADERS and isinstance(directory, list):
                for index, item in enumerate(directory):
                    location = f"prompt.{node_id}.inputs.directory[{index}]"
                    if not isinstance(item, str):
                        raise InputError("expected a string", location)
                    await self._check_media(item, location, check_url)
                inputs["directory"] = f"{INPUTS_SUBDIR}/{job_id}"
        check_size(prompt)
        if has_output:
            return
        verdicts = [known_output_node(str(node.get("class_type", ""))) for node in prompt.values()]
        if any(verdicts) or None in verdicts:
            return
        raise InputError(NO_OUTPUT_NODE, "prompt")

    async def _check_media(
        self, value: str, location: str, check_url: Callable[[str, str], Awaitable[None]]
    ) -> str:
        """One media value checked as :meth:`_resolve` would take it; returns a stand-in of
        the name it would get (for the size check)."""
        stand_in = f"{INPUTS_SUBDIR}/{'x' * 36}_1.png"
        if is_url(value):
            await check_url(value, location)
            return stand_in
        if value.startswith("data:"):
            if decode_data_url(value, location)[1] is None:
                raise InputError(UNKNOWN_MEDIA, location)
            return stand_in
        annotated = split_annotation(value)
        if annotated is not None:
            return self._annotated(value, *annotated, location)
        if file_inside(self.input_dir, value) is not None:
            return value
        data = decode_base64(value)
        if data is None:
            raise InputError(NOT_MEDIA, location)
        if sniff_extension(data[:64]) is None:
            raise InputError(UNKNOWN_MEDIA, location)
        return stand_in

    def _rewrite_prefix(self, inputs: dict[str, Any], job_id: str, node_id: str) -> bool:
        """Rewrite and check the node's ``filename_prefix`` (:func:`check_prefix`); True when
        that makes it an output node (it has a prefix and ``save_output`` is not false).
        A link (``[node, index]``) is left to ComfyUI; any other non-string is a 400."""
        if "filename_prefix" not in inputs:
            return False
        prefix = inputs["filename_prefix"]
        location = f"prompt.{node_id}.inputs.filename_prefix"
        if _is_link(prefix):
            return False
        if not isinstance(prefix, str):
            raise InputError("expected a string", location)
        rewritten = rewrite_prefix(prefix, job_id, self.prepend_filenames)
        check_prefix(rewritten, location)
        inputs["filename_prefix"] = rewritten
        return inputs.get("save_output", True) not in (False, 0, "false", "False")

    async def _media_inputs(
        self, walk: _Walk, node_id: str, class_type: str, inputs: dict[str, Any]
    ) -> None:
        """Resolve the node's media inputs now, or queue their downloads when they are URLs."""
        for name in media_fields(class_type, inputs):
            location = f"prompt.{node_id}.inputs.{name}"
            stem = walk.next_stem()
            if is_url(inputs[name]):
                assign = functools.partial(inputs.__setitem__, name)
                walk.downloads.append(
                    self._stage_input(
                        walk.staging, inputs[name], stem, location, walk.prepared, assign
                    )
                )
            else:
                inputs[name] = await self._resolve(
                    inputs[name], location, stem, walk.prepared, self.input_dir
                )

    def _model_inputs(
        self, walk: _Walk, node_id: str, class_type: str, inputs: dict[str, Any]
    ) -> None:
        """Queue the downloads of a model loader's URL inputs into their model folders."""
        for name, folder in MODEL_LOADERS.get(class_type, {}).items():
            if isinstance(inputs.get(name), str) and is_url(inputs[name]):
                location = f"prompt.{node_id}.inputs.{name}"
                walk.downloads.append(
                    self._stage_model(walk.staging, inputs, name, folder, location)
                )

    async def _image_directory(
        self, walk: _Walk, node_id: str, class_type: str, inputs: dict[str, Any]
    ) -> None:
        """``VHS_LoadImages*`` given a list: each item becomes a file in ``INPUT_DIR/<job id>``
        (``00000.<ext>``, ...) and ``directory`` becomes that folder's name."""
        directory = inputs.get("directory")
        if class_type not in IMAGE_DIR_LOADERS or not isinstance(directory, list):
            return
        job_id, prepared = walk.job_id, walk.prepared
        target = self.input_dir / INPUTS_SUBDIR / job_id
        target.mkdir(parents=True, exist_ok=True)
        prepared.input_dirs.append(target)
        for index, item in enumerate(directory):
            location = f"prompt.{node_id}.inputs.directory[{index}]"
            if not isinstance(item, str):
                raise InputError("expected a string", location)
            if is_url(item):
                walk.downloads.append(
                    self._stage_input(
                        walk.staging,
                        item,
                        f"{INPUTS_SUBDIR}/{job_id}/{index:05d}",
                        location,
                        prepared,
                    )
                )
            else:
                await self._resolve(
                    item, location, f"{index:05d}", prepared, target, copy_local=True
                )
        inputs["directory"] = f"{INPUTS_SUBDIR}/{job_id}"

    async def _any_output_node(self, prompt: dict[str, Any]) -> bool:
        """True when ComfyUI marks one of the prompt's class_types as an output node."""
        for node in prompt.values():
            if await self._is_output_node(str(node.get("class_type", ""))):
                return True
        return False

    def _stage_input(
        self,
        staging: Staging,
        url: str,
        stem: str,
        location: str,
        prepared: Prepared,
        assign: Callable[[str], None] | None = None,
    ) -> Callable[[], Awaitable[None]]:
        """A download of ``url`` into INPUT_DIR as ``<stem><ext>``; the name it gets is passed
        to ``assign`` (when given) and removed with the job's other inputs."""

        async def download() -> None:
            name = await staging.input(url, stem, location)
            prepared.input_files.append(self.input_dir / name)
            if assign is not None:
                assign(name)

        return download

    @staticmethod
    def _stage_model(
        staging: Staging, inputs: dict[str, Any], name: str, folder: str, location: str
    ) -> Callable[[], Awaitable[None]]:
        async def download() -> None:
            inputs[name] = await staging.model(str(inputs[name]), folder, location)

        return download

    async def _resolve(
        self,
        value: str,
        location: str,
        stem: str,
        prepared: Prepared,
        target: Path,
        copy_local: bool = False,
    ) -> str:
        """Resolve one media value; returns what ComfyUI should see (a name in INPUT_DIR)."""
        if value.startswith("data:"):
            payload, ext = decode_data_url(value, location)
            return self._write(payload, ext, location, stem, prepared, target)
        annotated = split_annotation(value)
        if annotated is not None:
            return self._annotated(value, *annotated, location)
        local = file_inside(self.input_dir, value)
        if local is not None:
            if copy_local:
                destination = target / f"{stem}{local.suffix}"
                place_input(local, destination, location)
                prepared.input_files.append(destination)
            return value
        data = decode_base64(value)
        if data is None:
            raise InputError(NOT_MEDIA, location)
        return self._write(data, sniff_extension(data[:64]), location, stem, prepared, target)

    def _annotated(self, value: str, name: str, kind: str, location: str) -> str:
        """``value`` (``name [kind]``, ComfyUI resolves it) when ``name`` is a file inside
        ComfyUI's ``kind`` directory; else :class:`InputError` (no path in the message)."""
        directory = self._annotated_dirs[kind]
        if directory is None or file_inside(directory, name) is None:
            raise InputError(f"not a file in ComfyUI's {kind} directory", location)
        return value

    def _write(
        self,
        data: bytes,
        ext: str | None,
        location: str,
        stem: str,
        prepared: Prepared,
        target: Path,
    ) -> str:
        if ext is None:
            raise InputError(UNKNOWN_MEDIA, location)
        path = target / f"{stem}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_input(path, data, location)
        prepared.input_files.append(path)
        return path.relative_to(self.input_dir).as_posix()
