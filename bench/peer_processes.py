"""What the peer benchmarks (bench_ppo.py, bench_grpo.py) share: TRL installed beside the venv,
and child processes driven over a pair of pipes, a block of steps at a time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common


def install_trl(version: str, deps: list[tuple[str, str]]) -> Path:
    """TRL `version` (+ the `deps` — (requirement, import name) — the venv lacks) in
    bench/.cache/trl-<version>, installed once with `pip install --no-deps --target`: the venv is
    not touched. The TRL child puts this directory first on sys.path and checks trl.__version__."""
    import importlib.util

    trl_dir = common.CACHE_DIR / f"trl-{version}"
    marker = trl_dir / "trl" / "__init__.py"
    missing = [req for req, name in deps
               if importlib.util.find_spec(name) is None and not (trl_dir / name).is_dir()
               and not (trl_dir / f"{name}.py").is_file()]
    if marker.is_file() and not missing:
        return trl_dir
    wanted = ([] if marker.is_file() else [f"trl=={version}"]) + missing
    print(f"[setup] installing {' '.join(wanted)} into {trl_dir.relative_to(common.REPO_ROOT)} "
          f"(--no-deps --target: the venv is not touched) ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(trl_dir), *wanted]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"could not install TRL {version} into {trl_dir}:\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}\nInstall it by hand: {' '.join(cmd)}")
    return trl_dir


class Channel:
    """JSON lines over a pair of pipes (the children's stdout belongs to their libraries)."""

    def __init__(self, read_fd: int, write_fd: int):
        self.reader = os.fdopen(read_fd, "r")
        self.writer = os.fdopen(write_fd, "w")

    def send(self, **message) -> None:
        self.writer.write(json.dumps(message) + "\n")
        self.writer.flush()

    def recv(self) -> dict:
        line = self.reader.readline()
        if not line:
            raise EOFError("the other side closed the channel")
        return json.loads(line)


class BlockDriver:
    """In a child: at a step boundary wait for {"cmd": "run", "steps": n}; after n more steps
    report {"event": "block", "seconds": ...}; {"cmd": "finish"} lets the loop end."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.remaining = 0
        self.start = 0.0
        self.marks: list[float] = []
        self.details: list[dict] = []

    def wait(self) -> None:
        message = self.channel.recv()
        if message["cmd"] == "finish":
            self.remaining = -1
            return
        self.remaining = int(message["steps"])
        self.marks, self.details = [], []
        self.start = time.perf_counter()

    def step_done(self, detail: dict | None = None) -> None:
        if self.remaining <= 0:
            return  # after finish: the loop's remaining steps are not ours to time
        self.marks.append(time.perf_counter())
        self.details.append(detail or {})
        self.remaining -= 1
        if self.remaining == 0:
            edges = [self.start] + self.marks
            self.channel.send(event="block", seconds=self.marks[-1] - self.start,
                              step_seconds=[b - a for a, b in zip(edges, edges[1:])], details=self.details)
            self.wait()


class Child:
    """A child process running `SCRIPT --child <role>`, talking over two pipes."""

    def __init__(self, script: Path, role: str, spec_path: Path, log_path: Path, env: dict,
                 extra: list[str] = ()):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        self.log_path = log_path
        cmd = [sys.executable, str(Path(script).resolve()), "--child", role, "--spec", str(spec_path),
               "--fds", f"{to_child_r},{from_child_w}", *extra]
        self.proc = subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env,
                                     pass_fds=(to_child_r, from_child_w), cwd=str(common.REPO_ROOT))
        os.close(to_child_r)
        os.close(from_child_w)
        self.channel = Channel(from_child_r, to_child_w)
        self.role = role

    def expect(self, event: str) -> dict:
        try:
            message = self.channel.recv()
        except EOFError:
            self.proc.wait(timeout=60)
            raise SystemExit(f"{self.role} child exited ({self.proc.returncode}):\n"
                             f"{self.log_path.read_text()[-5000:]}") from None
        if message.get("event") != event:
            raise SystemExit(f"{self.role} child sent {message!r}, expected {event!r}")
        return message

    def run_block(self, steps: int) -> dict:
        self.channel.send(cmd="run", steps=steps)
        return self.expect("block")

    def finish(self, timeout: float = 300) -> None:
        with _suppress():
            self.channel.send(cmd="finish")
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (BrokenPipeError, OSError))
