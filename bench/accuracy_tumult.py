"""Accuracy workload for Tumult Analytics (local PySpark), the same questions, JSON lines and
metrics as accuracy_peers.py (OpenDP) and accuracy_bench (Consentry) on the peer kit's visits
table: per query the median absolute and relative error over every cell of the runs against the
exact answer (Spark, no privacy), and the median 95% half-width of Tumult's noise.

usage: accuracy_tumult.py VISITS.parquet [RUNS] [COHORT_RUNS] [cohorts]
       (COHORT_RUNS: runs of the 100 cohort counts, default RUNS; cohorts: only those)
env:   TUMULT_RHO     the total rho of (1, 1e-6) for the 100 cohort counts (accuracy.sh passes
                      OpenDP's conversion, `accuracy_peers.py --rho`); without it, tmlt.core's
                      own conversion (RhoZCDPToApproxDP: rho + 2 sqrt(rho ln(1/delta)) = epsilon)
       SPARK_MEMORY   the driver's memory (default 4g); Spark runs local[2]

The privacy unit is `AddRowsWithID("patient_id")`; every count is `count_distinct(["patient_id"])`
with Tumult's truncation constraints, chosen from the table where they hold for every patient:
`MaxGroupsPerID("diagnosis", 10)` for patients by diagnosis (no patient has more than 10
diagnoses; Tumult then keeps one row per patient and diagnosis itself); no constraint for a
cohort (a distinct count of the ID without grouping is one row per patient to Tumult);
`MaxRowsPerID(1)` for sex and age band (a patient has one sex and one birth year, so one row
per patient loses no one); `MaxRowsPerID(10)` for the mean (the kit's bound), `average("hba1c",
4, 14)`. Group keys are public KeySets. Single queries spend `PureDPBudget(epsilon)` (Tumult's
default noise: geometric for counts, Laplace for the mean). The 100 cohort counts share one
Session of `RhoZCDPBudget(rho)`, `rho / 100` each (discrete Gaussian). The age band is a column
added to the Spark DataFrame before the Session, as accuracy_peers.py adds it in Polars. The
half-width is Tumult's own inverse CDF of the noise (`Session._noise_info`, at 0.975); for the
mean Tumult reports the sum's and count's noise, not the mean's, so it is left empty.
"""
import math
import os
import sys
import time
from importlib.metadata import version

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from tmlt.analytics import (AddRowsWithID, KeySet, MaxGroupsPerID, MaxRowsPerID, PureDPBudget,
                            QueryBuilder, RhoZCDPBudget, Session)
from tmlt.analytics._noise_info import _inverse_cdf
from tmlt.analytics.utils import cleanup

import accuracy_common as common
from accuracy_common import BANDS, DIAGNOSES, SEXES, errors



def emit(*args):
    common.emit('tumult', *args)


def cells(rows, keys, value="n"):
    return {"|".join(str(r[k]) for k in keys): float(r[value]) for r in rows if r[value] is not None}


def noise(session, query, budget):
    """Tumult's noise for a query: its mechanisms and the 95% half-width if there is one."""
    info = session._noise_info(query, budget)
    kinds = [i["noise_mechanism"].name.lower() for i in info]
    width = float(_inverse_cdf(info[0], 0.975)) if len(info) == 1 else None
    return kinds, [float(i["noise_parameter"]) for i in info], width


