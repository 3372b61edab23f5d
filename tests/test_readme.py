"""The README's quickstart path, as a newcomer runs it: every command of its marked blocks, in a fresh project.

A block marked `<!-- readme-test: quickstart -->` is run line by line (`&&` chains split, comments
dropped) with this environment's `carclf`; the install commands are skipped (the environment is
installed) and so are lines for your own photos (the `PATH` placeholder). `carclf ui` runs until it
answers, then is stopped. The whole path (sweep, report with 3 seeds, promote, predict) takes about
a quarter of an hour on 2 cores.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- readme-test: quickstart -->"
INSTALL = re.compile(r"^(python3? -m venv|\S*pip install)")
PLACEHOLDER = re.compile(r"\bPATH\b")


def quickstart_commands(readme: str) -> list[str]:
    """The commands of the marked blocks in README order; install steps and placeholder lines left out."""
    blocks = re.findall(re.escape(MARK) + r"\s*```bash\n(.*?)```", readme, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment: '#' at the start or after a space
            for command in filter(None, (c.strip() for c in line.split("&&"))):
                if not INSTALL.match(command) and not PLACEHOLDER.search(command):
                    commands.append(command)
    return commands


def test_the_marked_blocks_hold_the_whole_first_hour():
    commands = quickstart_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    words = [shlex.split(c) for c in commands]
    for expected in (["data", "demo"], ["sweep", "sweeps/quickstart.yaml"], ["report", "quickstart"],
                     ["promote", "quickstart"], ["ui"], ["train", "--config"], ["predict"]):
        assert [w for w in words if w[1:1 + len(expected)] == expected], f"no `carclf {' '.join(expected)}`"
    assert all(Path(w[0]).name == "carclf" for w in words), "a quickstart command that is not carclf"
    assert not [c for c in commands if "PATH" in c or "pip install" in c]


def _carclf() -> list[str]:
    script = Path(sys.executable).with_name("carclf")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "carclf.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _run_ui(argv: list[str], env: dict, cwd: Path) -> tuple[int, str]:
    """`carclf ui` serves until stopped: it passes when the UI answers; then it is stopped."""
    port = 5000
    if not _port_is_free(port):  # the README's default port is taken on this machine: any free one will do
        port = _free_port()
        argv = [*argv, "--port", str(port)]
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    return 0, f"ui answered on port {port}"
            except OSError:
                time.sleep(2)
        return proc.returncode if proc.returncode is not None else 1, "ui did not answer"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_quickstart_command_of_the_readme_works_as_written(tmp_path, monkeypatch):
    project = tmp_path / "project"
    for folder in ("sweeps", "examples"):
        shutil.copytree(ROOT / folder, project / folder)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(CARCLF_PROJECT_ROOT=str(project), PYTHONPATH=str(ROOT), COLUMNS="100")
    outputs = {}  # 'report quickstart' -> what it printed; `carclf` and `.venv/bin/carclf` are one program
    for command in quickstart_commands((ROOT / "README.md").read_text(encoding="utf-8")):
        args = shlex.split(command)[1:]
        if " ".join(args) in outputs:  # the README repeats `carclf report quickstart` where it explains it
            continue
        if args[0] == "ui":
            rc, out = _run_ui([*_carclf(), *args], env, project)
        else:
            proc = subprocess.run([*_carclf(), *args], env=env, cwd=project, capture_output=True, text=True,
                                  timeout=1800)
            rc, out = proc.returncode, proc.stdout + proc.stderr
        assert rc == 0, f"`{command}` exited {rc}:\n{out[-4000:]}"
        outputs[" ".join(args)] = out

    everything = "\n".join(outputs.values())
    assert "Downloading artifacts" not in everything and "View run" not in everything  # MLflow's own output
    sweep = outputs["sweep sweeps/quickstart.yaml"]
    assert "start it with `carclf ui`" in sweep and "viewStateShareKey=carclf-sweep-quickstart" in sweep
    assert "Winner, chosen on validation: " in outputs["report quickstart"]
    page = (project / "results" / "quickstart" / "report" / "report.html").read_text(encoding="utf-8")
    assert "Winner, chosen on validation: " in page and "<h2>Images per class and split</h2>" in page
    assert "carclf-best v1 = the report's winner" in outputs["promote quickstart"]
    assert (project / "preds.csv").is_file()
