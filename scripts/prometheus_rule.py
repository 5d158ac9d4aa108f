#!/usr/bin/env python3
"""Write docker/k8s/prometheusrule.yaml (a Prometheus Operator ``PrometheusRule``) from
docker/prometheus/alerts.yml, so both hold the same rule groups.

    scripts/prometheus_rule.py            # rewrite docker/k8s/prometheusrule.yaml
    scripts/prometheus_rule.py --check    # exit 1 when it differs (nothing written)

The groups are copied as text (comments included), indented under ``spec:``; everything in
alerts.yml before ``groups:`` is its own header and is left out.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
RULE = ROOT / "docker" / "k8s" / "prometheusrule.yaml"

HEADER = """\
# Prometheus Operator: comfy-sidecar's recording and alerting rules. GENERATED from
# docker/prometheus/alerts.yml by scripts/prometheus_rule.py: edit that file, then run the
# script. What to do when an alert fires: README, "Operating it".
# Not in kustomization.yaml (it needs the operator's CRDs):
#   kubectl apply -f docker/k8s/prometheusrule.yaml
# Your Prometheus selects rules by label (spec.ruleSelector): adjust `release`.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: comfy-sidecar
  labels:
    app.kubernetes.io/name: comfy-sidecar
    release: prometheus
spec:
"""


def prometheus_rule(alerts: str) -> str:
    """The PrometheusRule manifest holding the ``groups:`` of ``alerts`` (alerts.yml's text).

    ``ValueError`` when ``alerts`` has no top-level ``groups:`` line.
    """
    lines = alerts.splitlines(keepends=True)
    try:
        start = lines.index("groups:\n")
    except ValueError:
        raise ValueError("no top-level 'groups:' line") from None
    body = "".join(f"  {line}" if line.strip() else line for line in lines[start:])
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report drift (exit 1)")
    args = parser.parse_args(argv)
    fresh = prometheus_rule(ALERTS.read_text(encoding="utf-8"))
    if RULE.exists() and RULE.read_text(encoding="utf-8") == fresh:
        return 0
    if args.check:
        print(f"{RULE}: out of date; run {sys.argv[0]}", file=sys.stderr)
        return 1
    RULE.write_text(fresh, encoding="utf-8")
    print(f"{RULE}: written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
