"""Thin HTTP handlers; the work happens in the pipeline and the sidecar they call."""
