"""A double of ComfyUI 0.8.0's HTTP + websocket API for CI, replaying the behaviour recorded in
tests/transcripts: the same routes, status codes, 400 bodies, frame types and order
(status, execution_start, execution_cached, progress_state, executing, progress, executed,
execution_success | execution_error | execution_interrupted, status, executing{node: null}),
interrupts that take effect at the next node boundary, POST /queue delete of pending prompts,
history written before the final ``executing`` frame, and real image files written with Pillow.
A node's ``execution_error`` names files by absolute path as ComfyUI's does (LoadImage of a
file that is not an image: ``cannot identify image file '<input dir>/x.png'`` and the recorded
traceback, its frames under the base directory, standing for ComfyUI's home) and is logged to
stderr the way ComfyUI's execution.py logs it.

Run it like ComfyUI: ``python tests/comfy_double.py --listen 127.0.0.1 --port 8188
--base-directory DIR`` (input/, output/, temp/ and models/ live under DIR unless given with
--input-directory/--output-directory; ``--temp-directory X`` means ``X/temp`` as in ComfyUI, and
the temp dir is emptied at start as ComfyUI's ``cleanup_temp`` does). Nodes: EmptyImage, LoadImage,
LoadImageMask, ImageInvert, ImageBlur (slow: ~1.5 s per 2048x2048 image), SaveImage,
PreviewImage, SaveAnimatedWEBP, SaveAnimatedPNG, UpscaleModelLoader, ImageUpscaleWithModel
(emits ``progress``), ``DoubleExit`` (exits the process with ``code``, for crash tests),
``DoubleTicks`` (test-only: ``steps`` timed ``progress`` frames whose send times
``GET /__double__/tick_times/{prompt_id}`` returns, for bench/jobs_bench.py;
``GET /__double__/partner_keys`` gives the sha256 of each prompt's
``extra_data.api_key_comfy_org``, which, as in ComfyUI, stays out of its queue and history) and
``DoubleOutOfMemory`` (passes its image through, but first raises ComfyUI's out-of-memory
execution_error, ``torch.OutOfMemoryError``, the first ``times`` times it runs for ``key``).

Test-only controls under ``/__double__/``: ``drop_websockets``, ``refuse_websockets``
(``{"refused": true}``: new websockets are closed at once), ``mute`` (every socket silent),
``stale_websockets`` (the sockets open now stay open but get no more frames; new ones do, as in
comfyui-api issue #186) and ``stall`` (``{"stalled": true}``: the prompt worker stops taking
prompts, as when ComfyUI's worker thread died; they stay pending). Every prompt it executes
is journalled, in order, to ``double-executions.jsonl`` in the base directory (``prompt_id``,
the ``filename_prefix`` of each save node, and ``status``: ``running``, then ``success`` or
``error``), so the count survives the double being killed (tests/jobs/test_redis_queue.py's
``journal`` reads it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import heapq
import io
import itertools
import json
import os
import random
import shutil
import string
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import uvicorn
from litestar import Litestar, Request, Response, get, post, websocket
from litestar.connection import WebSocket
from PIL import Image, ImageFilter, ImageOps


def now_ms() -> int:
    return int(time.time() * 1000)


class Interrupted(Exception):
    pass


class NodeFailure(Exception):
    """A node's exception: ComfyUI's ``execution_error`` names its type and message and the
    traceback ``frames`` (``(file under the ComfyUI home, line, function, source)``)."""

    def __init__(
        self, exc_type: str, message: str, frames: tuple[tuple[str, int, str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.message = message
        self.frames = frames or EXECUTE_FRAMES


#: The frames of ComfyUI 0.8.0's traceback that every node failure starts with.
EXECUTE_FRAMES = (
    (
        "execution.py",
        518,
        "execute",
        "output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data("
        "prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, "
        "pre_execute_cb=pre_execute_cb, v3_data=v3_data)",
    ),
)
#: The traceback of a LoadImage of a file that is not an image (transcript
#: execution_error_bad_image): ComfyUI's own files and PIL's, in its venv.
LOAD_IMAGE_FRAMES = (
    *EXECUTE_FRAMES,
    (
        "execution.py",
        329,
        "get_output_data",
        "return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, "
        "input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb="
        "execution_block_cb, pre_execute_cb=pre_execute_cb, v3_data=v3_data)",
    ),
    ("execution.py", 303, "_async_map_node_over_list", "await process_inputs(input_dict, i)"),
    ("execution.py", 291, "process_inputs", "result = f(**inputs)"),
    ("nodes.py", 1664, "load_image", "img = node_helpers.pillow(Image.open, image_path)"),
    ("node_helpers.py", 31, "pillow", "x = fn(arg)"),
    (
        ".venv/lib/python3.11/site-packages/PIL/Image.py",
        3730,
        "open",
        "raise UnidentifiedImageError(msg)",
    ),
)


INT = ("INT", {"default": 512, "min": 1, "max": 16384, "step": 1})

# class_type -> (required inputs {name: kind}, output_node)
NODES: dict[str, tuple[dict[str, Any], bool]] = {
    "EmptyImage": ({"width": "INT", "height": "INT", "batch_size": "INT", "color": "INT"}, False),
    "LoadImage": ({"image": "FILE"}, False),
    "LoadImageMask": ({"image": "FILE", "channel": "STRING"}, False),
    "ImageInvert": ({"image": "IMAGE"}, False),
    "ImageBlur": ({"image": "IMAGE", "blur_radius": "INT", "sigma": "FLOAT"}, False),
    "SaveImage": ({"images": "IMAGE", "filename_prefix": "STRING"}, True),
    "PreviewImage": ({"images": "IMAGE"}, True),
    "SaveAnimatedWEBP": ({"images": "IMAGE", "filename_prefix": "STRING"}, True),
    "SaveAnimatedPNG": ({"images": "IMAGE", "filename_prefix": "STRING"}, True),
    "UpscaleModelLoader": ({"model_name": "MODEL_FILE"}, False),
    # Known (warmup prompts name their checkpoint in one) but not runnable here.
    "CheckpointLoaderSimple": ({"ckpt_name": "STRING"}, False),
    "ImageUpscaleWithModel": ({"upscale_model": "UPSCALE_MODEL", "image": "IMAGE"}, False),
    "DoubleExit": ({"code": "INT"}, True),
    # Test-only (bench/jobs_bench.py): timed progress frames, see Double.run_node.
    "DoubleTicks": ({"image": "IMAGE", "steps": "INT", "interval_ms": "INT"}, False),
    "DoubleOutOfMemory": ({"image": "IMAGE", "times": "INT", "key": "STRING"}, False),
}
OPTIONAL_DEFAULTS = {"LoadImageMask": {"channel": "alpha"}, "ImageBlur": {"sigma": 1.0}}


class Double:
    def __init__(self, args: argparse.Namespace) -> None:
        base = Path(args.base_directory).absolute()
        #: Where ComfyUI's code (and its .venv) would be: traceback frames name files here.
        self.home = base
        # ComfyUI's main.py makes --input-directory and --output-directory absolute.
        self.input_dir = Path(args.input_directory or base / "input").absolute()
        self.output_dir = Path(args.output_directory or base / "output").absolute()
        # ComfyUI's main.py: --temp-directory X means X/temp; the temp dir is emptied at start
        # (its cleanup_temp), so what a killed predecessor left there is gone.
        self.temp_dir = Path(args.temp_directory) / "temp" if args.temp_directory else base / "temp"
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.models_dir = base / "models"
        for d in (
            self.input_dir,
            self.output_dir,
            self.temp_dir,
            self.models_dir / "upscale_models",
            self.models_dir / "checkpoints",
        ):
            d.mkdir(parents=True, exist_ok=True)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: dict[str, WebSocket[Any, Any, Any]] = {}
        #: Client ids that sent ``feature_flags`` with ``supports_preview_metadata``.
        self.preview_metadata: set[str] = set()
        self.queue: list[tuple[float, str, dict[str, Any], dict[str, Any], list[str]]] = []
        self.running: tuple[float, str, dict[str, Any], dict[str, Any], list[str]] | None = None
        self.history: dict[str, dict[str, Any]] = {}
        self.number = itertools.count()
        self.wakeup = asyncio.Event()
        self.interrupt_flag = threading.Event()
        self.cache: dict[str, tuple[Any, dict[str, Any] | None]] = {}
        self.muted = False
        #: Test-only (DoubleTicks): prompt_id -> wall-clock send time (s) of each tick.
        self.tick_times: dict[str, list[float]] = {}
        self.stale_sockets: set[int] = set()  # id() of sockets that get no more frames
        self.stalled = False
        #: While True, websocket upgrades are refused (a ComfyUI whose socket is down).
        self.ws_refused = False
        #: Bodies of the ``POST /free`` calls received.
        self.frees: list[Any] = []
        #: sha256 of each prompt's ``extra_data.api_key_comfy_org`` (ComfyUI's sensitive
        #: extra data: kept out of the queue and history, as server.py does).
        self.partner_keys: dict[str, str] = {}
        self.oom_raised: dict[str, int] = {}
        self.temp_tag = "".join(random.choices(string.ascii_lowercase, k=5))
        #: Test-only: every prompt taken by the worker, a line each time its status changes.
        self.journal = base / "double-executions.jsonl"

    # --- websocket --------------------------------------------------------------------------

    def queue_remaining(self) -> int:
        return len(self.queue) + (1 if self.running else 0)

    async def send(self, kind: str, data: dict[str, Any], sid: str | None) -> None:
        if self.muted:
            return
        message = json.dumps({"type": kind, "data": data})
        targets = (
            list(self.clients.values())
            if sid is None
            else ([self.clients[sid]] if sid in self.clients else [])
        )
        for ws in targets:
            if id(ws) in self.stale_sockets:
                continue
            try:
                await ws.send_data(message)
            except Exception:
                pass

    async def send_status(self) -> None:
        await self.send(
            "status", {"status": {"exec_info": {"queue_remaining": self.queue_remaining()}}}, None
        )

    async def send_preview(self, image: bytes, meta: dict[str, Any], sid: str | None) -> None:
        """A binary preview frame, as ComfyUI sends while a node runs: type 4
        (PREVIEW_IMAGE_WITH_METADATA: 4-byte JSON length, the JSON, the image) to a client that
        announced ``supports_preview_metadata``, else type 1 (4-byte format 2 = PNG, the image)."""
        ws = self.clients.get(sid or "")
        if ws is None or self.muted:
            return
        if sid in self.preview_metadata:
            head = json.dumps({**meta, "image_type": "image/png"}).encode()
            frame = struct.pack(">II", 4, len(head)) + head + image
        else:
            frame = struct.pack(">II", 1, 2) + image
        try:
            await ws.send_data(frame, mode="binary")
        except Exception:
            pass

    def send_threadsafe(self, kind: str, data: dict[str, Any], sid: str | None) -> None:
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(self.send(kind, data, sid), self.loop).result()

    # --- validation -------------------------------------------------------------------------

    def validate(self, prompt: Any) -> tuple[int, dict[str, Any]] | list[str]:
        def err(kind: str, message: str, details: str = "") -> tuple[int, dict[str, Any]]:
            return 400, {
                "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
                "node_errors": {},
            }

        if not isinstance(prompt, dict):
            return err("no_prompt", "No prompt provided")
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                return err(
                    "invalid_prompt",
                    "Cannot execute because a node is missing the class_type property.",
                    f"Node ID '#{node_id}'",
                )
            if node["class_type"] not in NODES:
                return err(
                    "invalid_prompt",
                    f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}'",
                )
        outputs = [n for n, node in prompt.items() if NODES[node["class_type"]][1]]
        if not outputs:
            return err("prompt_no_outputs", "Prompt has no outputs")
        node_errors: dict[str, Any] = {}
        good: list[str] = []
        for out in outputs:
            problems = self._validate_node(prompt, out, set())
            if problems is None:
                good.append(out)
                continue
            bad_node, error = problems
            entry = node_errors.setdefault(
                bad_node,
                {
                    "errors": [error],
                    "dependent_outputs": [],
                    "class_type": prompt.get(bad_node, prompt[out])["class_type"],
                },
            )
            entry["dependent_outputs"].append(out)
        if node_errors:
            first = next(iter(node_errors.values()))["errors"][0]
            details = ""
            if first["type"] == "exception_during_validation":
                details = f"Exception when validating node: {first['details']}"
            body = {
                "error": {
                    "type": "prompt_outputs_failed_validation",
                    "message": "Prompt outputs failed validation",
                    "details": details,
                    "extra_info": {},
                },
                "node_errors": node_errors,
            }
            return 400, body
        return good

    def _validate_node(
        self, prompt: dict[str, Any], node_id: str, seen: set[str]
    ) -> tuple[str, dict[str, Any]] | None:
        if node_id in seen:
            return None
        seen.add(node_id)
        node = prompt[node_id]
        inputs = {**OPTIONAL_DEFAULTS.get(node["class_type"], {}), **(node.get("inputs") or {})}
        for name, kind in NODES[node["class_type"]][0].items():
            if name not in inputs:
                return node_id, {
                    "type": "required_input_missing",
                    "message": "Required input is missing",
                    "details": name,
                    "extra_info": {"input_name": name},
                }
            value = inputs[name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                source = str(value[0])
                if source not in prompt:
                    return node_id, {
                        "type": "exception_during_validation",
                        "message": "Exception when validating node",
                        "details": f"'{source}'",
                        "extra_info": {
                            "exception_type": "KeyError",
                            "traceback": [
                                '  File "/opt/ComfyUI/execution.py", line 818, in validate_inputs\n'
                                "    o_class_type = prompt[o_id]['class_type']\n"
                            ],
                        },
                    }
                nested = self._validate_node(prompt, source, seen)
                if nested is not None:
                    return nested
                continue
            if kind == "INT":
                try:
                    int(value)
                except (TypeError, ValueError):
                    return node_id, {
                        "type": "invalid_input_type",
                        "message": "Failed to convert an input value to a INT value",
                        "details": f"{name}, {value}, invalid literal for int() with base 10: "
                        f"{value!r}",
                        "extra_info": {
                            "input_name": name,
                            "input_config": list(INT),
                            "received_value": value,
                            "exception_message": f"invalid literal for int() with "
                            f"base 10: {value!r}",
                        },
                    }
            if kind == "FILE" and not self.annotated_path(str(value)).is_file():
                return node_id, {
                    "type": "custom_validation_failed",
                    "message": "Custom validation failed for node",
                    "details": f"image - Invalid image file: {value}",
                    "extra_info": {"input_name": name},
                }
            if (
                kind == "MODEL_FILE"
                and not (self.models_dir / "upscale_models" / str(value)).is_file()
            ):
                options = sorted(p.name for p in (self.models_dir / "upscale_models").iterdir())
                return node_id, {
                    "type": "value_not_in_list",
                    "message": "Value not in list",
                    "details": f"{name}: '{value}' not in {options}",
                    "extra_info": {"input_name": name, "received_value": value},
                }
        return None

    # --- execution ----------------------------------------------------------------------------

    async def worker(self) -> None:
        while True:
            while not self.queue or self.stalled:
                self.wakeup.clear()
                await self.wakeup.wait()
            item = heapq.heappop(self.queue)
            self.running = item
            self.interrupt_flag.clear()
            await self.send_status()
            execution = self.record_execution(item)
            await asyncio.to_thread(self.execute, item)
            entry = self.history.get(item[1]) or {}
            self.record_execution(item, execution, entry.get("status", {}).get("status_str"))
            self.running = None
            await self.send_status()
            await self.send(
                "executing", {"node": None, "prompt_id": item[1]}, item[3].get("client_id")
            )

    def record_execution(
        self,
        item: tuple[float, str, dict[str, Any], dict[str, Any], list[str]],
        execution: dict[str, Any] | None = None,
        status: str | None = None,
    ) -> dict[str, Any]:
        """Test-only: note that prompt ``item`` starts (``execution`` None) or ended with
        ``status``, in the journal file; returns its entry."""
        if execution is None:
            prompt = item[2]
            prefixes = [
                str(node["inputs"]["filename_prefix"])
                for node in prompt.values()
                if "filename_prefix" in (node.get("inputs") or {})
            ]
            execution = {"prompt_id": item[1], "prefixes": prefixes, "status": "running"}
        else:
            execution["status"] = status or "error"
        with self.journal.open("a") as journal:
            journal.write(json.dumps(execution) + "\n")
        return execution

    def order(self, prompt: dict[str, Any], outputs: list[str]) -> list[str]:
        ordered: list[str] = []

        def visit(node_id: str) -> None:
            if node_id in ordered:
                return
            for value in (prompt[node_id].get("inputs") or {}).values():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                    visit(str(value[0]))
            ordered.append(node_id)

        for out in outputs:
            visit(out)
        return ordered

    def annotated_path(self, name: str) -> Path:
        """ComfyUI's ``folder_paths.get_annotated_filepath``: ``x.png [output]`` is read from
        the output directory (the annotation and the character before it removed), likewise
        ``[input]`` and ``[temp]``; a plain name from the input directory. No containment
        check, as in ComfyUI."""
        for suffix, directory in (
            ("[output]", self.output_dir),
            ("[input]", self.input_dir),
            ("[temp]", self.temp_dir),
        ):
            if name.endswith(suffix):
                return Path(os.path.join(directory, name[: -len(suffix) - 1]))
        return Path(os.path.join(self.input_dir, name))

    def signature(self, prompt: dict[str, Any], node_id: str, memo: dict[str, str]) -> str:
        if node_id not in memo:
            node = prompt[node_id]
            parts = [node["class_type"]]
            for name, value in sorted((node.get("inputs") or {}).items()):
                if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                    parts.append(f"{name}=<{self.signature(prompt, str(value[0]), memo)}>")
                else:
                    parts.append(f"{name}={json.dumps(value, sort_keys=True)}")
                    if node["class_type"] in ("LoadImage", "LoadImageMask") and name == "image":
                        path = self.annotated_path(str(value))
                        parts.append(str(path.stat().st_mtime_ns) if path.exists() else "-")
            memo[node_id] = "|".join(parts)
        return memo[node_id]

    def execute(self, item: tuple[float, str, dict[str, Any], dict[str, Any], list[str]]) -> None:
        number, prompt_id, prompt, extra, outputs = item
        sid = extra.get("client_id")
        messages: list[list[Any]] = []

        def emit(kind: str, data: dict[str, Any], record: bool = False) -> None:
            if record:
                messages.append([kind, data])
            self.send_threadsafe(kind, data, sid)

        emit("execution_start", {"prompt_id": prompt_id, "timestamp": now_ms()}, True)
        order = self.order(prompt, outputs)
        memo: dict[str, str] = {}
        sigs = {n: self.signature(prompt, n, memo) for n in order}
        cached = [n for n in order if sigs[n] in self.cache]
        emit(
            "execution_cached",
            {"nodes": cached, "prompt_id": prompt_id, "timestamp": now_ms()},
            True,
        )
        values: dict[str, Any] = {}
        ui_outputs: dict[str, dict[str, Any]] = {}
        states: dict[str, dict[str, Any]] = {}
        executed: list[str] = []

        def progress_state() -> None:
            emit("progress_state", {"prompt_id": prompt_id, "nodes": dict(states)})

        def state(node_id: str, value: float, kind: str) -> None:
            states[node_id] = {
                "value": value,
                "max": 1.0,
                "state": kind,
                "node_id": node_id,
                "prompt_id": prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            progress_state()

        status_str, completed = "success", True
        for node_id in order:
            node = prompt[node_id]
            class_type = node["class_type"]
            if node_id in cached:
                values[node_id], ui = self.cache[sigs[node_id]]
                if ui is not None:
                    ui_outputs[node_id] = ui
                    emit(
                        "executed",
                        {
                            "node": node_id,
                            "display_node": node_id,
                            "output": ui,
                            "prompt_id": prompt_id,
                        },
                    )
                state(node_id, 1.0, "finished")
                continue
            if self.interrupt_flag.is_set():
                emit(
                    "execution_interrupted",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": class_type,
                        "executed": list(reversed(executed)),
                        "timestamp": now_ms(),
                    },
                    True,
                )
                status_str, completed = "error", False
                break
            state(node_id, 0.0, "running")
            emit("executing", {"node": node_id, "display_node": node_id, "prompt_id": prompt_id})
            inputs = {**OPTIONAL_DEFAULTS.get(class_type, {}), **(node.get("inputs") or {})}
            resolved = {
                k: values[str(v[0])]
                if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)
                else v
                for k, v in inputs.items()
            }
            try:
                value, ui = self.run_node(class_type, resolved, prompt_id, node_id, emit, sid)
            except NodeFailure as exc:
                frames = [
                    f'  File "{self.home / path}", line {line}, in {function}\n    {source}\n'
                    for path, line, function, source in exc.frames
                ]
                # ComfyUI's execution.py logs the exception and its traceback (its stderr).
                print(
                    f"!!! Exception during processing !!! {exc.message.rstrip()}\n"
                    f"Traceback (most recent call last):\n{''.join(frames)}"
                    f"{exc.exc_type}: {exc.message.rstrip()}",
                    file=sys.stderr,
                    flush=True,
                )
                emit(
                    "execution_error",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": class_type,
                        "executed": list(reversed(executed)),
                        "exception_message": exc.message,
                        "exception_type": exc.exc_type,
                        "traceback": frames,
                        "current_inputs": {
                            k: [v] for k, v in inputs.items() if not isinstance(v, list)
                        },
                        "current_outputs": list(reversed(order)),
                        "timestamp": now_ms(),
                    },
                    True,
                )
                status_str, completed = "error", False
                break
            values[node_id] = value
            self.cache[sigs[node_id]] = (value, ui)
            executed.append(node_id)
            if ui is not None:
                ui_outputs[node_id] = ui
                emit(
                    "executed",
                    {
                        "node": node_id,
                        "display_node": node_id,
                        "output": ui,
                        "prompt_id": prompt_id,
                    },
                )
            state(node_id, 1.0, "finished")
        if completed:
            success = {"prompt_id": prompt_id, "timestamp": now_ms()}
            messages.append(["execution_success", success])
        self.history[prompt_id] = {
            "prompt": [number, prompt_id, prompt, extra, outputs],
            "outputs": ui_outputs,
            "status": {"status_str": status_str, "completed": completed, "messages": messages},
            "meta": {
                n: {"node_id": n, "display_node": n, "parent_node": None, "real_node_id": n}
                for n in ui_outputs
            },
        }
        if completed:
            self.send_threadsafe("execution_success", success, sid)

    def _save(
        self, images: list[Image.Image], prefix: str, directory: Path, ext: str, animated: bool
    ) -> list[dict[str, str]]:
        sub, _, base = prefix.rpartition("/")
        folder = directory / sub
        folder.mkdir(parents=True, exist_ok=True)
        counter = 1
        for existing in folder.glob(f"{base}_*_.{ext}"):
            try:
                counter = max(counter, int(existing.name[len(base) + 1 :].split("_")[0]) + 1)
            except ValueError:
                continue
        kind = "temp" if directory == self.temp_dir else "output"
        result = []
        batches: list[list[Image.Image]] = [images] if animated else [[i] for i in images]
        for batch in batches:
            name = f"{base}_{counter:05}_.{ext}"
            if animated:
                batch[0].save(
                    folder / name, save_all=True, append_images=batch[1:], duration=166, loop=0
                )
            else:
                batch[0].save(folder / name, compress_level=4)
            result.append({"filename": name, "subfolder": sub, "type": kind})
            counter += 1
        return result

    def run_node(
        self,
        class_type: str,
        inputs: dict[str, Any],
        prompt_id: str,
        node_id: str,
        emit: Any,
        sid: str | None = None,
    ) -> tuple[Any, dict[str, Any] | None]:
        if class_type == "EmptyImage":
            color = int(inputs["color"])
            rgb = ((color >> 16) & 255, (color >> 8) & 255, color & 255)
            size = (int(inputs["width"]), int(inputs["height"]))
            return [Image.new("RGB", size, rgb) for _ in range(int(inputs["batch_size"]))], None
        if class_type in ("LoadImage", "LoadImageMask"):
            path = self.annotated_path(str(inputs["image"]))
            try:
                with Image.open(path) as image:
                    image.load()
                    return [image.convert("RGB")], None
            except Exception:
                raise NodeFailure(
                    "PIL.UnidentifiedImageError",
                    f"cannot identify image file '{path}'\n",
                    LOAD_IMAGE_FRAMES,
                ) from None
        if class_type == "ImageInvert":
            return [ImageOps.invert(i) for i in inputs["image"]], None
        if class_type == "ImageBlur":
            images = inputs["image"]
            delay = sum(i.width * i.height for i in images) / (2048 * 2048) * 1.5
            time.sleep(delay)
            radius = max(1, int(inputs["blur_radius"]) // 8)
            return [
                i.filter(ImageFilter.BoxBlur(radius)) if i.width * i.height < 512 * 512 else i
                for i in images
            ], None
        if class_type == "SaveImage":
            return None, {
                "images": self._save(
                    inputs["images"], str(inputs["filename_prefix"]), self.output_dir, "png", False
                )
            }
        if class_type == "PreviewImage":
            return None, {
                "images": self._save(
                    inputs["images"], f"ComfyUI_temp_{self.temp_tag}", self.temp_dir, "png", False
                )
            }
        if class_type in ("SaveAnimatedWEBP", "SaveAnimatedPNG"):
            ext = "webp" if class_type == "SaveAnimatedWEBP" else "png"
            return None, {
                "images": self._save(
                    inputs["images"], str(inputs["filename_prefix"]), self.output_dir, ext, True
                ),
                "animated": [True],
            }
        if class_type == "UpscaleModelLoader":
            return str(inputs["model_name"]), None
        if class_type == "ImageUpscaleWithModel":
            images = inputs["image"]
            time.sleep(0.02)
            emit("progress", {"value": 1, "max": 1, "prompt_id": prompt_id, "node": node_id})
            preview = io.BytesIO()
            images[0].resize((16, 16)).save(preview, "PNG")
            meta = {"node_id": node_id, "display_node_id": node_id, "prompt_id": prompt_id}
            assert self.loop is not None
            asyncio.run_coroutine_threadsafe(
                self.send_preview(preview.getvalue(), meta, sid), self.loop
            ).result()
            return [i.resize((i.width * 2, i.height * 2)) for i in images], None
        if class_type == "DoubleTicks":
            # Test-only knob for bench/jobs_bench.py: ``steps`` progress frames (value 1..steps)
            # ``interval_ms`` apart; the wall-clock time just before each is sent is kept for
            # GET /__double__/tick_times/{prompt_id}.
            steps, sent = int(inputs["steps"]), self.tick_times.setdefault(prompt_id, [])
            for value in range(1, steps + 1):
                time.sleep(int(inputs["interval_ms"]) / 1000)
                sent.append(time.time())
                emit(
                    "progress",
                    {"value": value, "max": steps, "prompt_id": prompt_id, "node": node_id},
                )
            return inputs["image"], None
        if class_type == "DoubleOutOfMemory":
            key = str(inputs["key"])
            if self.oom_raised.get(key, 0) < int(inputs["times"]):
                self.oom_raised[key] = self.oom_raised.get(key, 0) + 1
                raise NodeFailure(
                    "torch.OutOfMemoryError",
                    "Allocation on device \nThis error means you ran out of memory on your GPU."
                    "\n\nTIPS: If the workflow worked before you might have accidentally set "
                    "the batch_size to a large number.",
                )
            return inputs["image"], None
        if class_type == "DoubleExit":
            sys.stderr.flush()
            os._exit(int(inputs["code"]))
        raise NodeFailure("NotImplementedError", f"the double cannot run {class_type}")

    # --- HTTP -----------------------------------------------------------------------------

    def app(self) -> Litestar:
        double = self

        @get("/", sync_to_thread=False, media_type="text/html")
        def index() -> str:
            return "<html><body>ComfyUI double</body></html>"

        @post("/prompt", status_code=200)
        async def queue_prompt(request: Request[Any, Any, Any]) -> Response[Any]:
            body = await request.json()
            checked = double.validate(body.get("prompt"))
            if isinstance(checked, tuple):
                return Response(checked[1], status_code=checked[0])
            prompt_id = str(body.get("prompt_id") or os.urandom(16).hex())
            number = float(next(double.number))
            # ComfyUI 0.8.0 keeps the body's extra_data (the sidecar's traceparent) with the
            # queue item and its history, client_id and create_time added to it, and leaves
            # out its SENSITIVE_EXTRA_DATA_KEYS (the partner key: only its hash is recorded).
            extra_data = body.get("extra_data")
            extra_data = dict(extra_data) if isinstance(extra_data, dict) else {}
            sensitive = extra_data.pop("api_key_comfy_org", None)
            if isinstance(sensitive, str):
                double.partner_keys[prompt_id] = hashlib.sha256(sensitive.encode()).hexdigest()
            extra = {**extra_data, "client_id": body.get("client_id"), "create_time": now_ms()}
            heapq.heappush(double.queue, (number, prompt_id, body["prompt"], extra, checked))
            double.wakeup.set()
            await double.send_status()
            return Response({"prompt_id": prompt_id, "number": number, "node_errors": {}})

        @get("/prompt", sync_to_thread=False)
        def prompt_info() -> dict[str, Any]:
            return {"exec_info": {"queue_remaining": double.queue_remaining()}}

        @get("/queue", sync_to_thread=False)
        def get_queue() -> dict[str, Any]:
            running = [list(double.running)] if double.running else []
            return {"queue_running": running, "queue_pending": [list(i) for i in double.queue]}

        @post("/queue", status_code=200)
        async def post_queue(request: Request[Any, Any, Any]) -> Response[bytes]:
            body = await request.json()
            if body.get("clear"):
                double.queue.clear()
            if body.get("delete"):
                drop = set(body["delete"])
                double.queue = [i for i in double.queue if i[1] not in drop]
                heapq.heapify(double.queue)
            await double.send_status()
            return Response(b"", status_code=200)

        @post("/interrupt", status_code=200)
        async def interrupt(request: Request[Any, Any, Any]) -> Response[bytes]:
            raw = await request.body()
            body = json.loads(raw) if raw else {}
            target = body.get("prompt_id")
            if double.running and (target is None or target == double.running[1]):
                double.interrupt_flag.set()
            return Response(b"", status_code=200)

        @get("/history/{prompt_id:str}", sync_to_thread=False)
        def history_one(prompt_id: str) -> dict[str, Any]:
            entry = double.history.get(prompt_id)
            return {prompt_id: entry} if entry else {}

        @get("/history", sync_to_thread=False)
        def history_all() -> dict[str, Any]:
            return double.history

        @get("/system_stats", sync_to_thread=False)
        def system_stats() -> dict[str, Any]:
            return {
                "system": {
                    "os": "linux",
                    "comfyui_version": "0.8.0-double",
                    "python_version": sys.version,
                    "argv": sys.argv,
                },
                "devices": [{"name": "cpu", "type": "cpu", "index": None}],
            }

        @get("/models", sync_to_thread=False)
        def models() -> list[str]:
            return sorted(p.name for p in double.models_dir.iterdir() if p.is_dir())

        @get("/models/{folder:str}", sync_to_thread=False)
        def models_in(folder: str) -> Response[Any]:
            path = double.models_dir / folder
            if not path.is_dir():
                return Response(b"", status_code=404)
            return Response(sorted(p.name for p in path.iterdir() if p.is_file()))

        def info(class_type: str) -> dict[str, Any]:
            required, output_node = NODES[class_type]
            return {
                "input": {"required": {k: [v] for k, v in required.items()}},
                "output_node": output_node,
                "name": class_type,
                "display_name": class_type,
                "category": "double",
            }

        @get("/object_info", sync_to_thread=False)
        def object_info_all() -> dict[str, Any]:
            return {name: info(name) for name in NODES}

        @get("/object_info/{class_type:str}", sync_to_thread=False)
        def object_info(class_type: str) -> dict[str, Any]:
            return {class_type: info(class_type)} if class_type in NODES else {}

        @post("/free", status_code=200)
        async def free(request: Request[Any, Any, Any]) -> Response[bytes]:
            double.frees.append(await request.json())
            double.cache.clear()
            return Response(b"")

        @get("/__double__/frees", sync_to_thread=False)
        def frees() -> list[Any]:
            """Test-only: the bodies of every ``POST /free`` so far, in order."""
            return double.frees

        @get("/features", sync_to_thread=False)
        def features() -> dict[str, Any]:
            return {"supports_preview_metadata": True, "max_upload_size": 104857600}

        @post("/__double__/drop_websockets", status_code=200)
        async def drop_websockets(request: Request[Any, Any, Any]) -> dict[str, Any]:
            """Close every websocket (a lost connection, for reconciliation tests)."""
            sockets = list(double.clients.values())
            double.clients.clear()
            for sock in sockets:
                try:
                    await sock.close()
                except Exception:
                    pass
            return {"dropped": len(sockets)}

        @post("/__double__/mute", status_code=200)
        async def mute(request: Request[Any, Any, Any]) -> dict[str, Any]:
            """Stop sending frames (``{"muted": true}``): a zombie socket that stays open."""
            double.muted = bool((await request.json()).get("muted", True))
            return {"muted": double.muted}

        @get("/__double__/partner_keys", sync_to_thread=False)
        def partner_keys() -> dict[str, str]:
            """Test-only: prompt id -> sha256 of the ``extra_data.api_key_comfy_org`` it was
            queued with."""
            return double.partner_keys

        @get("/__double__/tick_times/{prompt_id:str}", sync_to_thread=False)
        def tick_times(prompt_id: str) -> list[float]:
            """Test-only: send times (s since epoch) of a DoubleTicks node's progress frames."""
            return double.tick_times.get(prompt_id, [])

        @post("/__double__/stale_websockets", status_code=200)
        async def stale_websockets(request: Request[Any, Any, Any]) -> dict[str, Any]:
            """The sockets open now stay open but get no more frames (new ones do)."""
            double.stale_sockets.update(id(sock) for sock in double.clients.values())
            return {"stale": len(double.clients)}

        @post("/__double__/stall", status_code=200)
        async def stall(request: Request[Any, Any, Any]) -> dict[str, Any]:
            """``{"stalled": true}``: the worker stops taking prompts (they stay pending)."""
            double.stalled = bool((await request.json()).get("stalled", True))
            double.wakeup.set()
            return {"stalled": double.stalled}

        @post("/__double__/refuse_websockets", status_code=200)
        async def refuse_websockets(request: Request[Any, Any, Any]) -> dict[str, Any]:
            """``{"refused": true}``: new websockets are closed at once (HTTP still answers)."""
            double.ws_refused = bool((await request.json()).get("refused", True))
            return {"refused": double.ws_refused}

        @websocket("/ws")
        async def ws(socket: WebSocket[Any, Any, Any]) -> None:
            if double.ws_refused:
                await socket.close(code=1013)
                return
            await socket.accept()
            sid = socket.query_params.get("clientId") or os.urandom(16).hex()
            double.clients[sid] = socket
            await socket.send_data(
                json.dumps(
                    {
                        "type": "status",
                        "data": {
                            "status": {"exec_info": {"queue_remaining": double.queue_remaining()}},
                            "sid": sid,
                        },
                    }
                )
            )
            try:
                while True:
                    message = json.loads(await socket.receive_data(mode="text"))
                    flags = message.get("data") if message.get("type") == "feature_flags" else None
                    if isinstance(flags, dict) and flags.get("supports_preview_metadata"):
                        double.preview_metadata.add(sid)
            except Exception:
                pass
            finally:
                if double.clients.get(sid) is socket:
                    del double.clients[sid]
                    double.preview_metadata.discard(sid)

        return Litestar(
            [
                index,
                queue_prompt,
                prompt_info,
                get_queue,
                post_queue,
                interrupt,
                history_one,
                history_all,
                system_stats,
                models,
                models_in,
                object_info_all,
                object_info,
                free,
                features,
                drop_websockets,
                refuse_websockets,
                frees,
                mute,
                tick_times,
                partner_keys,
                stale_websockets,
                stall,
                ws,
            ],
            openapi_config=None,
        )


async def main_async(args: argparse.Namespace) -> None:
    double = Double(args)
    double.loop = asyncio.get_running_loop()
    worker = asyncio.ensure_future(double.worker())
    config = uvicorn.Config(
        double.app(),
        host=args.listen,
        port=args.port,
        log_level="warning",
        lifespan="off",
        ws="websockets-sansio",
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
        if serving.done():
            serving.result()
            return
    print("Starting server\n", file=sys.stderr)
    print(f"To see the GUI go to: http://{args.listen}:{args.port}", file=sys.stderr, flush=True)
    await serving
    worker.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description="ComfyUI 0.8.0 double for tests")
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--base-directory", default=os.getcwd())
    parser.add_argument("--input-directory")
    parser.add_argument("--output-directory")
    parser.add_argument("--temp-directory")
    parser.add_argument("--disable-auto-launch", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument(
        "--startup-delay",
        type=float,
        default=0.0,
        help="seconds to sleep before listening (slow start-up)",
    )
    args = parser.parse_args()
    print("Total VRAM 0 MB, total RAM 0 MB (double)", file=sys.stderr, flush=True)
    if args.startup_delay:
        time.sleep(args.startup_delay)
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass
    except Exception:
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
