"""The notebooks, executed top to bottom against the demo broker (any failing cell fails)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


@pytest.mark.parametrize("name", ["researcher", "irb_review", "sponsor_verify", "patient"])
def test_notebook_runs(demo, name, monkeypatch):
    monkeypatch.setenv("CONSENTRY_DEMO_DIR", str(demo.data_dir))
    monkeypatch.setenv("CONSENTRY_BROKER", os.environ.get("CONSENTRY_BROKER", "broker"))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
