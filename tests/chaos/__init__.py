"""The chaos suite (issue 13): failures injected into a running sidecar, each scenario run N
times, with every job's fate counted (tests/chaos/scenarios.py; bench/chaos.py prints them)."""
