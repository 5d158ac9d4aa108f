"""Request and response types of the public API (msgspec), shared by routes, pipeline and docs.

Field names, defaults and shapes copy comfyui-api's ``/prompt`` schema (its ``PromptRequest``);
where comfyui-api's behaviour is a bug (``convert_output`` options, secrets echoed back) these
types say what we do instead.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

JobId = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9_-]{1,128}$",
        description="API job id: 1-128 of A-Z a-z 0-9 _ -. Default: a random UUID.",
        examples=["123e4567-e89b-12d3-a456-426614174000"],
    ),
]


class PromptNode(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One node of an API-format prompt."""

    class_type: Annotated[str, Meta(description="ComfyUI node class, e.g. `SaveImage`.")]
    inputs: Annotated[
        dict[str, Any],
        Meta(description="Input values; a link is `[node_id, output_index]`."),
    ]
    meta: Annotated[Any, Meta(description="UI metadata, passed through.")] = field(
        default=None, name="_meta"
    )


Prompt = Annotated[
    dict[str, PromptNode],
    Meta(
        description="ComfyUI API-format graph: node id -> node.",
        examples=[
            {
                "1": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": 256, "height": 256, "batch_size": 1, "color": 0},
                },
                "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                "3": {
                    "class_type": "SaveImage",
                    "inputs": {"images": ["2", 0], "filename_prefix": "ComfyUI"},
                },
            }
        ],
    ),
]


# --- download auth (comfyui-api's DownloadAuth, a union tagged by `type`) -------------------


class BearerAuth(msgspec.Struct, tag_field="type", tag="bearer", forbid_unknown_fields=True):
    """`Authorization: Bearer <token>`."""

    token: str


class BasicAuth(msgspec.Struct, tag_field="type", tag="basic", forbid_unknown_fields=True):
    """HTTP basic auth."""

    username: str
    password: str


class HeaderAuth(msgspec.Struct, tag_field="type", tag="header", forbid_unknown_fields=True):
    """A custom header."""

    header_name: str
    header_value: str


class QueryAuth(msgspec.Struct, tag_field="type", tag="query", forbid_unknown_fields=True):
    """A query parameter added to the URL."""

    query_param: str
    query_value: str


class S3Auth(msgspec.Struct, tag_field="type", tag="s3", forbid_unknown_fields=True):
    """Per-request S3 credentials."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    endpoint: str | None = None
    region: str | None = None


DownloadAuth = BearerAuth | BasicAuth | HeaderAuth | QueryAuth | S3Auth


class Credential(msgspec.Struct, forbid_unknown_fields=True):
    """Auth for every URL of the request matching `url_pattern` (a glob; first match wins)."""

    url_pattern: Annotated[str, Meta(description="Glob over the whole URL; `*` stops at `/`.")]
    auth: DownloadAuth


# --- uploads ------------------------------------------------------------------------------


class S3Upload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Upload outputs to `s3://<bucket>/<prefix>/<filename>`."""

    bucket: str
    prefix: str = ""
    async_: bool = field(default=False, name="async")


class HFUpload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Upload outputs to a Hugging Face repository."""

    repo: str
    repo_type: Literal["model", "dataset"] = "model"
    revision: str = "main"
    directory: str = ""
    async_: bool = field(default=False, name="async")


class AzureBlobUpload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Upload outputs to an Azure Blob container."""

    container: str
    blob_prefix: str = ""
    async_: bool = field(default=False, name="async")


