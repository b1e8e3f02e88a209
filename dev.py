#!/usr/bin/env python3
"""One-command set-up and entry points: `python3 dev.py quickstart` and `python3 dev.py test`.

Creates `.venv` next to this file when missing, installs archlab into it (editable, with the `test` extra, so
one environment serves both commands) and runs the job. Needs only Python >= 3.10 with pip and venv.
Re-running is cheap: the install is redone only when pyproject.toml, the torch requirement or the extras
change. Set ARCHLAB_TORCH to choose the torch requirement (default `torch==2.13.0`, which is the CPU build on
our machines; e.g. ARCHLAB_TORCH=torch on a CUDA box).
"""
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".archlab-install-stamp"
TORCH_REQUIREMENT = os.environ.get("ARCHLAB_TORCH", "torch==2.13.0")
ARCHLAB_REQUIREMENT = ".[test]"  # editable archlab with pytest and hypothesis


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def install_fingerprint() -> str:
    installed = (ROOT / "pyproject.toml").read_bytes() + TORCH_REQUIREMENT.encode() + ARCHLAB_REQUIREMENT.encode()
    return hashlib.sha256(installed).hexdigest()


def ensure_environment() -> None:
    if sys.version_info < (3, 10):
        sys.exit("error: archlab needs Python >= 3.10; run this script with a newer python3")
    if not PYTHON.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == install_fingerprint():
        return
    pip = (str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q")
    run(*pip, TORCH_REQUIREMENT)
    run(*pip, "-e", ARCHLAB_REQUIREMENT)
    STAMP.write_text(install_fingerprint())


def main() -> None:
    commands = {
        # the quick study (configs/studies/quick.yaml); --resume makes a second call finish or re-report it
        "quickstart": [str(PYTHON), "-m", "archlab.compare.cli", "compare", "configs/studies/quick.yaml", "--resume"],
        "test": [str(PYTHON), "-m", "pytest", "-q", "--durations=25"],  # the slowest tests: the CI time budget
    }
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: python3 dev.py {{{'|'.join(commands)}}} [extra arguments]")
    ensure_environment()
    cmd = commands[sys.argv[1]] + sys.argv[2:]
    print("+", " ".join(cmd), flush=True)
    sys.exit(subprocess.run(cmd, cwd=ROOT).returncode)


if __name__ == "__main__":
    main()
