"""A real single-node SLURM (Debian's slurm-wlm 22.05 packages) in a temporary folder, for the tests.

Starts, as the current (root) user and without systemd: ``munged`` (own key and socket), ``mariadbd``
(own data dir, TCP on 127.0.0.1, ``--skip-grant-tables``), ``slurmdbd`` (submitit polls ``sacct``),
``slurmctld`` and ``slurmd`` (one node named after this host, 8 CPUs declared whatever the machine
has, ``SlurmdParameters=config_overrides``), each on a free port; waits until the node is idle;
:meth:`LocalSlurm.stop` ends exactly the processes it started (by PID). Client commands find the
cluster through ``SLURM_CONF`` (:attr:`LocalSlurm.env`), so nothing under ``/etc`` is touched.

No cgroups (``proctrack/linuxproc``, ``task/none``, ``jobacct_gather/none``): containers rarely
delegate a cgroup tree, and nothing here needs CPU or memory confinement.

Manual use (the same cluster for trying commands by hand)::

    python tests/slurm_cluster.py /tmp/slurm      # prints `export SLURM_CONF=...`; Ctrl-C or kill stops it

The Debian packages: ``bash scripts/ci/install_slurm.sh`` (what ``.ci/run`` calls).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct",
            "sacctmgr", "scontrol", "squeue", "scancel", "sinfo", "mungekey")
SBIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin")
CPUS = 8


def which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return None


def unavailable_reason() -> str | None:
    """Why a local SLURM cannot start here (None when it can)."""
    missing = [b for b in BINARIES if which(b) is None]
    if missing:
        return (f"SLURM test cluster needs the Debian packages slurmctld slurmd slurm-client munge slurmdbd "
                f"mariadb-server (missing {', '.join(missing)}); install them with scripts/ci/install_slurm.sh")
    if os.geteuid() != 0:
        return "SLURM test cluster needs root (slurmd runs jobs and must run as root)"
    if sys.platform != "linux":
        return "SLURM test cluster needs Linux"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


class LocalSlurm:
    """One throwaway SLURM cluster under ``root`` (a folder it owns); use as a context manager."""

    def __init__(self, root: str | Path, cpus: int = CPUS, timeout: float = 120.0) -> None:
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.timeout = timeout
        self.node = socket.gethostname().split(".")[0]
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.cluster = "cttest"
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ config files
    def _write_configs(self) -> None:
        r = self.root
        for d in ("munge", "db", "state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o711)
        self.munge_socket = r / "munge" / "munge.socket"
        self.db_port, self.dbd_port = _free_port(), _free_port()
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        (r / "slurmdbd.conf").write_text(
            auth + f"DbdHost=localhost\nDbdPort={self.dbd_port}\nSlurmUser=root\n"
            f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={self.db_port}\n"
            f"StorageUser=root\nStorageLoc=slurm_acct_db\nPidFile={r}/run/slurmdbd.pid\n"
            f"LogFile={r}/log/slurmdbd.log\nDebugLevel=info\n")
        os.chmod(r / "slurmdbd.conf", 0o600)
        (r / "cgroup.conf").write_text("# no cgroup plugin is configured in slurm.conf (see tests/slurm_cluster.py)\n"
                                      "IgnoreSystemd=yes\n")
        # cred_expire: a requeued job waits this long before it may start again (SLURM's default: 120 s);
        # sched_interval: the main scheduling loop every 2 s instead of 60 s (jobs start sooner);
        # OverTimeLimit=1: a job is killed 1 minute after its time limit (the limit itself and the
        # --signal timing stay as they are), so that the time-limit tests do not depend on how fast a
        # loaded 2-core machine starts two DDP ranks (about 50 s here)
        (r / "slurm.conf").write_text(
            f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket},cred_expire=10\n"
            "SchedulerParameters=sched_interval=2\n"
            f"ClusterName={self.cluster}\nSlurmctldHost={self.node}(127.0.0.1)\nSlurmUser=root\n"
            f"SlurmctldPort={self.ctld_port}\nSlurmdPort={self.slurmd_port}\n"
            f"StateSaveLocation={r}/state\nSlurmdSpoolDir={r}/spool\n"
            f"SlurmctldPidFile={r}/run/slurmctld.pid\nSlurmdPidFile={r}/run/slurmd.pid\n"
            f"SlurmctldLogFile={r}/log/slurmctld.log\nSlurmdLogFile={r}/log/slurmd.log\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
            f"AccountingStoragePort={self.dbd_port}\nAccountingStoragePass={self.munge_socket}\nJobCompType=jobcomp/none\n"
            "SchedulerType=sched/backfill\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
            "SlurmdParameters=config_overrides\nReturnToService=2\nMpiDefault=none\n"
            "KillWait=10\nOverTimeLimit=1\nMinJobAge=600\nInactiveLimit=0\nWaittime=0\nSlurmctldDebug=info\nSlurmdDebug=info\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_mem_mb()} State=UNKNOWN\n"
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n")
        self.env = {"SLURM_CONF": str(r / "slurm.conf")}

    # ------------------------------------------------------------------ processes
    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self.client_env(), start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN_DIRS])
        return env

    def _wait(self, what: str, ok, timeout: float | None = None) -> None:
        deadline = time.time() + (timeout or self.timeout)
        while time.time() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                       + self.logs())
            if ok():
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM test cluster: timed out waiting for {what}:\n" + self.logs())

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=self.client_env(), capture_output=True, text=True, check=check,
                              timeout=timeout)

    def logs(self, tail: int = 3000) -> str:
        out = []
        for p in sorted((self.root / "log").glob("*")):
            text = p.read_text(errors="replace")
            out.append(f"--- {p.name}\n{text[-tail:]}")
        return "\n".join(out)

    def start(self) -> "LocalSlurm":
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self._write_configs()
        r = self.root
        try:
            key = r / "munge" / "munge.key"
            subprocess.run([which("mungekey"), "-c", "-f", "-k", str(key)], check=True, capture_output=True)
            os.chmod(key, 0o400)
            self._start("munged", [which("munged"), "-F", "-f", f"--key-file={key}", f"--socket={self.munge_socket}",
                                   f"--pid-file={r}/run/munged.pid", f"--log-file={r}/log/munged.log",
                                   f"--seed-file={r}/munge/munged.seed"])
            subprocess.run([which("mariadb-install-db"), "--no-defaults", f"--datadir={r}/db", "--user=root",
                            "--auth-root-authentication-method=normal", "--skip-test-db"],
                           check=True, capture_output=True, timeout=120)
            self._start("mariadbd", [which("mariadbd"), "--no-defaults", f"--datadir={r}/db", "--user=root",
                                     f"--socket={r}/run/mysqld.sock", f"--port={self.db_port}",
                                     "--bind-address=127.0.0.1", "--skip-grant-tables", "--skip-name-resolve",
                                     f"--pid-file={r}/run/mariadbd.pid", f"--log-error={r}/log/mariadbd.log",
                                     "--innodb-buffer-pool-size=32M"])
            self._wait("munged", self.munge_socket.exists)
            self._wait("mariadbd", lambda: _port_open(self.db_port))
            self._start("slurmdbd", [which("slurmdbd"), "-D"])  # reads slurmdbd.conf next to $SLURM_CONF
            self._wait("slurmdbd", lambda: _port_open(self.dbd_port))
            self._wait("the cluster registration", lambda: self.run(
                which("sacctmgr"), "-i", "add", "cluster", self.cluster, check=False).returncode == 0
                or self.cluster in self.run(which("sacctmgr"), "-n", "-P", "list", "cluster", "format=cluster",
                                            check=False).stdout)
            self._start("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(r / "slurm.conf")])
            self._wait("slurmctld", lambda: self.run(which("scontrol"), "ping", check=False).returncode == 0)
            self._start("slurmd", [which("slurmd"), "-D", "-f", str(r / "slurm.conf"), "-N", self.node])
            self._wait("the node to be idle", lambda: "idle" in self.run(
                which("sinfo"), "-h", "-N", "-o", "%T", check=False).stdout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job (job steps outlive slurmd), then SIGTERM each started daemon (newest first),
        SIGKILL what is still alive after 15 s."""
        if any(name == "slurmctld" and proc.poll() is None for name, proc in self.procs):
            try:
                ids = self.run(which("squeue"), "-h", "-o", "%A", check=False, timeout=20).stdout.split()
                if ids:
                    self.run(which("scancel"), *ids, check=False, timeout=20)
                    deadline = time.time() + 30
                    while time.time() < deadline and self.run(which("squeue"), "-h", "-o", "%A", check=False,
                                                              timeout=20).stdout.strip():
                        time.sleep(1)
            except (subprocess.SubprocessError, OSError):
                pass
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/ct-slurm")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops the cluster too
    signal.signal(signal.SIGINT, signal.default_int_handler)   # (also when started in the background)
    with LocalSlurm(root) as cluster:
        print(f"export SLURM_CONF={cluster.env['SLURM_CONF']}   # Ctrl-C stops the cluster", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
