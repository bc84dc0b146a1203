"""Apache Superset charts a DP query the broker serves over Arrow Flight SQL, in a real Chromium.

Runs inside Superset's own virtualenv (tests/python/superset_requirements.txt; test_superset.py
builds it and runs this script). From an empty work directory it sets Superset up headless
(SQLite metadata database, `superset db upgrade`, an admin, `superset init`), serves Superset
on a free port, and through the REST API tests and adds the broker as a database
(`datafusion://HOST:PORT?insecure=true&token=...&x-consentry-study=...`, the flightsql-dbapi
dialect; Superset pings it with `SELECT 1`), creates the dataset `public.patients` and a bar chart of COUNT(*) by sex. It asks the chart data API for
the chart's data, then logs in through the login page in Chromium (Playwright), opens the chart,
waits for it to draw and takes a screenshot, which it measures: the bars' heights in pixels.

Input (environment): CONSENTRY_FLIGHT_URL (grpc://host:port), CONSENTRY_FLIGHT_TOKEN (a bearer
token), CONSENTRY_STUDY, CONSENTRY_EPSILON, CONSENTRY_CHROMIUM; argument: the work directory.
Output: WORKDIR/result.json (the SQL Superset ran, the rows from the API and from the browser's
own request, the bars measured on the screenshot, each step's seconds) and WORKDIR/chart.png.
Exits non-zero, with Superset's log tail on stderr, when a step fails.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
from PIL import Image
from playwright.sync_api import sync_playwright

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
ADMIN = ("admin", secrets.token_urlsafe(12))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

timings: dict[str, float] = {}


class Step:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.start = time.monotonic()
        print(f"-- {self.name}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        timings[self.name] = round(time.monotonic() - self.start, 1)


def superset_cli(env: dict, log: Path, *args: str) -> None:
    with log.open("a") as out:
        out.write(f"\n$ superset {' '.join(args[:2])}\n")
        out.flush()
        done = subprocess.run([str(BIN / "superset"), *args], env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"superset {args[0]} failed ({done.returncode}); see {log}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(session: requests.Session, method: str, url: str, **kwargs) -> dict:
    r = session.request(method, url, timeout=120, **kwargs)
    if r.status_code >= 400:
        raise RuntimeError(f"{method} {url}: {r.status_code} {r.text[:2000]}")
    return r.json()


def measure_bars(png: Path) -> list[dict]:
    """The bars on the screenshot: runs of columns holding strongly coloured pixels (the grid,
    axes and labels are grey or black), each with its left edge and its height in pixels."""
    img = Image.open(png).convert("RGB")
    w, h = img.size
    px = img.load()
    heights = []
    for x in range(w):
        n = 0
        for y in range(h):
            r, g, b = px[x, y]
            if max(r, g, b) - min(r, g, b) > 80:
                n += 1
        heights.append(n)
    bars, start = [], None
    for x, n in enumerate(heights + [0]):
        if n > 10 and start is None:
            start = x
        elif n <= 10 and start is not None:
            if x - start >= 10:
                bars.append({"left": start, "width": x - start,
                             "height": max(heights[start:x])})
            start = None
    return bars


def main() -> int:
    work = Path(sys.argv[1]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    home = work / "superset-home"
    home.mkdir(exist_ok=True)
    log = work / "superset.log"
    flight_url = os.environ["CONSENTRY_FLIGHT_URL"]
    token = os.environ["CONSENTRY_FLIGHT_TOKEN"]
    study = os.environ["CONSENTRY_STUDY"]
    epsilon = os.environ.get("CONSENTRY_EPSILON", "0.2")
    chromium = os.environ.get("CONSENTRY_CHROMIUM", "/usr/bin/chromium")

    env = {
        **os.environ,
        "SUPERSET_CONFIG_PATH": str(HERE / "superset_config.py"),
        "CONSENTRY_SUPERSET_HOME": str(home),
        "SUPERSET_HOME": str(home),
        "SUPERSET_SECRET_KEY": secrets.token_urlsafe(32),
        "FLASK_APP": "superset",
        "PYTHONUNBUFFERED": "1",
    }
    for k in ("CONSENTRY_FLIGHT_TOKEN",):
        env.pop(k, None)

    with Step("superset db upgrade"):
        superset_cli(env, log, "db", "upgrade")
    with Step("superset fab create-admin"):
        superset_cli(env, log, "fab", "create-admin", "--username", ADMIN[0], "--firstname",
                     "Test", "--lastname", "Admin", "--email", "admin@example.invalid",
                     "--password", ADMIN[1])
    with Step("superset init"):
        superset_cli(env, log, "init")

    # The broker as a database, through Superset's own "Connect a database" (below, once the
    # server runs: it tests the connection with SQLAlchemy's `SELECT 1`, which the broker
    # answers without spending). The dialect is flightsql-dbapi's entry point `datafusion`
    # (`datafusion+flightsql://` only resolves once `flightsql.sqlalchemy` is imported, which
    # Superset never does).
    host_port = flight_url.removeprefix("grpc://")
    uri = (f"datafusion://{host_port}?insecure=true&token={token}"
           f"&x-consentry-study={study}&x-consentry-epsilon={epsilon}")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = None
    try:
        with Step("superset run (until healthy)"):
            out = log.open("a")
            server = subprocess.Popen(
                [str(BIN / "superset"), "run", "-h", "127.0.0.1", "-p", str(port),
                 "--with-threads"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 120
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"superset run exited ({server.returncode})")
                try:
                    if requests.get(f"{base}/health", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("superset run not healthy in 120 s")
                time.sleep(0.5)

        result = run_api_and_browser(base, chromium, work, uri)
        result["timings"] = timings
        (work / "result.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(timings), file=sys.stderr)
        return 0
    except Exception:
        tail = log.read_text(errors="replace").splitlines()[-80:] if log.exists() else []
        print("\n".join(["---- superset.log (tail)", *tail, "----"]), file=sys.stderr)
        raise
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def run_api_and_browser(base: str, chromium: str, work: Path, uri: str) -> dict:
    s = requests.Session()
    with Step("REST: login, dataset, chart, chart data"):
        login = api(s, "POST", f"{base}/api/v1/security/login", json={
            "username": ADMIN[0], "password": ADMIN[1], "provider": "db", "refresh": True})
        s.headers["Authorization"] = "Bearer " + login["access_token"]
        connection = {"database_name": "consentry", "sqlalchemy_uri": uri}
        tested = api(s, "POST", f"{base}/api/v1/database/test_connection/", json=connection)
        db_id = api(s, "POST", f"{base}/api/v1/database/", json=connection)["id"]
        schemas = api(s, "GET", f"{base}/api/v1/database/{db_id}/schemas/")["result"]
        tables = api(s, "GET", f"{base}/api/v1/database/{db_id}/tables/",
                     params={"q": "(schema_name:public)"})["result"]
        dataset = api(s, "POST", f"{base}/api/v1/dataset/", json={
            "database": db_id, "schema": "public", "table_name": "patients"})
        ds_id = dataset["id"]
        form_data = {
            "datasource": f"{ds_id}__table", "viz_type": "echarts_timeseries_bar",
            "x_axis": "sex", "metrics": ["count"], "groupby": [], "adhoc_filters": [],
            "row_limit": 10000, "order_desc": True, "x_axis_sort_asc": True,
            "show_value": True, "orientation": "vertical", "color_scheme": "supersetColors",
            "show_legend": False,
        }
        chart = api(s, "POST", f"{base}/api/v1/chart/", json={
            "slice_name": "Patients by sex (DP)", "viz_type": form_data["viz_type"],
            "datasource_id": ds_id, "datasource_type": "table",
            "params": json.dumps(form_data)})
        chart_id = chart["id"]
        query = {"columns": ["sex"], "metrics": ["count"], "orderby": [["count", False]],
                 "row_limit": 10000, "filters": [], "extras": {"having": "", "where": ""}}
        data = api(s, "POST", f"{base}/api/v1/chart/data", json={
            "datasource": {"id": ds_id, "type": "table"}, "force": True, "queries": [query],
            "result_format": "json", "result_type": "full"})["result"][0]

    browser_data: list = []
    with Step("Chromium: login page, chart, screenshot"):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 700})

                def on_response(resp):
                    if "/api/v1/chart/data" in resp.url and resp.request.method == "POST":
                        browser_data.append({"status": resp.status, "body": resp.json()})

                page.on("response", on_response)
                page.goto(f"{base}/login/")
                page.fill("#username", ADMIN[0])
                page.fill("#password", ADMIN[1])
                page.keyboard.press("Enter")
                page.wait_for_url(lambda u: "/login" not in u, timeout=60_000)
                page.goto(f"{base}/explore/?slice_id={chart_id}&standalone=1")
                page.wait_for_selector(".chart-container canvas", timeout=90_000)
                page.wait_for_function("() => !document.querySelector('.loading')",
                                       timeout=60_000)
                page.wait_for_timeout(1500)  # ECharts' entry animation
                errors = page.locator(".alert-danger, [role=alert]").all_inner_texts()
                page.screenshot(path=str(work / "chart.png"))
                canvas = page.evaluate(
                    "() => Array.from(document.querySelectorAll('.chart-container canvas'))"
                    ".map(c => [c.width, c.height])")
            finally:
                browser.close()

    img = Image.open(work / "chart.png").convert("RGB")
    return {
        "connection_test": tested,
        "schemas": schemas,
        "tables": sorted(t["value"] for t in tables),
        "dataset_columns": [c["column_name"] for c in dataset["data"]["columns"]],
        "chart_id": chart_id,
        "api": {"query": data["query"], "status": data["status"], "error": data["error"],
                "colnames": data["colnames"], "data": data["data"]},
        "browser": [
            {"status": d["status"],
             "query": d["body"]["result"][0].get("query"),
             "data": d["body"]["result"][0].get("data"),
             "error": d["body"]["result"][0].get("error")} if d["status"] == 200 else d
            for d in browser_data],
        "page_errors": errors,
        "canvas": canvas,
        "screenshot": {"size": img.size, "colors": len(img.getcolors(1 << 24) or []),
                       "bars": measure_bars(work / "chart.png")},
    }


if __name__ == "__main__":
    sys.exit(main())