def main():
    path = sys.argv[1]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    cohort_runs = int(sys.argv[3]) if len(sys.argv) > 3 else runs
    only_cohorts = len(sys.argv) > 4 and sys.argv[4] == "cohorts"
    os.environ["PYSPARK_PYTHON"] = sys.executable  # Spark workers must see the venv (tmlt UDFs)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    spark = (SparkSession.builder.master("local[2]").appName("accuracy-tumult")
             .config("spark.driver.memory", os.environ.get("SPARK_MEMORY", "4g"))
             .config("spark.sql.shuffle.partitions", "8")
             .config("spark.sql.warehouse.dir", "/tmp/accuracy-tumult-warehouse")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    sdf = (spark.read.parquet(path).select("patient_id", "diagnosis", "sex", "birth_year", "hba1c")
           .withColumn("band", F.when(F.col("birth_year") >= 1981, "18-44")
                       .when(F.col("birth_year") >= 1961, "45-64").otherwise("65+"))
           .cache())
    sdf.count()

    def session(budget):
        return Session.from_dataframe(privacy_budget=budget, source_id="visits", dataframe=sdf,
                                      protected_change=AddRowsWithID(id_column="patient_id"))

    def single(name, keys, build, truth, epsilon, bounds):
        if only_cohorts:
            return
        t0 = time.perf_counter()
        s = session(PureDPBudget(epsilon * runs))
        query = build(QueryBuilder("visits"))
        kinds, params, width = noise(s, query, PureDPBudget(epsilon))
        abs_e, rel_e = [], []
        for _ in range(runs):
            got = cells(s.evaluate(query, PureDPBudget(epsilon)).collect(), keys)
            errors(truth, got, abs_e, rel_e)
        emit(name, {"epsilon": epsilon, "noise": "+".join(kinds), "bounds": bounds,
                    "noise_parameter": params},
             abs_e, rel_e, [width] if width is not None else [], runs, len(truth),
             time.perf_counter() - t0)

    def exact(keys, frame, agg):
        return cells(frame.groupBy(*keys).agg(agg.alias("n")).collect(), keys)

    single("patients by diagnosis", ["diagnosis"],
           lambda q: q.enforce(MaxGroupsPerID("diagnosis", 10))
           .groupby(KeySet.from_dict({"diagnosis": DIAGNOSES})).count_distinct(["patient_id"], name="n"),
           exact(["diagnosis"], sdf, F.countDistinct("patient_id")), 1.0,
           "MaxGroupsPerID(diagnosis, 10) (one row per patient and diagnosis, by Tumult)")
    e11 = exact([], sdf.filter(F.col("diagnosis") == "E11"), F.countDistinct("patient_id"))
    for eps, label in [(1.0, "cohort count (E11)"), (0.1, "cohort count (E11), epsilon 0.1")]:
        single(label, [],
               lambda q: q.filter("diagnosis = 'E11'").count_distinct(["patient_id"], name="n"),
               e11, eps, "none needed (distinct IDs without grouping: one row per patient)")
    single("patients by sex and age band", ["sex", "band"],
           lambda q: q.enforce(MaxRowsPerID(1))
           .groupby(KeySet.from_dict({"sex": SEXES, "band": BANDS})).count_distinct(["patient_id"], name="n"),
           exact(["sex", "band"], sdf, F.countDistinct("patient_id")), 1.0,
           "MaxRowsPerID(1) (one sex and birth year per patient)")
    single("mean HbA1c by sex", ["sex"],
           lambda q: q.enforce(MaxRowsPerID(10)).groupby(KeySet.from_dict({"sex": SEXES}))
           .average("hba1c", 4.0, 14.0, name="n"),
           exact(["sex"], sdf, F.avg("hba1c")), 1.0, "MaxRowsPerID(10), hba1c 4..14")

    # 100 cohort counts under one Session of RhoZCDPBudget(rho), rho of (1, 1e-6).
    t0 = time.perf_counter()
    if os.environ.get("TUMULT_RHO"):
        rho, source = float(os.environ["TUMULT_RHO"]), "OpenDP's zCDP -> approxDP conversion"
    else:
        log = math.log(1 / 1e-6)
        rho, source = (math.sqrt(log + 1.0) - math.sqrt(log)) ** 2, "tmlt.core's RhoZCDPToApproxDP"
    cohorts = [(d, s) for d in DIAGNOSES for s in SEXES]
    truths = exact(["diagnosis", "sex"], sdf, F.countDistinct("patient_id"))
    queries = {c: QueryBuilder("visits").filter(f"diagnosis = '{c[0]}' AND sex = '{c[1]}'")
               .count_distinct(["patient_id"], name="n") for c in cohorts}
    per = RhoZCDPBudget(rho / len(cohorts))
    abs_e, rel_e, widths, kinds, params = [], [], [], set(), set()
    s = session(RhoZCDPBudget(rho))
    for c in cohorts:  # the noise does not change from run to run: compiled once per cohort
        k, p, w = noise(s, queries[c], per)
        kinds.update(k)
        params.update(round(x, 6) for x in p)
        widths.append(w)
    for _ in range(cohort_runs):
        s = session(RhoZCDPBudget(rho))
        for c in cohorts:
            got = float(s.evaluate(queries[c], per).collect()[0]["n"])
            errors({"": truths["|".join(c)]}, {"": got}, abs_e, rel_e)
    emit("100 cohort counts under (1, 1e-6)",
         {"epsilon": 1.0, "delta": 1e-6, "noise": "+".join(sorted(kinds)),
          "bounds": "none needed (distinct IDs without grouping: one row per patient)",
          "rho": rho, "rho_from": source, "per_query": {"rho": rho / len(cohorts)},
          "noise_parameter": sorted(params),
          "versions": {p: version(p) for p in ("tmlt.analytics", "tmlt.core", "pyspark")}},
         abs_e, rel_e, widths, cohort_runs, len(cohorts), time.perf_counter() - t0)
    cleanup()
    spark.stop()


if __name__ == "__main__":
    main()
