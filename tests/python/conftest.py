"""A demo broker for the Python tests: `broker demo` in a temporary directory, on a free port.

The broker binary comes from CONSENTRY_BROKER (tests/run-all sets it after building).
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

BROKER = os.environ.get("CONSENTRY_BROKER", "broker")


class Demo:
    def __init__(self, data_dir: Path, info: dict, proc: subprocess.Popen):
        self.data_dir = data_dir
        self.info = info
        self.proc = proc

    def key(self, principal: str) -> Path:
        return self.data_dir / "keys" / f"{principal}.key"

    def token(self, principal: str) -> str:
        key = (
            self.data_dir / "ledger" / "ledger.key"
            if principal == "operator"
            else self.key(principal)
        )
        out = subprocess.run(
            [BROKER, "token", "--key", str(key)], check=True, capture_output=True, text=True
        )
        return out.stdout.strip()

    def broker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BROKER, *args], check=check, capture_output=True, text=True,
            env={**os.environ, "CONSENTRY_DATA_DIR": str(self.data_dir)},
        )


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Demo:
    data_dir = tmp_path_factory.mktemp("demo")
    proc = subprocess.Popen(
        [BROKER, "demo", "--data-dir", str(data_dir), "--patients", "400", "--seed", "5",
         "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
    info = json.loads(info_file.read_text())
    yield Demo(data_dir, info, proc)
    proc.terminate()
    proc.wait(timeout=60)
