"""Accuracy workload for PipelineDP (LocalBackend), the same questions, JSON lines and metrics as
accuracy_peers.py (OpenDP) and accuracy_bench (Consentry) on the peer kit's visits table: per
query the median absolute and relative error over every cell of RUNS runs against the exact
answer, and the median 95% half-width of the noise PipelineDP reports.

usage: accuracy_pipelinedp.py VISITS.parquet [RUNS] [cohorts]   (cohorts: only the 100 cohort counts)
env:   PIPELINEDP_ACCOUNTANT  pld (the default when dp_accounting imports) or naive

Bounds (PipelineDP's contribution bounds, chosen from the table, where they hold for every
patient): distinct patients are `Metrics.PRIVACY_ID_COUNT` with `max_contributions_per_partition`
1; `max_partitions_contributed` is 10 for patients by diagnosis (no patient has more than 10
distinct diagnoses), 1 for a cohort (the cohort's rows, a public filter, as one public
partition) and 1 for sex and age band and for the mean by sex (a patient has one sex and one
birth year); the mean is `Metrics.MEAN` with `min_value` 4, `max_value` 14 and
`max_contributions_per_partition` 10 (the kit's bound of 10 visits per patient). Partitions are
the public key lists everywhere. Single queries: Laplace at pure epsilon (a NaiveBudgetAccountant
of (epsilon, 0) per query). The 100 cohort counts: Gaussian, 100 aggregations under one budget
accountant of (1, 1e-6): PLDBudgetAccountant (privacy loss distributions, needs the
dp-accounting package) when it imports, else NaiveBudgetAccountant (an even split into
(0.01, 1e-8) per count). Half-widths come from the noise standard deviation PipelineDP reports
(`output_noise_stddev`): Laplace b ln 20 with b = sd / sqrt 2, Gaussian 1.96 sd; MEAN reports none.
"""
import math
import os
import sys
import time
from importlib.metadata import version

import pipeline_dp as pdp
import pyarrow.parquet as pq

import accuracy_common as common
from accuracy_common import BANDS, DIAGNOSES, SEXES, errors

try:
    import dp_accounting  # noqa: F401  (PLDBudgetAccountant needs it imported)
    HAVE_PLD = True
except ImportError:
    HAVE_PLD = False

PID, DX, SEX, BAND, HBA1C = range(5)
Z975 = 1.959963984540054


def band(year):
    return "18-44" if year >= 1981 else "45-64" if year >= 1961 else "65+"


def emit(*args):
    common.emit('pipelinedp', *args)


def half_width(noise, sd):
    return sd / math.sqrt(2) * math.log(20) if noise == pdp.NoiseKind.LAPLACE else Z975 * sd


def aggregate(engine, rows, metric, noise, part, keys, max_partitions, max_per_partition,
              value=None, bounds=(None, None)):
    """One PipelineDP aggregation (lazy until the accountant has computed its budgets)."""
    params = pdp.AggregateParams(
        metrics=[metric], noise_kind=noise, max_partitions_contributed=max_partitions,
        max_contributions_per_partition=max_per_partition, min_value=bounds[0], max_value=bounds[1],
        output_noise_stddev=metric != pdp.Metrics.MEAN)
    ext = pdp.DataExtractors(privacy_id_extractor=lambda r: r[PID], partition_extractor=part,
                             value_extractor=value or (lambda r: 0))
    return engine.aggregate(rows, params, ext, public_partitions=keys)


