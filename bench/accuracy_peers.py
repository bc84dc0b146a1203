"""Accuracy workload for a DP peer (OpenDP's Polars API), the same questions and the same
metrics as `accuracy_bench` (anonymizer/examples/accuracy_bench.rs) on the peer kit's visits
table: one JSON line per query with the median absolute and relative error over every cell of
RUNS runs against the exact answer (Polars, no privacy).

usage: accuracy_peers.py VISITS.parquet [RUNS] [cohorts]     (cohorts: only the 100 cohort counts)
       accuracy_peers.py --rho     (prints the total rho of (1, 1e-6), for the other peers)

Each query gets OpenDP's best bounds that hold for the table. The privacy unit is one
`patient_id` (`unit_of(contributions=1, identifier=...)`: with an identifier, `contributions`
counts identifiers per person, not rows); rows are bounded by truncation, as the kit's
run_opendp.py does: one row per patient and diagnosis (`truncate_per_group(1, by=diagnosis)`)
and at most 10 diagnoses per patient (`truncate_num_groups(10)`, the table's maximum) for
patients by diagnosis; one row per patient (`truncate_per_group(1)`) for a cohort and for sex
and age band (a patient has one of each); at most 10 rows per patient for the mean. Two quirks
of OpenDP 0.16 with Polars 1.36: `truncate_num_groups`'s default `keep="sample"` fails on
release (a Polars struct with two fields of the same name), so `keep="first"` is used; and it
keeps k - 1 groups (a 1-based rank compared with `< k`), so the 3 patients with 10 diagnoses
lose one of them (noise scale 10 is still charged for 10). Public key lists via `with_keys`.
The 100 cohort counts share one budget: rho converted to (1, 1e-6) by OpenDP (the whole delta:
OpenDP needs none for partition selection here), split evenly, Gaussian noise.

Each query is resolved (its noise scale calibrated) once and released in every run through a
fresh context holding that run's budget: OpenDP's calibration searches the scale and takes a
few seconds per query, which made the 100 cohort counts (2,000 resolves at 20 runs) run for
hours. The released measurement is the same either way. The 95% half-width is OpenDP's
`summarize(alpha=0.05)`; for the mean OpenDP reports the noisy sum's and count's, not the
mean's, so it is left empty.
"""
import sys
import warnings

import opendp.prelude as dp
import polars as pl
from opendp.accuracy import summarize_polars_measurement

import accuracy_common as common
from accuracy_common import DIAGNOSES, errors

warnings.filterwarnings("ignore")
dp.enable_features("contrib")

BIG = 20_000_000
UNIT = dp.unit_of(contributions=1, identifier="patient_id")


def band(col):
    return (
        pl.when(col >= 1981).then(pl.lit("18-44"))
        .when(col >= 1961).then(pl.lit("45-64"))
        .otherwise(pl.lit("65+"))
    )


def context(lf, by, **loss):
    return dp.Context.compositor(
        data=lf,
        privacy_unit=UNIT,
        privacy_loss=dp.loss_of(**loss),
        split_evenly_over=1,
        margins=[dp.polars.Margin(by=by, max_length=BIG)],
    )


def cells(df, keys, value):
    return {"|".join(str(r[k]) for k in keys): float(r[value]) for r in df.iter_rows(named=True)
            if r[value] is not None}


def emit(*args):
    common.emit('opendp-polars', *args)


