"""comfy-sidecar: supervise ComfyUI and serve a stateless, comfyui-api compatible HTTP API."""

__version__ = "0.1.0"
