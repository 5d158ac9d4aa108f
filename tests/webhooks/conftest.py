"""Real HTTP receivers on 127.0.0.1 for the webhook and Salad tests."""

from __future__ import annotations

import socket

import pytest

from comfy_sidecar.config import Settings, load_settings
from tests.receiver import Receiver, Recorded

__all__ = ["Receiver", "Recorded", "make_settings"]


@pytest.fixture
def refused_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def make_settings(**env: str) -> Settings:
    """Settings from a clean environment plus ``env``."""
    # The receivers run on loopback: allowed explicitly (test_netguard proves refusals).
    return load_settings({"HOME": "/tmp", "ALLOWED_URL_HOSTS": "127.0.0.0/8,::1,localhost", **env})