def total_rho(epsilon=1.0, delta=1e-6):
    """The largest rho whose zCDP -> (epsilon, delta) conversion by OpenDP stays within budget."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if dp.c.make_zCDP_to_approxDP(dp.m.make_gaussian(
                dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float), 1.0 / (2 * mid) ** 0.5)
        ).map(1.0).epsilon(delta) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def main():
    if sys.argv[1:2] == ["--rho"]:  # the total rho of (1, 1e-6), for the other peers' runners
        print(repr(total_rho()))
        return
    path = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    only_cohorts = len(sys.argv) > 3 and sys.argv[3] == "cohorts"
    df = pl.read_parquet(path).with_columns(band(pl.col("birth_year")).alias("band"))
    lf = df.lazy()

    def grouped(name, keys, key_frame, pre, agg, epsilon, truth, bounds, ci=True):
        if only_cohorts:
            return
        q = pre(context(lf, keys, epsilon=epsilon).query())
        q = q.group_by(*keys).agg(agg.alias("n")) if keys else q.select(agg.alias("n"))
        if key_frame is not None:
            q = q.with_keys(key_frame)
        m = q.resolve()
        summary = summarize_polars_measurement(m, alpha=0.05)
        width = float(summary["accuracy"][0]) if ci else None
        abs_e, rel_e = [], []
        for _ in range(runs):
            got = cells(context(lf, keys, epsilon=epsilon)(m).collect(), keys, "n")
            errors(truth, got, abs_e, rel_e)
        emit(name, {"epsilon": epsilon, "noise": "laplace", "bounds": bounds,
                    "scale": [float(s) for s in summary["scale"]]},
             abs_e, rel_e, [width] if width is not None else [], runs, len(truth))

    def truth_of(keys, frame):
        return cells(frame, keys, "n")

    by_dx = df.group_by("diagnosis").agg(pl.col("patient_id").n_unique().alias("n"))
    grouped("patients by diagnosis", ["diagnosis"], pl.DataFrame({"diagnosis": DIAGNOSES}),
            lambda q: q.truncate_per_group(1, by=["diagnosis"])
            .truncate_num_groups(10, by=["diagnosis"], keep="first"),
            dp.len(signed=True), 1.0, truth_of(["diagnosis"], by_dx),
            "1 row per patient and diagnosis, 10 diagnoses per patient")
    e11 = df.filter(pl.col("diagnosis") == "E11")
    t = {"": float(e11["patient_id"].n_unique())}
    for eps, label in [(1.0, "cohort count (E11)"), (0.1, "cohort count (E11), epsilon 0.1")]:
        grouped(label, [], None,
                lambda q: q.filter(pl.col("diagnosis") == "E11").truncate_per_group(1),
                dp.len(signed=True), eps, t, "1 row per patient")
    by_band = df.group_by("sex", "band").agg(pl.col("patient_id").n_unique().alias("n"))
    grouped("patients by sex and age band", ["sex", "band"],
            pl.DataFrame({"sex": ["F", "M"] * 3, "band": ["18-44"] * 2 + ["45-64"] * 2 + ["65+"] * 2}),
            lambda q: q.truncate_per_group(1), dp.len(signed=True), 1.0,
            truth_of(["sex", "band"], by_band), "1 row per patient (one sex and band each)")
    by_sex = df.group_by("sex").agg(pl.col("hba1c").mean().alias("n"))
    hba1c = pl.col("hba1c").fill_null(0.0).fill_nan(0.0).clip(4.0, 14.0)
    grouped("mean HbA1c by sex", ["sex"], pl.DataFrame({"sex": ["F", "M"]}),
            lambda q: q.truncate_per_group(10), hba1c.dp.mean((4.0, 14.0)), 1.0,
            truth_of(["sex"], by_sex), "10 rows per patient, hba1c 4..14", ci=False)

    # 100 cohort counts under one grant of (1, 1e-6): zCDP, rho split evenly.
    rho = total_rho()
    cohorts = [(d, s) for d in DIAGNOSES for s in ["F", "M"]]
    truths = {(d, s): float(df.filter((pl.col("diagnosis") == d) & (pl.col("sex") == s))["patient_id"].n_unique())
              for d, s in cohorts}

    def cohort_context():
        return dp.Context.compositor(
            data=lf, privacy_unit=UNIT, privacy_loss=dp.loss_of(rho=rho),
            split_evenly_over=len(cohorts), margins=[dp.polars.Margin(by=[], max_length=BIG)])

    ctx = cohort_context()
    measurements, widths, scales = {}, [], set()
    for d, s in cohorts:
        m = (ctx.query().filter((pl.col("diagnosis") == d) & (pl.col("sex") == s))
             .truncate_per_group(1).select(dp.len(signed=True).alias("n"))).resolve()
        summary = summarize_polars_measurement(m, alpha=0.05)
        measurements[(d, s)] = m
        widths.append(float(summary["accuracy"][0]))
        scales.add(float(summary["scale"][0]))
    abs_e, rel_e = [], []
    for _ in range(runs):
        ctx = cohort_context()
        for d, s in cohorts:
            got = float(ctx(measurements[(d, s)]).collect()["n"][0])
            errors({"": truths[(d, s)]}, {"": got}, abs_e, rel_e)
    emit("100 cohort counts under (1, 1e-6)",
         {"epsilon": 1.0, "delta": 1e-6, "noise": "gaussian", "bounds": "1 row per patient",
          "per_query": {"rho": rho / len(cohorts)}, "scale": sorted(scales)},
         abs_e, rel_e, widths, runs, len(cohorts))


if __name__ == "__main__":
    main()
