"""A real single-machine Slurm (munge, MariaDB, slurmdbd, slurmctld, slurmd) for tests, on loopback in a temp dir.

``SlurmCluster.start()`` installs the Debian packages with apt-get when they are missing (only as root),
writes ``slurm.conf``/``slurmdbd.conf`` with free loopback ports, starts every daemon in the foreground
as a child process and waits until ``sinfo`` shows the node idle; ``stop()`` ends exactly those PIDs.
Clients (``sbatch``, ``sacct``, submitit) find the cluster through ``SLURM_CONF``, which
``environment()`` provides. The pytest fixture ``slurm_cluster`` (session-scoped, in ``conftest.py``)
skips with the reason when the cluster cannot be started.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from training.ports import free_port

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server")
BINARIES = ("munged", "slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "mariadbd", "mariadb-install-db")
CLUSTER_NAME = "sigattn"
PARTITION = "debug"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be started on this machine (the message says why)."""


def ensure_packages() -> None:
    """Install the Slurm/munge/MariaDB Debian packages if a binary is missing (root only, else ``SlurmUnavailable``)."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm binaries {missing} missing and not root: cannot apt-get install {PACKAGES}")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm binaries {missing} missing and no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")


class SlurmCluster:
    """One-node Slurm with accounting; ``root`` holds every config, state, log and socket."""

    def __init__(self, root: str | os.PathLike | None = None, cpus: int = 2, real_memory_mb: int = 4000):
        self.root = Path(root or tempfile.mkdtemp(prefix="sigattn-slurm-"))
        self.cpus = cpus
        self.real_memory_mb = real_memory_mb
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logs = self.root / "log"

    # -- public ----------------------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 120.0) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("a test Slurm needs root (slurmd runs jobs as root here)")
        ensure_packages()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.logs.mkdir(exist_ok=True)
        try:
            self._start_munge()
            self._start_mariadb(timeout)
            self._start_slurmdbd(timeout)
            self._start_slurmctld(timeout)
            self._start_slurmd(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel leftover jobs (their slurmstepd would outlive slurmd), then SIGTERM each daemon this object
        started (reverse order), SIGKILL what is still alive after 15 s."""
        if "slurmd" in self.procs and self.procs["slurmd"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        env = dict(os.environ, **self.environment())
        r = subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def release_requeued(self, job_id: str, timeout: float = 120) -> None:
        """Wait until ``job_id`` is pending again after a requeue, then shorten the ~120 s begin-time hold
        Slurm puts on requeued jobs to a few seconds so tests do not sit idle.

        Not ``StartTime=now``: slurmd revokes the killed run's credential with one-second resolution, and a
        relaunch within that same second is refused ("Job credential revoked") and fails the job."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("squeue", "-h", "-j", job_id, "-o", "%T|%r", check=False).stdout.strip()
            if out.startswith("PENDING"):
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3")
                return
            if not out:
                raise RuntimeError(f"job {job_id} left the queue instead of being requeued")
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} was not requeued within {timeout} s")

    def log_tail(self, name: str, n: int = 40) -> str:
        p = self.logs / f"{name}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else "(no log)"

    # -- daemons ---------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> subprocess.Popen:
        out = open(self.logs / f"{name}.out", "ab")
        kwargs = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kwargs = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        env = dict(os.environ, **self.environment())
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, **kwargs)
        self.procs[name] = proc
        return proc

    def _wait(self, name: str, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise SlurmUnavailable(f"{name} exited ({self.procs[name].returncode}) before {what}:\n"
                                       f"{(self.logs / f'{name}.out').read_text(errors='replace')[-2000:]}\n"
                                       f"{self.log_tail(name)}")
            if ok():
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"{name} not ready after {timeout:.0f} s ({what}):\n{self.log_tail(name)}")

    def _start_munge(self) -> None:
        d = self.munge_socket.parent
        d.mkdir(exist_ok=True)
        pw = pwd.getpwnam("munge")
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (d, key):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        d.chmod(0o755)
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}",
                               f"--log-file={self.logs / 'munged.log'}"], user="munge")
        self._wait("munged", self.munge_socket.exists, 30, "socket")

    def _start_mariadb(self, timeout: float) -> None:
        data = self.root / "mysql"
        self.db_port = free_port()
        self.db_socket = self.root / "mysql.sock"
        r = subprocess.run(["mariadb-install-db", f"--datadir={data}", "--user=root", "--auth-root-authentication-method=normal",
                            "--skip-test-db"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmUnavailable(f"mariadb-install-db failed: {r.stderr[-2000:]}")
        self._spawn("mariadb", ["mariadbd", "--no-defaults", f"--datadir={data}", "--user=root", f"--port={self.db_port}",
                                "--bind-address=127.0.0.1", f"--socket={self.db_socket}", "--skip-grant-tables",
                                f"--pid-file={self.root / 'mysql.pid'}", f"--log-error={self.logs / 'mariadb.log'}",
                                "--innodb-buffer-pool-size=32M"])
        self._wait("mariadb", lambda: _port_open(self.db_port), timeout, "listening")

    def _start_slurmdbd(self, timeout: float) -> None:
        self.dbd_port = free_port()
        conf = self.root / "slurmdbd.conf"
        conf.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}",
            "DbdHost=localhost", "DbdAddr=127.0.0.1", f"DbdPort={self.dbd_port}", "SlurmUser=root",
            f"PidFile={self.root / 'slurmdbd.pid'}", f"LogFile={self.logs / 'slurmdbd.log'}", "DebugLevel=info",
            "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1", f"StoragePort={self.db_port}",
            "StorageUser=root", "StorageLoc=slurm_acct_db", ""]))
        conf.chmod(0o600)
        self._write_slurm_conf()
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait("slurmdbd", lambda: _port_open(self.dbd_port), timeout, "listening")

    def _write_slurm_conf(self) -> None:
        self.ctld_port = free_port()
        self.slurmd_port = free_port(exclude=(self.ctld_port,))
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(exist_ok=True)
        self.conf.write_text("\n".join([
            f"ClusterName={CLUSTER_NAME}", "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}", f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={self.root / 'state'}", f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}", f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}", f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2",
            # job ids (and so submitit's MASTER_PORT, derived from them) differ between test clusters
            f"FirstJobId={random.randint(1000, 10**6)}",
            "ReturnToService=2", "JobRequeue=1", "KillWait=5", "MinJobAge=600", "InactiveLimit=0",
            "SlurmdParameters=config_overrides",
            "AccountingStorageType=accounting_storage/slurmdbd", "AccountingStorageHost=localhost",
            f"AccountingStoragePort={self.dbd_port}",
            f"AccountingStoragePass={self.munge_socket}",  # the munge socket for slurmctld -> slurmdbd "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""]))

    def _start_slurmctld(self, timeout: float) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0,
                   timeout, "scontrol ping")

    def _start_slurmd(self, timeout: float) -> None:
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost"])

        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip()
            return out in ("idle", "mixed", "allocated")
        self._wait("slurmd", idle, timeout, "node idle")
        # accounting must know the cluster, or sacct shows nothing
        self._wait("slurmdbd", lambda: CLUSTER_NAME in self.run("sacctmgr", "-n", "-P", "list", "cluster",
                                                                   "format=cluster", check=False).stdout,
                   timeout, "cluster registered")


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":  # manual check: start, show sinfo, run one job, stop
    c = SlurmCluster().start()
    try:
        print(c.run("sinfo").stdout)
        print(c.run("sbatch", "--wrap", "hostname", "-o", str(c.root / "job.out")).stdout)
        time.sleep(5)
        print(c.run("sacct", "-X", "-o", "JobID,State").stdout)
    finally:
        c.stop()
        print("stopped; files in", c.root)


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def job_state(job) -> str:
    """A submitit job's state as ``launch status`` reads it (live ``squeue`` while queued or running, then ``sacct``)."""
    from launch.job_folder import slurm_states

    return slurm_states([job.job_id]).get(job.job_id, ("UNKNOWN", 0))[0]


def wait_final(job, timeout: float):
    """Until the job shows a final state (submitit's ``done()`` is true as soon as a result pickle exists)."""
    deadline = time.monotonic() + timeout
    while job_state(job) not in FINAL:
        assert time.monotonic() < deadline, f"job {job.job_id} still {job_state(job)} after {timeout} s"
        time.sleep(1)
    return job
