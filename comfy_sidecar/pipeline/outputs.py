"""Collect a finished job's output files and stream them back as comfyui-api's JSON body
(:class:`~comfy_sidecar.schemas.PromptResponse`).

Every entry of ``outputs[node][key][]`` that has a ``filename`` and ``type`` ``output`` is a file
at ``OUTPUT_DIR/<subfolder>/<filename>`` (``temp`` outputs, e.g. PreviewImage, are left out;
``animated`` flags and ``text`` strings are not files, but ``animated: [true]`` marks the node's
files as animations, which conversion leaves alone). Nodes are taken in ascending numeric id
order, the order comfyui-api's JavaScript object iteration gives. Files are read in chunks and
base64-encoded while the response is written, never held whole in memory.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from comfy_sidecar.schemas import PromptResponse, ResultHead, Stats
from comfy_sidecar.schemas.nodes import node_order_key

log = logging.getLogger("comfy_sidecar.outputs")

CHUNK = 3 * 64 * 1024  # a multiple of 3, so chunks base64-encode without padding in between
#: Results whose files add up to at most this many bytes are answered as one body (one write
#: instead of a chunked stream: less CPU per request); larger ones are streamed.
INLINE_LIMIT = 4 * 1024 * 1024


MEDIA_TYPES = ("image", "video", "audio", "text")


def media_type_of(mime: str) -> str:
    """``image``, ``video``, ``audio``, ``text`` or ``other`` for a MIME type."""
    major = mime.split("/", 1)[0]
    for media_type in MEDIA_TYPES:  # the constant: retained jobs share it
        if major == media_type:
            return media_type
    return "other"


def mime_type_of(filename: str) -> str:
    """The MIME type of ``filename`` by its extension (``application/octet-stream`` if
    unknown)."""
    guessed, _ = mimetypes.guess_type(filename)
    return guessed or "application/octet-stream"


@dataclass
class OutputFile:
    """One output file on disk. ``filename`` is what the response calls it."""

    path: Path
    filename: str
    node_id: str
    key: str
    animated: bool = False

    @property
    def size(self) -> int:
        """Size in bytes (0 if the file is gone)."""
        try:
            return self.path.stat().st_size
        except OSError:
            return 0


class OutputError(Exception):
    """An output ComfyUI reported cannot be read."""


def collect_outputs(outputs: dict[str, dict[str, Any]], output_dir: str) -> list[OutputFile]:
    """The job's output files, in node order. Raises :class:`OutputError` if one is missing
    or its path would leave ``output_dir``."""
    root = Path(output_dir).resolve()
    files: list[OutputFile] = []
    for node_id in sorted(outputs, key=node_order_key):
        ui = outputs[node_id]
        if not isinstance(ui, dict):
            continue
        flags = ui.get("animated")
        animated = isinstance(flags, list) and any(flag is True for flag in flags)
        for key, entries in ui.items():
            if not isinstance(entries, list):
                continue
            for entry in entries:
                if not isinstance(entry, dict) or "filename" not in entry:
                    continue
                if entry.get("type", "output") != "output":
                    continue
                subfolder = str(entry.get("subfolder") or "")
                path = (root / subfolder / str(entry["filename"])).resolve()
                if not path.is_relative_to(root):
                    raise OutputError(f"output {entry['filename']!r} is outside OUTPUT_DIR")
                if not path.is_file():
                    raise OutputError(
                        f"output {subfolder + '/' if subfolder else ''}{entry['filename']} of "
                        f"node {node_id} is missing from OUTPUT_DIR"
                    )
                files.append(OutputFile(path, path.name, node_id, key, animated))
    return files


def remove_outputs(files: list[OutputFile], output_dir: str) -> None:
    """Delete output files, and subfolders they leave empty (never OUTPUT_DIR itself)."""
    root = Path(output_dir).resolve()
    for item in files:
        try:
            item.path.unlink()
        except FileNotFoundError:
            continue
        parent = item.path.parent
        while parent != root and parent.is_relative_to(root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def remove_job_outputs(
    outputs: dict[str, dict[str, Any]], prompt: dict[str, Any], output_dir: str
) -> int:
    """Delete what ComfyUI wrote to OUTPUT_DIR for a job that failed or was interrupted, and
    return how many files went.

    Two sources, since a failed job has no complete history: the ``output`` files named in
    ``outputs`` (what its ``executed`` frames or history reported; missing ones are skipped),
    and every file under a ``filename_prefix`` of the preprocessed ``prompt`` that follows
    ComfyUI's save naming, ``<prefix>_<counter>...`` (``folder_paths.get_save_image_path``;
    the prefix carries the job id, so no other job's file matches). Paths that would leave
    OUTPUT_DIR are never touched."""
    root = Path(output_dir).resolve()
    doomed: dict[Path, OutputFile] = {}
    for node_id, ui in outputs.items():
        if not isinstance(ui, dict):
            continue
        for key, entries in ui.items():
            for entry in entries if isinstance(entries, list) else []:
                if not isinstance(entry, dict) or entry.get("type", "output") != "output":
                    continue
                if "filename" not in entry:
                    continue
                subfolder = str(entry.get("subfolder") or "")
                path = (root / subfolder / str(entry["filename"])).resolve()
                if path.is_relative_to(root) and path != root:
                    doomed[path] = OutputFile(path, path.name, str(node_id), str(key))
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        prefix = inputs.get("filename_prefix") if isinstance(inputs, dict) else None
        if not isinstance(prefix, str) or not prefix or "\x00" in prefix:
            continue
        sub, _, base = prefix.rpartition("/")
        folder = (root / sub).resolve()
        if not base or not folder.is_relative_to(root) or not folder.is_dir():
            continue
        pattern = re.compile(re.escape(base) + r"_\d+")
        for child in folder.iterdir():
            if pattern.match(child.name) and child.is_file() and not child.is_symlink():
                doomed[child] = OutputFile(child, child.name, "", "")
    present = [item for item in doomed.values() if item.path.exists()]
    remove_outputs(present, output_dir)
    if present:
        log.info("removed %d output file(s) of a job that did not finish", len(present))
    return len(present)


def base64_chunks(path: Path) -> AsyncIterator[bytes]:
    """Base64 of the file at ``path``, in chunks of at most 256 KiB."""

    async def gen() -> AsyncIterator[bytes]:
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                yield base64.b64encode(chunk)

    return gen()


async def stream_result(
    head: ResultHead,
    files: list[OutputFile],
    stats: Callable[[], Stats],
    finish: Callable[[], None],
) -> AsyncIterator[bytes]:
    """Yield the JSON of the :class:`PromptResponse` that ``head``, ``files`` and ``stats()``
    make, byte for byte what :func:`result_body` encodes to.

    ``images`` holds the base64 of each file, encoded while streaming (results with upload
    URLs are small and go through :func:`result_body`).
    ``stats()`` is called after the images are written (so timings include them); ``finish()``
    runs last, even if the client goes away (it removes the files).
    """
    encode = msgspec.json.encode
    try:
        body = encode(head)
        yield body[:-1] + b',"filenames":' + encode([f.filename for f in files]) + b',"images":['
        for index, item in enumerate(files):
            yield b'"' if index == 0 else b',"'
            async for chunk in base64_chunks(item.path):
                yield chunk
            yield b'"'
        yield b'],"stats":' + encode(stats()) + b"}"
    finally:
        finish()


def result_body(
    head: ResultHead, files: list[OutputFile], urls: list[str] | None, stats: Stats
) -> PromptResponse:
    """The 200 body built at once: ``images`` are ``urls``, else the base64 of each file (for
    small results only: the caller checks the files add up to at most :data:`INLINE_LIMIT`
    bytes; larger ones go through :func:`stream_result`)."""
    if urls is not None:
        images = urls
    else:
        images = [base64.b64encode(f.path.read_bytes()).decode("ascii") for f in files]
    return PromptResponse(
        **msgspec.structs.asdict(head),
        filenames=[f.filename for f in files],
        images=images,
        stats=stats,
    )
