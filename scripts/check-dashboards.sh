#!/usr/bin/env bash
# Checks what operators import: the Prometheus alerting rules with `promtool check rules`, and
# every Grafana dashboard under packaging/grafana: valid JSON whose data source is the import
# input ${DS_PROMETHEUS}, and every query (panel targets, and the series selectors of its
# label_values() variables) parsed by Prometheus itself. The queries are written into a
# generated rule file, one recording rule each, with Grafana's variables replaced by values
# PromQL accepts ($__rate_interval -> 5m, $rule -> a label value), and `promtool check rules`
# parses that. tests/alerts.rs checks that every metric name they use is one the bridge serves.
#   scripts/check-dashboards.sh            (run by scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
promtool check rules packaging/prometheus/alerts.yml
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for dashboard in packaging/grafana/*.json; do
    rules="$out/$(basename "$dashboard" .json).rules.yml"
    python3 scripts/dashboard-queries.py "$dashboard" >"$rules"
    echo "$dashboard: $(grep -c '^      - record:' "$rules") queries"
    promtool check rules "$rules"
done
