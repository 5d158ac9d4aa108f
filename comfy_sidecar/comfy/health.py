"""The sidecar's health: its phase, liveness (``/health``), readiness (``/ready``) and whether
it takes new work (admission).

Phases are in :mod:`comfy_sidecar.comfy.phase`: the sidecar is ``starting`` then ``provisioning``;
after that its phase is its instances' (``ready`` while at least READY_MIN_INSTANCES of them
are). ``/health`` is 200 from the first time the sidecar is ready until it exits (comfyui-api's
``wasEverWarm``); ``/ready`` is 200 while enough instances are ready and the sidecar's queue is
below ``MAX_QUEUE_DEPTH``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from comfy_sidecar import __version__
from comfy_sidecar.comfy.dispatch import Dispatcher
from comfy_sidecar.comfy.instance import ComfyInstance, InstanceSignals
from comfy_sidecar.comfy.phase import Phase
from comfy_sidecar.config import Settings
from comfy_sidecar.errors import Overloaded, Unavailable

log = logging.getLogger("comfy_sidecar")

__all__ = ["Health"]


class Health:
    """Phase, readiness and admission of one sidecar over its ``instances`` and
    ``dispatcher``; it hears from ``signals`` when an instance is first ready."""

    def __init__(
        self,
        settings: Settings,
        instances: Sequence[ComfyInstance],
        dispatcher: Dispatcher,
        signals: InstanceSignals | None = None,
    ) -> None:
        self.settings = settings
        self.instances = list(instances)
        self.dispatcher = dispatcher
        self.version = __version__
        self._phase = Phase.STARTING
        self._detail = "starting"
        #: Set the first time an instance was ready (the warmup done): /health is 200 since.
        self.ever_ready = False
        #: Set on SIGTERM for DRAIN_DELAY_S: /ready says 503, new work is still taken.
        self.leaving = False
        if signals is not None:
            signals.on_ready(self._instance_ready)

    def _instance_ready(self, instance: ComfyInstance) -> None:
        self.ever_ready = True

    # --- phase ----------------------------------------------------------------------------

    def set_phase(self, phase: Phase, detail: str) -> None:
        """Move the sidecar itself to ``phase`` (before and after its instances run); logged."""
        self._phase, self._detail = phase, detail
        log.info("phase %s: %s", phase.value, detail)

    def report(self, detail: str) -> None:
        """New words for the current phase (provisioning progress); not logged."""
        self._detail = detail

    def ready_count(self) -> int:
        """Instances that accept jobs now."""
        return sum(1 for instance in self.instances if instance.accepting)

    def _ready_needed(self) -> int:
        return min(self.settings.ready_min_instances, len(self.instances))

    @property
    def phase(self) -> Phase:
        """The sidecar's phase: its own before and after the instances run, else theirs."""
        if self._phase is not Phase.LAUNCHING:
            return self._phase
        if self.ready_count() >= self._ready_needed():
            return Phase.READY
        if len(self.instances) == 1:
            only = self.instances[0].phase
            return Phase.LAUNCHING if only is Phase.READY else only
        for phase in (Phase.WARMING, Phase.LAUNCHING, Phase.RESTARTING, Phase.READY):
            if any(instance.phase is phase for instance in self.instances):
                return Phase.RESTARTING if phase is Phase.READY else phase
        return Phase.FAILED

    @property
    def detail(self) -> str:
        """Words for the phase (the one instance's detail, when there is one)."""
        if self._phase is not Phase.LAUNCHING:
            return self._detail
        if len(self.instances) == 1:
            return self.instances[0].detail
        return f"{self.ready_count()} of {len(self.instances)} ComfyUI instances ready"

    def queue_depth(self) -> int:
        """Jobs waiting in the sidecar's queue plus jobs held by instances."""
        return self.dispatcher.waiting + self.dispatcher.running

    # --- probes ---------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        """(healthy, detail) for ``/health``."""
        if self.ever_ready and self.phase is not Phase.FAILED:
            return True, self.detail
        return False, self.detail

    def readiness(self, queue_problem: str | None = None) -> tuple[bool, str]:
        """(ready, reason) for ``/ready``; ``queue_problem`` says why the job backend cannot
        be used now (sync ``/prompt`` still works then, so the sidecar stays ready)."""
        phase = self.phase
        if phase is not Phase.READY:
            if len(self.instances) == 1 and self.instances[0].phase is Phase.READY:
                return False, "the websocket to ComfyUI is disconnected"
            return False, f"{phase.value}: {self.detail}"
        if self.leaving:
            delay = self.settings.drain_delay_s
            return False, f"stopping: taking requests for DRAIN_DELAY_S={delay:g} s more"
        limit = self.settings.max_queue_depth
        if limit and self.queue_depth() >= limit:
            return False, f"queue depth {self.queue_depth()} >= MAX_QUEUE_DEPTH {limit}"
        if queue_problem is not None:  # sync /prompt still works
            return True, f"{self.detail}; /jobs unavailable: {queue_problem}"
        return True, self.detail

    def instance_status(self) -> list[dict[str, Any]]:
        """Each instance's ``{name, phase, detail, port, gpu, connected, jobs, pid}``."""
        return [instance.status() for instance in self.instances]

    # --- admission ------------------------------------------------------------------------

    def admit(self) -> None:
        """Take a new job, or raise: :class:`Unavailable` (503) while draining, before the
        first ready or when every instance failed; :class:`Overloaded` (429) when the queue is
        at MAX_QUEUE_DEPTH. A restart, recycle or websocket reconnect refuses nothing: the job
        waits in the sidecar's queue."""
        phase = self.phase
        if phase is Phase.STOPPING:
            raise Unavailable("the sidecar is shutting down")
        if not self.ever_ready or phase is Phase.FAILED:
            _, reason = self.readiness()
            raise Unavailable(f"ComfyUI is not ready ({reason})")
        limit = self.settings.max_queue_depth
        if limit and self.queue_depth() >= limit:
            raise Overloaded(
                f"the queue is full: {self.queue_depth()} job(s) >= MAX_QUEUE_DEPTH {limit}"
            )