class HTTPUpload(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """PUT outputs to `<url_prefix>/<filename>`."""

    url_prefix: str
    async_: bool = field(default=False, name="async")


# --- convert_output (a union tagged by `format`; comfyui-api drops WebP options) ----------


class JpegOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """sharp-style JPEG options (see README for how each maps to Pillow)."""

    quality: Annotated[int, Meta(ge=1, le=100)] = 80
    progressive: bool = False
    chromaSubsampling: Literal["4:4:4", "4:2:0"] = "4:2:0"
    optimizeCoding: bool = True
    mozjpeg: bool = False
    trellisQuantisation: bool = False
    overshootDeringing: bool = False
    optimizeScans: bool = False
    quantisationTable: Annotated[int, Meta(ge=0, le=8)] = 0


class WebpOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """sharp-style WebP options (see README for how each maps to Pillow)."""

    quality: Annotated[int, Meta(ge=1, le=100)] = 80
    alphaQuality: Annotated[int, Meta(ge=0, le=100)] = 100
    lossless: bool = False
    nearLossless: bool = False
    smartSubsample: bool = False
    preset: Literal["default", "photo", "picture", "drawing", "icon", "text"] = "default"
    effort: Annotated[int, Meta(ge=0, le=6)] = 4


class ConvertJpeg(msgspec.Struct, tag_field="format", tag="jpeg", forbid_unknown_fields=True):
    """Convert image outputs to JPEG (`.jpeg`)."""

    options: JpegOptions = field(default_factory=JpegOptions)


class ConvertJpg(msgspec.Struct, tag_field="format", tag="jpg", forbid_unknown_fields=True):
    """Convert image outputs to JPEG (`.jpg`)."""

    options: JpegOptions = field(default_factory=JpegOptions)


class ConvertWebp(msgspec.Struct, tag_field="format", tag="webp", forbid_unknown_fields=True):
    """Convert image outputs to WebP (`.webp`)."""

    options: WebpOptions = field(default_factory=WebpOptions)


ConvertOutput = ConvertJpeg | ConvertJpg | ConvertWebp


# --- the request --------------------------------------------------------------------------


class PromptOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every /prompt field except `prompt` (shared with /workflow/* bodies)."""

    id: JobId | None = None
    webhook: Annotated[
        str | None, Meta(description="Deprecated v1 webhook: one POST per output.")
    ] = None
    webhook_v2: Annotated[
        str | None, Meta(description="One signed POST with the whole result.")
    ] = None
    convert_output: ConvertOutput | None = None
    credentials: list[Credential] | None = None
    s3: S3Upload | None = None
    hf_upload: HFUpload | None = None
    azure_blob_upload: AzureBlobUpload | None = None
    http_upload: HTTPUpload | None = None


class PromptRequest(PromptOptions, kw_only=True, forbid_unknown_fields=True):
    """Body of `POST /prompt`."""

    prompt: Prompt


# --- responses ----------------------------------------------------------------------------


class NodeTiming(msgspec.Struct):
    """When ComfyUI started a node, in ms since the epoch."""

    start: int


class ComfyExecution(msgspec.Struct, kw_only=True):
    """ComfyUI's own timings, ms since the epoch (durations in ms)."""

    start: int
    end: int
    duration: int
    nodes: dict[str, NodeTiming] = {}


class Stats(msgspec.Struct, kw_only=True):
    """Timings of one job, in ms (comfyui-api's `stats`)."""

    comfy_execution: ComfyExecution
    preprocess_time: int
    comfy_round_trip_time: int
    postprocess_time: int
    upload_time: int
    total_time: int


class Echoed(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The request fields every result body repeats, the ones the request gave (comfyui-api
    echoes the whole request; `credentials` never are), and `input` on workflow endpoints."""

    webhook: str | None = None
    webhook_v2: str | None = None
    convert_output: ConvertOutput | None = None
    s3: S3Upload | None = None
    hf_upload: HFUpload | None = None
    azure_blob_upload: AzureBlobUpload | None = None
    http_upload: HTTPUpload | None = None
    input: Annotated[
        dict[str, Any] | None, Meta(description="The workflow's `input` (workflow endpoints).")
    ] = None


class ResultHead(Echoed, kw_only=True, omit_defaults=True):
    """The fields of a 200 body that come before the outputs (a streamed body starts so)."""

    id: str
    prompt: Annotated[dict[str, Any], Meta(description="The prompt as ComfyUI ran it.")]
    conversion_errors: Annotated[
        dict[str, str] | None,
        Meta(description="Output files `convert_output` could not convert (kept as they are)."),
    ] = None


class PromptResponse(ResultHead, kw_only=True, omit_defaults=True):
    """200 body of a synchronous `/prompt`: outputs as base64, or uploaded URLs."""

    filenames: list[str]
    images: Annotated[
        list[str], Meta(description="Base64 of each output file, or its uploaded URL.")
    ]
    stats: Stats


class AcceptedResponse(Echoed, kw_only=True, omit_defaults=True):
    """202 body when the result is delivered by webhook or async upload."""

    status: Literal["ok"]
    id: str
    prompt: dict[str, Any]


class ErrorResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every 4xx/5xx body: `error` says what is wrong, `location` names the field."""

    error: Annotated[
        str,
        Meta(
            description="What is wrong, in words.",
            examples=["not a file in the input directory, a URL ..."],
        ),
    ]
    location: Annotated[
        str | None,
        Meta(
            description="The field at fault, e.g. `prompt.3.inputs.image`, `id`, "
            "`convert_output.options.effort`, `prompt` or `body`.",
            examples=["prompt.1.inputs.image"],
        ),
    ] = None
    id: Annotated[str | None, Meta(description="The job id, once one was assigned.")] = None
    node_errors: Annotated[
        dict[str, Any] | None,
        Meta(description="ComfyUI's `node_errors` from its validation (400)."),
    ] = None
    comfyui_error: Annotated[
        Any, Meta(description="ComfyUI's own `error` object from its validation (400).")
    ] = None
    node_id: Annotated[str | None, Meta(description="Node that failed (500, 499).")] = None
    node_type: Annotated[str | None, Meta(description="Its class_type (500, 499).")] = None
    exception_type: Annotated[str | None, Meta(description="Python exception (500).")] = None
    exception_message: Annotated[str | None, Meta(description="Its message (500).")] = None
    traceback: Annotated[list[str] | None, Meta(description="ComfyUI's traceback (500).")] = None
    comfyui_log_tail: Annotated[
        list[str] | None, Meta(description="The last lines ComfyUI logged (500, 503).")
    ] = None


class InstanceStatus(msgspec.Struct, kw_only=True):
    """One ComfyUI instance, as the probes list it."""

    name: str
    phase: str
    detail: str
    port: int
    gpu: str | None
    connected: bool
    jobs: Annotated[int, Meta(description="Jobs it holds (running and queued in ComfyUI).")]
    pid: Annotated[int | None, Meta(description="The ComfyUI child's process id.")]


class ProbeResponse(msgspec.Struct, kw_only=True):
    """Body of `/health` and `/ready` (comfyui-api's plus `phase`, `detail`, the sidecar's
    queue and each instance's phase)."""

    version: str
    status: str
    phase: str
    detail: str
    queue: Annotated[
        dict[str, int], Meta(description="`waiting` in the sidecar, `running` on instances.")
    ]
    instances: list[InstanceStatus]


class InterruptRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /interrupt`."""

    id: str


class InterruptResponse(msgspec.Struct):
    """Body of `POST /interrupt`: `interrupted` is `success` or `failed`."""

    id: str
    interrupted: Literal["success", "failed"]
