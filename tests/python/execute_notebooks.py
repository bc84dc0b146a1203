#!/usr/bin/env python3
"""Executes the notebooks against a fresh demo broker and saves them with their outputs.

    tests/python/execute_notebooks.py [--broker PATH] [--patients N] [--seed S] [NAME...]

Run it with the tests' virtualenv (tests/run-all creates it) after `cargo build --bins`. The
demo is built in a temporary directory; outputs name it as ../consentry-data, where
`broker demo` puts it by default, so the saved notebooks read as a user's own run.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
ALL = ["researcher", "irb_review", "sponsor_verify", "patient"]


def scrub(nb, data_dir: str) -> None:
    """Names the temporary demo directory as the default one in every text output."""
    default = str((ROOT / "consentry-data").resolve())
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = out["text"].replace(data_dir, default)
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    out["data"][mime] = value.replace(data_dir, default)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", default=os.environ.get(
        "CONSENTRY_BROKER", str(ROOT / "target" / "debug" / "broker")))
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("names", nargs="*", default=ALL)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp).resolve() / "consentry-data"
        proc, _ = demo_server.start(args.broker, data_dir, args.patients, args.seed)
        try:
            os.environ["CONSENTRY_DEMO_DIR"] = str(data_dir)
            os.environ["CONSENTRY_BROKER"] = args.broker
            for name in args.names:
                path = NOTEBOOKS / f"{name}.ipynb"
                nb = nbformat.read(path, as_version=4)
                print(f"executing {path.name}", file=sys.stderr)
                NotebookClient(nb, timeout=300, kernel_name="python3",
                               resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
                scrub(nb, str(data_dir))
                nbformat.write(nb, path)
        finally:
            demo_server.stop(proc)


if __name__ == "__main__":
    main()
