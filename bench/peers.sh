#!/usr/bin/env bash
# Runs Consentry beside the DP peers and the plain baselines of the peer kit, in one run, and
# prints the kit's table and the ratios that matter here.
#
#   bench/peers.sh [CONTENDER ...]      (default: every contender of the kit, plus ours)
#
# env: PEERS  the peer kit's directory (required: the kit is not part of this repository)
#      OUT    where raw/ and results-DATE.md go (default bench/results)
#      SIZES  "1m 10m" (default), as the kit
# Our two contenders are `consentry` (DP) and `consentry-plain` (the same SQL on DataFusion
# without privacy, same process shape). The kit is copied, never changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/bench/results}
if [ -z "${PEERS:-}" ]; then
  echo "set PEERS to the peer kit's directory (the one holding run_all.sh and contenders.txt)" >&2
  exit 2
fi
peers=$PEERS
[ -f "$peers/run_all.sh" ] || { echo "no peer kit at $peers: no run_all.sh there" >&2; exit 2; }
command -v /usr/bin/time > /dev/null || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 2; }

echo "== building the runner (profile peer: release with link-time optimization)"
(cd "$root" && cargo build --profile peer --locked --workspace --example peer_bench)

kit=$(mktemp -d)
trap 'rm -rf "$kit"' EXIT
cp -r "$peers"/. "$kit"/
{ echo "consentry|$root/bench/run_consentry"
  echo "consentry-plain|$root/bench/run_consentry --plain"; } >> "$kit/contenders.txt"
mkdir -p "$out"
args=("$@")
if [ ${#args[@]} -gt 0 ]; then args+=(consentry consentry-plain); fi
OUT="$out" bash "$kit/run_all.sh" "${args[@]}"
python3 "$root/bench/ratios.py" "$out/raw/$(date +%F)" "$kit" | tee -a "$out/results-$(date +%F).md"
