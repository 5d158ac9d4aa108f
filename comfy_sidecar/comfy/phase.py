"""Lifecycle phases, reported by the probes, of the sidecar and of each ComfyUI instance.

::

    starting -> provisioning -> launching -> warming -> ready
                                    ^                     |
                                    +---- restarting <----+   (child exited or hung)
    any -> stopping (SIGTERM/SIGINT)        any -> failed (gave up)

The sidecar is ``starting`` then ``provisioning`` (the manifest is installed once for every
instance); after that its phase is its instances' (``ready`` while at least
READY_MIN_INSTANCES are ready).
"""

from __future__ import annotations

import enum


class Phase(enum.StrEnum):
    """Where the sidecar, or one ComfyUI instance, is."""

    STARTING = "starting"
    PROVISIONING = "provisioning"
    LAUNCHING = "launching"
    WARMING = "warming"
    READY = "ready"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    FAILED = "failed"


class Fatal(Exception):
    """The sidecar cannot go on; the message is logged as one line and the exit status is 1."""
