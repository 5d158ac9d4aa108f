"""credentials[].url_pattern globs: comfyui-api's semantics, matched in linear time, bounded."""

from __future__ import annotations

import asyncio

import pytest

from comfy_sidecar.config import load_settings
from comfy_sidecar.errors import InputError
from comfy_sidecar.schemas import BearerAuth, Credential, PromptOptions
from comfy_sidecar.storage import BadRequestError, Storage
from comfy_sidecar.storage.globs import MAX_GLOB_WILDCARDS, compile_glob


@pytest.mark.parametrize(
    ("pattern", "url", "matches"),
    [
        ("https://*.example.com/*", "https://a.example.com/m.bin", True),
        ("https://*.example.com/*", "https://a.example.com/d/m.bin", False),  # * stops at /
        ("https://a.example.com/**", "https://a.example.com/d/e/m.bin", True),  # ** crosses
        ("https://h/?.bin", "https://h/a.bin", True),
        ("https://h/?.bin", "https://h/ab.bin", False),
        ("https://h/a.b", "https://h/aXb", False),  # regex characters are literal
        ("https://h/**.png", "https://h/x/y.png", True),
        ("https://h/***", "https://h/x/y", True),
        ("", "", True),
    ],
)
def test_glob_semantics(pattern: str, url: str, matches: bool) -> None:
    assert compile_glob(pattern).match(url) is matches


def test_backtracking_pattern_returns() -> None:
    # comfyui-api's regex took 16.8 s on this; each extra ** cost about x12.
    url = "https://example.com/" + "a/" * 23 + "b"  # 67 characters, no Z
    assert len(url) == 67
    assert compile_glob("**" * 8 + "Z").match(url) is False
    mixed = "*a" * MAX_GLOB_WILDCARDS
    assert compile_glob(mixed).match("a" * 5000 + "b") is False


def test_patterns_are_compiled_once() -> None:
    assert compile_glob("https://h/*") is compile_glob("https://h/*")


def test_too_many_wildcards_is_400_with_location() -> None:
    storage = Storage(load_settings({"HOME": "/tmp"}))
    bad = "*a" * (MAX_GLOB_WILDCARDS + 1)
    creds = [
        Credential(url_pattern="https://h/*", auth=BearerAuth(token="t")),
        Credential(url_pattern=bad, auth=BearerAuth(token="t")),
    ]
    with pytest.raises(InputError) as info:
        asyncio.run(storage.check_request(PromptOptions(credentials=creds)))
    assert info.value.location == "credentials[1].url_pattern"
    with pytest.raises(BadRequestError):
        compile_glob(bad)
    with pytest.raises(BadRequestError):
        compile_glob("x" * 5000)
