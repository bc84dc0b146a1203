"""Starts `broker demo` in a directory on a free port and waits until it describes itself."""

import json
import subprocess
import time
from pathlib import Path


def start(broker: str, data_dir: Path, patients: int, seed: int) -> tuple[subprocess.Popen, dict]:
    """Starts the demo broker; returns the process and its demo.json once written."""
    proc = subprocess.Popen(
        [broker, "demo", "--data-dir", str(data_dir), "--patients", str(patients),
         "--seed", str(seed), "--listen", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    info_file = data_dir / "demo.json"
    deadline = time.time() + 300
    while not info_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"broker demo exited: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError("broker demo did not write demo.json in 5 minutes")
        time.sleep(0.2)
    return proc, json.loads(info_file.read_text())


def stop(proc: subprocess.Popen) -> None:
    """Stops the demo broker (it closes its ledger on SIGTERM)."""
    proc.terminate()
    proc.wait(timeout=60)
