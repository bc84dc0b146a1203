#!/usr/bin/env bash
# The accuracy workload: Consentry and the DP peers (OpenDP's Polars API, PipelineDP, Tumult
# Analytics) on the peer kit's visits table, and Consentry on the demo's EHR tables; median
# absolute and relative errors over RUNS runs per query, as JSON lines and a Markdown table in
# bench/results/accuracy-DATE.md.
#
#   bench/accuracy.sh
#   bench/accuracy.sh --table FILE.jsonl     only print FILE's Markdown table (no build, no runs)
#
# env: VISITS  the kit's table (default /tmp/peers-data/visits_1m.parquet; bench/peers.sh or the
#              kit's gen_data.py makes it)
#      VENV    a virtualenv with the kit's requirements.txt (default /tmp/peers-venv; the kit's
#              setup_venvs.sh makes it) for OpenDP (accuracy_peers.py); without it OpenDP is
#              skipped
#      VENV_PIPELINEDP  PipelineDP's virtualenv (default VENV) for accuracy_pipelinedp.py; with
#              the dp-accounting package installed there, the 100 cohort counts use PipelineDP's
#              PLD accountant, otherwise its naive one; without it PipelineDP is skipped
#      VENV_TUMULT      Tumult's virtualenv (default /tmp/peers-venv-tumult: the kit's
#              requirements-tumult.txt; needs Java 17) for accuracy_tumult.py; without it Tumult
#              is skipped
#      TUMULT_RUNS      Tumult's runs per query (default RUNS)
#      TUMULT_COHORT_RUNS  Tumult's runs of the 100 cohort counts (default 2: on local Spark
#              the 100 queries take minutes per run; 8 minutes for two runs on two cores)
#      RUNS    runs per query (default 20)
#      OUT     where the results go (default bench/results)
set -euo pipefail

table() {  # the Markdown table of a file of JSON lines
  python3 - "$1" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| dataset | query | contender | noise | runs | median abs error | median rel error | median 95% half-width |")
print("|---|---|---|---|---:|---:|---:|---:|")
for r in rows:
    if "refused" in r:
        print(f"| {r['dataset']} | {r['query']} | {r['contender']} | refused: {r['refused'][:80]} | | | | |")
        continue
    ci = r.get("median_ci95")
    print(f"| {r['dataset']} | {r['query']} | {r['contender']} | {r.get('noise', '')} | {r.get('runs', '')} | "
          f"{r['median_abs_error']:.3g} | {r['median_rel_error']:.3g} | "
          f"{'' if ci is None else format(ci, '.3g')} |")
EOF
}

if [ "${1:-}" = --table ]; then table "$2"; exit; fi
root=$(cd "$(dirname "$0")/.." && pwd)
visits=${VISITS:-/tmp/peers-data/visits_1m.parquet}
venv=${VENV:-/tmp/peers-venv}
venv_pipelinedp=${VENV_PIPELINEDP:-$venv}
venv_tumult=${VENV_TUMULT:-/tmp/peers-venv-tumult}
runs=${RUNS:-20}
tumult_runs=${TUMULT_RUNS:-$runs}
tumult_cohort_runs=${TUMULT_COHORT_RUNS:-2}
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

peer() {  # peer NAME VENV SCRIPT ARGS...: a peer's JSON lines, when its virtualenv exists
  local name=$1 py=$2/bin/python script=$3
  shift 3
  if [ ! -x "$py" ]; then echo "no virtualenv at ${py%/bin/python}: $name skipped" >&2; return 0; fi
  echo "== $name" >&2
  "$py" "$root/bench/$script" "$visits" "$@" 2> "$work/$name.err" | tee -a "$raw" ||
    { echo "$name failed:" >&2; tail -5 "$work/$name.err" >&2; }
}
peer opendp-polars "$venv" accuracy_peers.py "$runs"
peer pipelinedp "$venv_pipelinedp" accuracy_pipelinedp.py "$runs"
# Tumult's 100 cohort counts get the total rho OpenDP converts (1, 1e-6) to, as OpenDP's own
# do; without OpenDP's virtualenv, tmlt.core's own (looser) conversion
rho=$("$venv/bin/python" "$root/bench/accuracy_peers.py" --rho 2> /dev/null || true)
TUMULT_RHO=$rho peer tumult "$venv_tumult" accuracy_tumult.py "$tumult_runs" "$tumult_cohort_runs"
table "$raw" | tee "$out/accuracy-$(date +%F).md"