def main():
    path = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    only_cohorts = len(sys.argv) > 3 and sys.argv[3] == "cohorts"
    accountant = os.environ.get("PIPELINEDP_ACCOUNTANT", "pld" if HAVE_PLD else "naive")
    if accountant == "pld" and not HAVE_PLD:
        sys.exit("PIPELINEDP_ACCOUNTANT=pld needs the dp-accounting package")
    cols = ["patient_id", "diagnosis", "sex", "birth_year", "hba1c"]
    tbl = pq.read_table(path, columns=cols)
    rows = [(p, d, s, band(y), h) for p, d, s, y, h in zip(*(tbl[c].to_pylist() for c in cols))]
    del tbl

    def distinct(key_of, subset=None):
        seen = {}
        for r in subset if subset is not None else rows:
            seen.setdefault(key_of(r), set()).add(r[PID])
        return {k: float(len(v)) for k, v in seen.items()}

    def single(name, metric, part, keys, truth, epsilon, max_partitions, max_per_partition,
               bounds_note, subset=None, value=None, bounds=(None, None)):
        if only_cohorts:
            return
        t0 = time.perf_counter()
        abs_e, rel_e, widths = [], [], []
        field = metric.name.lower()
        for _ in range(runs):
            acc = pdp.NaiveBudgetAccountant(total_epsilon=epsilon, total_delta=0)
            res = aggregate(pdp.DPEngine(acc, pdp.LocalBackend()),
                            subset if subset is not None else rows, metric, pdp.NoiseKind.LAPLACE,
                            part, keys, max_partitions, max_per_partition, value, bounds)
            acc.compute_budgets()
            got = {}
            for k, m in res:
                got[k] = float(getattr(m, field))
                sd = getattr(m, f"{field}_noise_stddev", None)
                if sd is not None:
                    widths.append(half_width(pdp.NoiseKind.LAPLACE, sd))
            errors(truth, got, abs_e, rel_e)
        emit(name, {"epsilon": epsilon, "noise": "laplace", "bounds": bounds_note,
                    "accountant": "naive"},
             abs_e, rel_e, widths, runs, len(truth), time.perf_counter() - t0)

    single("patients by diagnosis", pdp.Metrics.PRIVACY_ID_COUNT, lambda r: r[DX], DIAGNOSES,
           distinct(lambda r: r[DX]), 1.0, 10, 1,
           "max_partitions_contributed 10 (the most diagnoses of any patient), "
           "max_contributions_per_partition 1")
    e11 = [r for r in rows if r[DX] == "E11"]
    for eps, label in [(1.0, "cohort count (E11)"), (0.1, "cohort count (E11), epsilon 0.1")]:
        single(label, pdp.Metrics.PRIVACY_ID_COUNT, lambda r: "", [""],
               distinct(lambda r: "", e11), eps, 1, 1,
               "the cohort's rows as one public partition: max_partitions_contributed 1, "
               "max_contributions_per_partition 1", subset=e11)
    single("patients by sex and age band", pdp.Metrics.PRIVACY_ID_COUNT,
           lambda r: f"{r[SEX]}|{r[BAND]}", [f"{s}|{b}" for s in SEXES for b in BANDS],
           distinct(lambda r: f"{r[SEX]}|{r[BAND]}"), 1.0, 1, 1,
           "max_partitions_contributed 1 (one sex and birth year per patient), "
           "max_contributions_per_partition 1")
    sums = {}
    for r in rows:
        s = sums.setdefault(r[SEX], [0.0, 0])
        s[0] += r[HBA1C]
        s[1] += 1
    single("mean HbA1c by sex", pdp.Metrics.MEAN, lambda r: r[SEX], SEXES,
           {k: v[0] / v[1] for k, v in sums.items()}, 1.0, 1, 10,
           "max_partitions_contributed 1, max_contributions_per_partition 10, hba1c 4..14",
           value=lambda r: r[HBA1C], bounds=(4.0, 14.0))

    # 100 cohort counts, Gaussian, under one accountant of (1, 1e-6).
    t0 = time.perf_counter()
    cohorts = [(d, s) for d in DIAGNOSES for s in SEXES]
    members = {c: [] for c in cohorts}
    for r in rows:
        members[(r[DX], r[SEX])].append(r)
    truths = {c: float(len({r[PID] for r in members[c]})) for c in cohorts}
    abs_e, rel_e, widths, sds = [], [], [], set()
    for _ in range(runs):
        acc = (pdp.PLDBudgetAccountant(total_epsilon=1.0, total_delta=1e-6) if accountant == "pld"
               else pdp.NaiveBudgetAccountant(total_epsilon=1.0, total_delta=1e-6))
        engine = pdp.DPEngine(acc, pdp.LocalBackend())
        results = {c: aggregate(engine, members[c], pdp.Metrics.PRIVACY_ID_COUNT,
                                pdp.NoiseKind.GAUSSIAN, lambda r: "", [""], 1, 1)
                   for c in cohorts}
        acc.compute_budgets()
        for c in cohorts:
            (_, m), = list(results[c])
            widths.append(half_width(pdp.NoiseKind.GAUSSIAN, m.privacy_id_count_noise_stddev))
            sds.add(round(m.privacy_id_count_noise_stddev, 6))
            errors({"": truths[c]}, {"": float(m.privacy_id_count)}, abs_e, rel_e)
    emit("100 cohort counts under (1, 1e-6)",
         {"epsilon": 1.0, "delta": 1e-6, "noise": "gaussian",
          "bounds": "each cohort's rows as one public partition: max_partitions_contributed 1, "
                    "max_contributions_per_partition 1",
          "accountant": accountant, "per_query": {"noise_sd": sorted(sds)},
          "versions": {p: version(p) for p in ("pipeline-dp", "python-dp")}},
         abs_e, rel_e, widths, runs, len(cohorts), time.perf_counter() - t0)


if __name__ == "__main__":
    main()
