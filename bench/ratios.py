"""Ratios from one run of the peer kit with Consentry in it (stdlib only).

usage: ratios.py RAW_DIR KIT_DIR     (bench/peers.sh calls it)

For each size: Consentry's DP query time (Q1-Q4 summed, from inside the runner) over plain
DataFusion's on the same in-memory table (`consentry-plain`, same run), per query and in total;
the fastest DP peer's total over Consentry's; and Consentry's peak RSS over the table's Arrow
size (and, since at 1M the binary's code pages weigh as much as the data, the same less the
runner's file-backed resident memory at its end). Goals: DP overhead at most 1.5x plain DataFusion, peak memory at most 2x the Arrow size.
"""
import os
import sys

QS = ["Q1", "Q2", "Q3", "Q4"]
DP_PEERS = ["opendp-polars", "opendp-polars-mem", "smartnoise-sql", "tumult-analytics",
            "pipelinedp-local"]
PLAIN = ["duckdb", "polars", "datafusion"]


def code_pages(dp, arrow_mib):
    """The runner's file-backed resident MiB at its end, and the peak less it over Arrow."""
    code = dp["phases"].get("notes", {}).get("rss_file_bytes")
    if not (code and arrow_mib):
        return " | |"
    code_mib = code / 2**20
    return f" {code_mib:.0f} | {(dp['peak'] - code_mib) / arrow_mib:.2f}x |"


def main(raw, kit):
    sys.path.insert(0, kit)
    from report import load_run  # the kit's own parser of a run

    def run(name, size):
        stem = os.path.join(raw, f"{name}__{size}")
        if not os.path.exists(stem + ".jsonl"):
            return None
        r = load_run(stem)
        if not all(q in r["phases"] for q in QS):
            return None
        r["total"] = sum(r["phases"][q]["s"] for q in QS)
        r["peak"] = max(r["maxrss"] or 0, r["tree"])
        return r

    print("\n## Consentry: ratios (same run)\n")
    print("| rows | DP total s | plain DataFusion s | DP / plain | per query DP / plain "
          "| fastest DP peer | peer / DP | peak RSS MiB | Arrow MiB | RSS / Arrow "
          "| code pages MiB | (RSS - code) / Arrow |")
    print("|" + "---|" * 12)
    for size in ["1m", "10m"]:
        dp, plain = run("consentry", size), run("consentry-plain", size)
        if not dp:
            continue
        per_q = ""
        ratio = ""
        if plain:
            ratio = f"{dp['total'] / plain['total']:.2f}x"
            per_q = ", ".join(
                f"{q} {dp['phases'][q]['s'] / max(plain['phases'][q]['s'], 1e-9):.2f}"
                for q in QS)
        peers = [(n, run(n, size)) for n in DP_PEERS]
        peers = [(n, r) for n, r in peers if r]
        best = min(peers, key=lambda p: p[1]["total"]) if peers else None
        arrow = dp["phases"].get("notes", {}).get("arrow_bytes")
        arrow_mib = arrow / 2**20 if arrow else None
        print(f"| {size} | {dp['total']:.3f} | {plain['total']:.3f} | {ratio} | {per_q} | "
              + (f"{best[0]} {best[1]['total']:.2f} s | {best[1]['total'] / dp['total']:.0f}x | "
                 if best else "not run | | ")
              + f"{dp['peak']:.0f} | "
              + (f"{arrow_mib:.0f} | {dp['peak'] / arrow_mib:.2f}x |" if arrow_mib else " | |")
              + code_pages(dp, arrow_mib))
    others = []
    for size in ["1m", "10m"]:
        dp = run("consentry", size)
        for n in PLAIN:
            r = run(n, size)
            if dp and r:
                others.append(f"{size}: {n} {r['total']:.3f} s (DP / {n} {dp['total'] / r['total']:.2f}x)")
    if others:
        print("\nPlain baselines of the kit: " + "; ".join(others))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
