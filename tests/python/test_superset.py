"""Apache Superset (from PyPI) charts a DP query the broker serves over Arrow Flight SQL, drawn by
a real headless Chromium, and the screenshot is measured.

Superset pins its own versions of pyarrow, pandas, Flask... that conflict with the clients in
requirements.txt, so it lives in its own virtualenv: CONSENTRY_SUPERSET_VENV (default
~/.cache/consentry/superset-venv), installed from superset_requirements.txt when absent or when
that file changed. superset_run.py runs in it (see its docstring for the steps). The browser is
the machine's Chromium (CONSENTRY_CHROMIUM, default /usr/bin/chromium; Debian's `chromium`
package): Playwright drives it, and never downloads one.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "superset_requirements.txt"
VENV = Path(os.environ.get("CONSENTRY_SUPERSET_VENV",
                           "~/.cache/consentry/superset-venv")).expanduser()
CHROMIUM = os.environ.get("CONSENTRY_CHROMIUM", "/usr/bin/chromium")
EPSILON = 0.2


def superset_python() -> Path:
    """Superset's virtualenv, (re)installed from superset_requirements.txt when needed."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".consentry-requirements.sha256"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-r", str(REQUIREMENTS)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, f"installing Superset into {VENV} failed:\n{done.stderr[-4000:]}"
    stamp.write_text(digest + "\n")
    return python


def test_superset_charts_a_dp_query_in_chromium(demo, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's `chromium` package "
                    "(or set CONSENTRY_CHROMIUM); this test drives a real browser")
    python = superset_python()

    study = demo.info["study"]["id"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update({
        "CONSENTRY_FLIGHT_URL": demo.info["flight_url"],
        "CONSENTRY_FLIGHT_TOKEN": demo.token("alice"),
        "CONSENTRY_STUDY": study,
        "CONSENTRY_EPSILON": str(EPSILON),
        "CONSENTRY_CHROMIUM": CHROMIUM,
    })
    work = tmp_path / "superset"
    done = subprocess.run([str(python), str(HERE / "superset_run.py"), str(work)],
                          env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, f"superset_run.py failed:\n{done.stderr[-8000:]}"
    result = json.loads((work / "result.json").read_text())
    print("Superset steps (s):", result["timings"], "screenshot:", work / "chart.png")
    if os.environ.get("CONSENTRY_SUPERSET_SCREENSHOT"):
        shutil.copy(work / "chart.png", os.environ["CONSENTRY_SUPERSET_SCREENSHOT"])

    # Superset's "Connect a database" tested the connection (its `SELECT 1` probe, answered
    # without spending) before adding it.
    assert result["connection_test"] == {"message": "OK"}, result["connection_test"]
    # Superset browsed the broker's catalog: one schema, the dataset's tables, no identifiers.
    assert result["schemas"] == ["public"]
    assert result["tables"] == ["conditions", "encounters", "observations", "patients"]
    assert "sex" in result["dataset_columns"]
    assert not {"ssn", "first_name", "last_name", "address"} & set(result["dataset_columns"])

    # The chart data API: Superset's own SQL, answered by the broker's DP path.
    api = result["api"]
    assert api["status"] == "success" and api["error"] is None, api
    sql = " ".join(api["query"].split()).rstrip(";").strip()
    assert "COUNT(*)" in sql and "FROM public.patients" in sql and "GROUP BY sex" in sql, sql
    counts = {row["sex"]: row["count"] for row in api["data"]}
    assert sorted(counts) == ["F", "M"], api["data"]

    # Plausible DP counts: the study sees the consenting patients only (most of them), plus
    # noise of a few units at epsilon 0.2.
    patients = pq.read_table(demo.info["dataset"]["source_files"]["patients"], columns=["sex"])
    true = {sex: pc.sum(pc.equal(patients["sex"], sex)).as_py() for sex in ("F", "M")}
    for sex, n in counts.items():
        assert 0.4 * true[sex] < n < true[sex] + 20, (sex, n, true[sex])

    # The browser's own chart data request ran the same SQL and got the same release (an
    # identical repeat is free and answers the same).
    assert len(result["browser"]) >= 1, result["browser"]
    for call in result["browser"]:
        assert call.get("error") is None and call.get("status") == 200, call
        assert " ".join(call["query"].split()).rstrip(";").strip() == sql
        assert {row["sex"]: row["count"] for row in call["data"]} == counts, call["data"]
    assert result["page_errors"] == [], result["page_errors"]

    # The ledger receipted it: one release spending the query's epsilon (or, once the study's
    # account is zCDP, its rho = epsilon^2 / 2), the repeats for free.
    receipts = json.loads(demo.broker(
        "audit", "receipts", "--study", study, "--url", demo.info["url"],
        "--key", str(demo.key("alice")),
    ).stdout)
    mine = [r for r in receipts if r["sql"] == sql]
    assert mine and all(r["outcome"] == "released" and r["mode"] == "dp" for r in mine), mine
    spends = [(r["epsilon"], r["rho"] or 0.0) for r in mine]
    assert spends[0] in [(pytest.approx(EPSILON), 0.0),
                         (0.0, pytest.approx(EPSILON**2 / 2))], mine
    assert all(spend == (0.0, 0.0) for spend in spends[1:]), mine

    # The screenshot: a drawn chart (not a blank page or an error box), two bars, F left of M
    # (the x axis sorts ascending), their heights in the counts' ratio (the y axis starts at 0).
    shot = result["screenshot"]
    assert result["canvas"] and shot["colors"] > 20, shot
    bars = shot["bars"]
    assert len(bars) == 2, bars
    left, right = sorted(bars, key=lambda b: b["left"])
    assert min(left["height"], right["height"]) > 100, bars
    assert left["height"] / right["height"] == pytest.approx(counts["F"] / counts["M"],
                                                              rel=0.03), (bars, counts)
