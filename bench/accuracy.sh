#!/usr/bin/env bash
# The accuracy workload: Consentry and OpenDP's Polars API on the peer kit's visits table, and
# Consentry on the demo's EHR tables; median absolute and relative errors over RUNS runs per
# query, as JSON lines and a Markdown table in bench/results/accuracy-DATE.md.
#
#   bench/accuracy.sh
#
# env: VISITS  the kit's table (default /tmp/peers-data/visits_1m.parquet; bench/peers.sh or the
#              kit's gen_data.py makes it)
#      VENV    a virtualenv with the kit's requirements.txt (default /tmp/peers-venv; the kit's
#              setup_venvs.sh makes it); without it only Consentry runs
#      RUNS    runs per query (default 20)
#      OUT     where the results go (default bench/results)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
visits=${VISITS:-/tmp/peers-data/visits_1m.parquet}
venv=${VENV:-/tmp/peers-venv}
runs=${RUNS:-20}
out=${OUT:-$root/bench/results}
[ -f "$visits" ] || { echo "no visits table at $visits (set VISITS; bench/peers.sh makes it)" >&2; exit 2; }
target=$(cd "$root" && cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

echo "== building (the workspace's dev profile, as the tests)" >&2
(cd "$root" && cargo build --locked --workspace --bins --example accuracy_bench)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== the demo's EHR data" >&2
"$target/debug/broker" demo --data-dir "$work/demo" --no-serve > /dev/null

mkdir -p "$out"
raw="$out/accuracy-$(date +%F).jsonl"
: > "$raw"
echo "== consentry" >&2
"$target/debug/examples/accuracy_bench" --visits "$visits" --ehr "$work/demo/datasets/ehr/1" \
  --runs "$runs" | tee -a "$raw"
if [ -x "$venv/bin/python" ]; then
  echo "== opendp-polars" >&2
  "$venv/bin/python" "$root/bench/accuracy_peers.py" "$visits" "$runs" 2> "$work/peers.err" |
    tee -a "$raw" || { echo "the peer failed:" >&2; tail -5 "$work/peers.err" >&2; }
else
  echo "no virtualenv at $venv: peers skipped" >&2
fi
python3 - "$raw" <<'EOF' | tee "$out/accuracy-$(date +%F).md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| dataset | query | contender | noise | median abs error | median rel error | median 95% half-width |")
print("|---|---|---|---|---:|---:|---:|")
for r in rows:
    if "refused" in r:
        print(f"| {r['dataset']} | {r['query']} | {r['contender']} | refused: {r['refused'][:80]} | | | |")
        continue
    ci = r.get("median_ci95")
    print(f"| {r['dataset']} | {r['query']} | {r['contender']} | {r.get('noise', '')} | "
          f"{r['median_abs_error']:.3g} | {r['median_rel_error']:.3g} | "
          f"{'' if ci is None else format(ci, '.3g')} |")
EOF
