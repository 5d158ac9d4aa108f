"""Jobs that outlive a request: the job store, progress, and the native and adapter APIs."""

from comfy_sidecar.jobs.progress import Progress, nodes_to_run
from comfy_sidecar.jobs.store import (
    DifferentBody,
    JobEvent,
    JobRecord,
    JobStatus,
    JobStore,
    OutputInfo,
    UnknownJob,
)

__all__ = [
    "DifferentBody",
    "JobEvent",
    "JobRecord",
    "JobStatus",
    "JobStore",
    "OutputInfo",
    "Progress",
    "UnknownJob",
    "nodes_to_run",
]
