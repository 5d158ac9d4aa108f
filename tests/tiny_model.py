"""A tiny upscale model generated for the tests, so none of them needs a downloaded file.

The model is a RealESRGAN "Compact" network (SRVGGNetCompact: conv 3->8, PReLU, two
conv 8->8 + PReLU, conv 8->12, pixel shuffle x2) with 8 features, about 10 KB. ComfyUI's
``UpscaleModelLoader`` (spandrel) detects it from its tensor names and shapes as RealESRGAN
Compact, scale 2, so ``ImageUpscaleWithModel`` really runs it (on CPU in milliseconds).
Weights come from a seeded RNG (PyTorch's default uniform(+-1/sqrt(fan_in)) initialisation;
PReLU slopes 0.25), so the file's bytes are the same on every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save, save_file

NAME = "tiny-compact-x2.safetensors"
FEATURES = 8
SCALE = 2
SEED = 20240601


def tiny_upscale_tensors(seed: int = SEED) -> dict[str, np.ndarray]:
    """The model's tensors by name (``body.N.weight`` / ``body.N.bias``), float32."""
    rng = np.random.default_rng(seed)
    out_channels = 3 * SCALE * SCALE
    convs = [(3, FEATURES), (FEATURES, FEATURES), (FEATURES, FEATURES), (FEATURES, out_channels)]
    tensors: dict[str, np.ndarray] = {}
    for i, (c_in, c_out) in enumerate(convs):
        bound = 1.0 / np.sqrt(c_in * 3 * 3)
        conv = f"body.{2 * i}"
        tensors[f"{conv}.weight"] = rng.uniform(-bound, bound, (c_out, c_in, 3, 3)).astype(
            np.float32
        )
        tensors[f"{conv}.bias"] = rng.uniform(-bound, bound, (c_out,)).astype(np.float32)
        if i < len(convs) - 1:  # a PReLU after every conv but the last
            tensors[f"body.{2 * i + 1}.weight"] = np.full((FEATURES,), 0.25, np.float32)
    return tensors


def tiny_upscale_model_bytes() -> bytes:
    """The model as a ``.safetensors`` file's bytes."""
    return save(tiny_upscale_tensors())


def write_tiny_upscale_model(path: Path) -> Path:
    """Write the model to ``path`` (parents created) and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_upscale_tensors(), str(path))
    return path
