"""What the accuracy workload's peer runners share (accuracy_peers.py, accuracy_pipelinedp.py,
accuracy_tumult.py; each runs in its own virtualenv, so this module imports nothing beyond the
standard library): the visits table's public keys, the error metrics and the JSON line."""
import json
import statistics

DIAGNOSES = (
    "E11 I10 E78 J44 I25 N18 E66 F32 J45 K21 M54 I48 E03 G47 F41 M17 I50 N39 K57 M81 "
    "G43 L40 D50 R73 E55 J18 I63 C50 C61 C34 F17 K70 B18 M06 G20 G30 F20 H40 H25 N40 "
    "I70 I21 E10 J30 K29 L20 M10 R10 R07 Z00"
).split()
SEXES = ["F", "M"]
BANDS = ["18-44", "45-64", "65+"]


def errors(truth, got, abs_e, rel_e):
    """Appends each cell's absolute and relative error (a cell not released counts as 0)."""
    for k, t in truth.items():
        e = abs(got.get(k, 0.0) - t)
        abs_e.append(e)
        rel_e.append(e / max(abs(t), 1.0))


def emit(contender, name, extra, abs_e, rel_e, widths, runs, n, wall=None):
    """Prints one query's JSON line: the medians over every cell of every run."""
    line = {
        "dataset": "visits", "query": name, "contender": contender, **extra,
        "cells": n, "runs": runs,
        "median_abs_error": statistics.median(abs_e), "median_rel_error": statistics.median(rel_e),
        "median_ci95": statistics.median(widths) if widths else None,
    }
    if wall is not None:
        line["wall_s"] = round(wall, 1)
    print(json.dumps(line), flush=True)
