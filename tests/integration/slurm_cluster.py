"""A throwaway SLURM cluster on this machine (Debian's munge + slurmctld + slurmd) under one directory.

Two virtual nodes, each its own slurmd (own port, own spool) on this host: SLURM's backfill
scheduler places each component of a heterogeneous job on a different node, so a one-node
cluster never starts the PPO het job. The node names are names of this host (its hostname,
`localhost`), so `scontrol show hostnames` gives addresses torch.distributed can reach.

Everything lives in `root`: the munge key and socket, slurm.conf, spool/state directories, logs.
Ports are picked free at start, so two clusters on one machine do not meet. The daemons run in
the foreground as our children (`-D` / `-F`) and `stop()` cancels jobs, then ends exactly the
processes it started (and the job processes of their sessions).

    python -m tests.integration.slurm_cluster /tmp/cluster   # start one by hand; Ctrl-C stops it
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from aligner.distributed.launch_env import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sacct", "scontrol", "scancel")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if not (shutil.which(name) or Path("/usr/sbin", name).exists())]


def loopback_node_names(count: int = 2) -> list[str]:
    """Distinct names of this host that resolve, to serve as node names (empty if too few)."""
    names = []
    for name in (socket.gethostname(), "localhost", "localhost.localdomain", "ip6-localhost"):
        try:
            socket.getaddrinfo(name, None)
        except OSError:
            continue
        if name not in names:
            names.append(name)
    return names[:count] if len(names) >= count else []


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    def __init__(self, root: Path, nodes: list[str], cpus: int = 4):
        self.root, self.cpus, self.nodes = Path(root), cpus, list(nodes)
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket.2"
        self.procs: dict[str, subprocess.Popen] = {}

    # -- environment for the client commands (sbatch, squeue, ...) and the jobs
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "OMPI_", "PMI_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def _write_config(self) -> None:
        munge_dir = self.root / "munge"
        for sub in ("munge", "ctld", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge_dir.chmod(0o700)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.ctld_port = free_port()
        host = socket.gethostname()
        node_lines = []
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            node_lines.append(f"NodeName={node} NodeHostname={node} NodeAddr=127.0.0.1 Port={free_port()} "
                              f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN")
        node_lines = "\n".join(node_lines)
        self.conf.write_text(f"""\
ClusterName=alignertest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={self.root / 'ctld'}
SlurmdSpoolDir={self.root / 'spool'}/%n
SlurmctldPidFile={self.root / 'ctld' / 'slurmctld.pid'}
SlurmdPidFile={self.root / 'spool'}/slurmd.%n.pid
SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.root / 'log'}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
SchedulerParameters=bf_interval=1
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        munge = self.root / "munge"
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--socket={self.socket}",
                               f"--key-file={munge / 'munge.key'}", f"--pid-file={munge / 'munged.pid'}",
                               f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"])
        self._until(lambda: self.socket.exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._until(lambda: self._run("scontrol", "ping").returncode == 0
                    and "UP" in self._run("scontrol", "ping").stdout, timeout, "slurmctld")
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", [_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)])
        self._until(self._nodes_idle, timeout, "every slurmd registering as idle")
        return self

    def _nodes_idle(self) -> bool:
        states = self._run("sinfo", "-h", "-N", "-o", "%t").stdout.split()
        return len(states) == len(self.nodes) and all(s == "idle" for s in states)

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([_which(argv[0]), *argv[1:]], capture_output=True, text=True, env=self.env(),
                              timeout=30)

    def _until(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}\n{self.logs()}")
            if ok():
                return
            time.sleep(0.25)
        raise TimeoutError(f"SLURM test cluster: no {what} after {timeout:.0f}s\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- jobs
    def sbatch(self, argv: list[str], cwd: Path, **env: str) -> int:
        proc = subprocess.run([_which("sbatch"), "--parsable", *argv], capture_output=True, text=True,
                              env=self.env(**env), cwd=str(cwd), timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(argv)} failed: {proc.stderr}\n{self.logs()}")
        return int(proc.stdout.strip().split(";")[0].split("+")[0])

    def job_state(self, job_id: int) -> dict[str, str]:
        """The job's fields from `scontrol show job` (works without accounting); for a het job,
        its leader's (component 0: the batch script's exit code)."""
        out = self._run("scontrol", "show", "job", "-o", str(job_id)).stdout
        fields: dict[str, str] = {}
        for item in (out.splitlines() or [""])[0].split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait(self, job_ids: list[int], timeout: float) -> dict[int, dict[str, str]]:
        """Wait until every job has ended (or can never start); their final fields."""
        deadline = time.monotonic() + timeout
        done: dict[int, dict[str, str]] = {}
        while time.monotonic() < deadline:
            for job_id in job_ids:
                if job_id in done:
                    continue
                fields = self.job_state(job_id)
                state = fields.get("JobState", "UNKNOWN")
                if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN") or \
                        fields.get("Reason") == "DependencyNeverSatisfied":
                    done[job_id] = fields
            if len(done) == len(job_ids):
                return done
            time.sleep(1)
        for job_id in job_ids:
            self._run("scancel", str(job_id))
        raise TimeoutError(f"jobs {sorted(set(job_ids) - set(done))} not finished after {timeout:.0f}s\n{self.logs()}")

    # -- teardown
    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            with _suppress():
                self._run("scancel", "--full", "--user", str(os.getuid()))
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self._run("squeue", "-h").stdout.strip():
                    time.sleep(0.5)
        sessions = {proc.pid for proc in self.procs.values()}
        for name in [*(f"slurmd-{node}" for node in self.nodes), "slurmctld", "munged"]:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        # job steps and tasks that outlived slurmd (slurmstepd and its children keep the session id)
        for pid in _pids_in_sessions(sessions):
            with _suppress():
                os.kill(pid, signal.SIGKILL)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)


def _pids_in_sessions(sessions: set[int]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in sessions:  # field 6 of /proc/PID/stat: session id
            found.append(int(entry.name))
    return found


if __name__ == "__main__":
    import sys

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    cluster = SlurmCluster(Path(sys.argv[1]), loopback_node_names())
    try:
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
