"""A demo broker for the Python tests: `broker demo` in a temporary directory, on a free port.

The broker binary comes from CONSENTRY_BROKER (tests/run-all sets it after building).
"""

import os
import subprocess
from pathlib import Path

import pytest

import demo_server

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
    proc, info = demo_server.start(BROKER, data_dir, patients=400, seed=5)
    yield Demo(data_dir, info, proc)
    demo_server.stop(proc)
