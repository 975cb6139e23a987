"""A real one-node SLURM cluster in a temporary directory, for the SLURM tests.

Debian's `slurm-wlm` and `munge` daemons run as root: a private `munged` (own key, socket, pid and log
files), `slurmctld` and `slurmd` with their own `slurm.conf`, state, spool, pid and log files and free
ports, so nothing in /etc or /run is touched and a system cluster, if any, is not disturbed. Clients
reach this cluster through `SLURM_CONF` (see `env`). `stop()` ends the daemons by their pid files.

Settings that make a test cluster quick: `AuthInfo=cred_expire=...` (a requeued job waits that long
before it may start again; 120 s by default), a scheduler pass every second, 5 s between SIGTERM and
SIGKILL, and jobs kept 10 minutes after they end so `scontrol show job` still answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")


def unavailable_reason() -> str | None:
    """Why a cluster cannot start here (not root, a package missing), or None."""
    if os.geteuid() != 0:
        return "the SLURM daemons need root (run the tests as root, as CI does)"
    missing = [name for name in (*DAEMONS, "sbatch", "scontrol") if shutil.which(name, path=_sbin_path()) is None]
    if missing:
        return f"{', '.join(missing)} not installed: apt-get install slurm-wlm munge (`make install` does it as root)"
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSlurmCluster:
    """One controller and one node (this machine, all its CPUs) with a single default partition."""

    def __init__(self, root: Path, cred_expire_s: int = 5):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.cred_expire_s = cred_expire_s

    @property
    def env(self) -> dict:
        """The environment for client commands (sbatch, squeue, scontrol, scancel) of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": _sbin_path()}

    def _pid_file(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def _write_conf(self) -> None:
        for sub in ("munge", "run", "log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root / sub, 0o700)
        memory_mb = psutil.virtual_memory().total // 2**20 - 512
        self.conf.write_text(f"""\
ClusterName=mobatest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
MinJobAge=600
KillWait=5
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self._pid_file("slurmctld")}
SlurmdPidFile={self._pid_file("slurmd")}
SlurmctldLogFile={self.root / "log" / "slurmctld.log"}
SlurmdLogFile={self.root / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=main Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def start(self, timeout_s: float = 60) -> None:
        """Start munged, slurmctld and slurmd; return once the node accepts jobs (RuntimeError if not)."""
        self._write_conf()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        munge = self.root / "munge"
        self._run("munged", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                  f"--pid-file={self._pid_file('munged')}", f"--log-file={munge / 'munged.log'}",
                  f"--seed-file={munge / 'munged.seed'}")
        self._run("slurmctld", "-f", str(self.conf))
        self._run("slurmd", "-f", str(self.conf))
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env)
            state = result.stdout.strip()
            if result.returncode == 0 and state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster's node did not come up (state {state!r}); logs in {self.root / 'log'}")

    def _run(self, daemon: str, *args: str) -> None:
        result = subprocess.run([shutil.which(daemon, path=_sbin_path()), *args], capture_output=True, text=True,
                                env=self.env, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{daemon} did not start: {(result.stderr or result.stdout).strip()[-2000:]}")

    def stop(self, timeout_s: float = 30) -> None:
        """Cancel every job, then end the daemons (node, controller, munge) by their pid files."""
        if self._pid_file("slurmctld").is_file():
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=30)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and subprocess.run(
                    ["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True).stdout.strip():
                time.sleep(0.5)
        for daemon in reversed(DAEMONS):
            pid_file = self._pid_file(daemon)
            if not pid_file.is_file():
                continue
            try:
                process = psutil.Process(int(pid_file.read_text().split()[0]))
                if process.name() != daemon:  # a stale pid file: the number belongs to someone else now
                    continue
                process.send_signal(signal.SIGTERM)
                process.wait(timeout_s)
            except (psutil.NoSuchProcess, ValueError):
                pass
            except psutil.TimeoutExpired:
                process.kill()

    def log(self, daemon: str) -> str:
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""
