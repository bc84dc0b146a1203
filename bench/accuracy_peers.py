"""Accuracy workload for a DP peer (OpenDP's Polars API), the same questions and the same
metrics as `accuracy_bench` (anonymizer/examples/accuracy_bench.rs) on the peer kit's visits
table: one JSON line per query with the median absolute and relative error over every cell of
RUNS runs against the exact answer (Polars, no privacy).

usage: accuracy_peers.py VISITS.parquet [RUNS] [cohorts]     (cohorts: only the 100 cohort counts)

Each query gets OpenDP's best bounds that hold for the table: patient_id as the privacy unit,
at most 10 rows per patient (the kit's bound), one row per patient and group kept
(`truncate_per_group(1)`) for distinct-patient counts, the public key lists via `with_keys`.
The 100 cohort counts share one budget: rho converted to (1, 1e-6) by OpenDP (the whole delta:
OpenDP needs none for partition selection here), split evenly, Gaussian noise.
"""
import json
import statistics
import sys
import warnings

import opendp.prelude as dp
import polars as pl

warnings.filterwarnings("ignore")
dp.enable_features("contrib")

DIAGNOSES = (
    "E11 I10 E78 J44 I25 N18 E66 F32 J45 K21 M54 I48 E03 G47 F41 M17 I50 N39 K57 M81 "
    "G43 L40 D50 R73 E55 J18 I63 C50 C61 C34 F17 K70 B18 M06 G20 G30 F20 H40 H25 N40 "
    "I70 I21 E10 J30 K29 L20 M10 R10 R07 Z00"
).split()
BIG = 20_000_000


def band(col):
    return (
        pl.when(col >= 1981).then(pl.lit("18-44"))
        .when(col >= 1961).then(pl.lit("45-64"))
        .otherwise(pl.lit("65+"))
    )


def context(lf, by, **loss):
    return dp.Context.compositor(
        data=lf,
        privacy_unit=dp.unit_of(contributions=10, identifier="patient_id"),
        privacy_loss=dp.loss_of(**loss),
        split_evenly_over=1,
        margins=[dp.polars.Margin(by=by, max_length=BIG)],
    )


def errors(truth, got, abs_e, rel_e):
    for k, t in truth.items():
        e = abs(got.get(k, 0.0) - t)
        abs_e.append(e)
        rel_e.append(e / max(abs(t), 1.0))


def cells(df, keys, value):
    return {"|".join(str(r[k]) for k in keys): float(r[value]) for r in df.iter_rows(named=True)
            if r[value] is not None}


def emit(name, extra, abs_e, rel_e, widths, runs, n):
    print(json.dumps({
        "dataset": "visits", "query": name, "contender": "opendp-polars", **extra,
        "cells": n, "runs": runs,
        "median_abs_error": statistics.median(abs_e), "median_rel_error": statistics.median(rel_e),
        "median_ci95": statistics.median(widths) if widths else None,
    }), flush=True)


def main():
    path = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    df = pl.read_parquet(path).with_columns(band(pl.col("birth_year")).alias("band"))
    lf = df.lazy()

    def grouped(name, keys, key_frame, pre, agg, epsilon, truth):
        if only_cohorts:
            return
        abs_e, rel_e, widths = [], [], []
        for _ in range(runs):
            q = context(lf, keys, epsilon=epsilon).query()
            q = pre(q)
            q = q.group_by(*keys).agg(agg.alias("n")) if keys else q.select(agg.alias("n"))
            if key_frame is not None:
                q = q.with_keys(key_frame)
            widths.append(float(q.summarize(alpha=0.05)["accuracy"][0]))
            got = cells(q.release().collect(), keys, "n")
            errors(truth, got, abs_e, rel_e)
        emit(name, {"epsilon": epsilon, "noise": "laplace"}, abs_e, rel_e, widths, runs, len(truth))

    def truth_of(keys, frame):
        return cells(frame, keys, "n")

    only_cohorts = len(sys.argv) > 3 and sys.argv[3] == "cohorts"
    by_dx = df.group_by("diagnosis").agg(pl.col("patient_id").n_unique().alias("n"))
    grouped("patients by diagnosis", ["diagnosis"], pl.DataFrame({"diagnosis": DIAGNOSES}),
            lambda q: q.truncate_per_group(1, by=["diagnosis"]), dp.len(signed=True), 1.0,
            truth_of(["diagnosis"], by_dx))
    e11 = df.filter(pl.col("diagnosis") == "E11")
    t = {"": float(e11["patient_id"].n_unique())}
    for eps, label in [(1.0, "cohort count (E11)"), (0.1, "cohort count (E11), epsilon 0.1")]:
        grouped(label, [], None,
                lambda q: q.filter(pl.col("diagnosis") == "E11").truncate_per_group(1),
                dp.len(signed=True), eps, t)
    by_band = df.group_by("sex", "band").agg(pl.col("patient_id").n_unique().alias("n"))
    grouped("patients by sex and age band", ["sex", "band"],
            pl.DataFrame({"sex": ["F", "M"] * 3, "band": ["18-44"] * 2 + ["45-64"] * 2 + ["65+"] * 2}),
            lambda q: q.truncate_per_group(1, by=["sex", "band"]), dp.len(signed=True), 1.0,
            truth_of(["sex", "band"], by_band))
    by_sex = df.group_by("sex").agg(pl.col("hba1c").mean().alias("n"))
    hba1c = pl.col("hba1c").fill_null(0.0).fill_nan(0.0).clip(4.0, 14.0)
    grouped("mean HbA1c by sex", ["sex"], pl.DataFrame({"sex": ["F", "M"]}),
            lambda q: q.truncate_per_group(10), hba1c.dp.mean((4.0, 14.0)), 1.0,
            truth_of(["sex"], by_sex))

    # 100 cohort counts under one grant of (1, 1e-6): zCDP, rho split evenly.
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if dp.c.make_zCDP_to_approxDP(dp.m.make_gaussian(
                dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), 1.0 / (2 * mid) ** 0.5)
        ).map(1.0).epsilon(1e-6) <= 1.0:
            lo = mid
        else:
            hi = mid
    rho = lo
    cohorts = [(d, s) for d in DIAGNOSES for s in ["F", "M"]]
    truths = {(d, s): float(df.filter((pl.col("diagnosis") == d) & (pl.col("sex") == s))["patient_id"].n_unique())
              for d, s in cohorts}
    abs_e, rel_e, widths = [], [], []
    for _ in range(runs):
        ctx = dp.Context.compositor(
            data=lf, privacy_unit=dp.unit_of(contributions=10, identifier="patient_id"),
            privacy_loss=dp.loss_of(rho=rho), split_evenly_over=len(cohorts),
            margins=[dp.polars.Margin(by=[], max_length=BIG)])
        for d, s in cohorts:
            q = (ctx.query().filter((pl.col("diagnosis") == d) & (pl.col("sex") == s))
                 .truncate_per_group(1).select(dp.len(signed=True).alias("n")))
            widths.append(float(q.summarize(alpha=0.05)["accuracy"][0]))
            got = float(q.release().collect()["n"][0])
            errors({"": truths[(d, s)]}, {"": got}, abs_e, rel_e)
    emit("100 cohort counts under (1, 1e-6)",
         {"epsilon": 1.0, "delta": 1e-6, "noise": "gaussian", "per_query": {"rho": rho / len(cohorts)}},
         abs_e, rel_e, widths, runs, len(cohorts))


if __name__ == "__main__":
    main()
