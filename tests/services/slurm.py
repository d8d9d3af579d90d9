"""A single-node Slurm cluster on loopback: munged, slurmctld and slurmd in a temp dir.

Everything lives under `root` (config, state, spool, munge socket and key), so the
machine's own /etc is untouched; clients find it through SLURM_CONF.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import free_port, missing, start, stop, wait_until

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
PARTITION = "debug"


@dataclass
class Slurm:
    root: Path
    env: dict          # what a client needs: SLURM_CONF
    procs: list = field(default_factory=list)

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop(p)


def _config(root: Path, cpus: int) -> str:
    return f"""\
ClusterName=reusetest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def start_slurm(root: Path, cpus: int = 4, timeout: float = 60) -> Slurm:
    """Start munged, slurmctld and slurmd; return once the node is idle."""
    if missing(*BINARIES):
        raise FileNotFoundError(f"missing {', '.join(missing(*BINARIES))}: install slurm-wlm and munge "
                                "(bash .ci/services.sh)")
    root.mkdir(parents=True, exist_ok=True)
    for d in ("state", "spool"):
        (root / d).mkdir(exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, cpus))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Slurm(root=root, env={"SLURM_CONF": str(conf)})
    try:
        cluster.procs.append(start(
            ["munged", "--foreground", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
             f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed"],
            root / "munged.out", env=env))
        wait_until(lambda: (root / "munge.socket").exists(), 15, "munged", root / "munged.log")
        cluster.procs.append(start(["slurmctld", "-D", "-i", "-f", str(conf)], root / "slurmctld.out", env=env))
        cluster.procs.append(start(["slurmd", "-D", "-N", "localhost", "-f", str(conf)], root / "slurmd.out",
                                   env=env))

        def node_idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True,
                                 timeout=10)
            return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

        wait_until(node_idle, timeout, "slurm node", root / "slurmctld.log")
    except BaseException:
        cluster.stop()
        raise
    return cluster
