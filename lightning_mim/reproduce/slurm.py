"""The driver's SLURM jobs: submitted with `sbatch --parsable`, then followed with `scontrol show job` (or `sacct` once
the controller has forgotten the job) until they end, across requeues. A job counts as done only when it ended
COMPLETED with exit code 0 and left the file its stage promises; a cancelled or failed job, or one pending on
resources that its partition can never give, is reported on one line: job id, state, reason, log, what to do."""
from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_CPUS_PER_GPU = 10
# the pre-training template's time limit and time-limit signal (experiments/slurm_pretrain.sbatch), for every job
TIME_LIMIT = "72:00:00"
TIME_LIMIT_SIGNAL = "USR1@90"
POLL_SECONDS = 10.0
# Reasons of a pending job that waiting does not change: the request exceeds what the partition or account allows.
NEVER_STARTS = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
                "InvalidQOS", "QOSMaxCpuPerJobLimit", "QOSMaxGRESPerJob", "QOSMaxNodePerJobLimit",
                "AssocMaxCpuPerJobLimit", "AssocMaxGRESPerJob", "AssocMaxNodePerJobLimit", "ReqNodeNotAvail")
STILL_GOING = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
               "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD")


class SlurmJobError(RuntimeError):
    """A job that did not end as its stage needs; the message is the one line to show."""


def node_cpus_per_gpu() -> int | None:
    """CPUs per GPU of the cluster's GPU nodes as `sinfo` reports them (the smallest over the node types), None where
    sinfo is missing or reports no GPU."""
    try:
        listed = subprocess.run(["sinfo", "-h", "-o", "%c %G"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    ratios = []
    for line in listed.splitlines():
        cpus, _, gres = line.partition(" ")
        # gpu:8, gpu:a100:4, gpu:8(S:0-1): the count is the last field outside the socket list
        gpus = sum(int(match.group(1)) for item in re.sub(r"\([^)]*\)", "", gres).split(",")
                   if (match := re.fullmatch(r"gpu(?::[^:]+)?:(\d+)", item)))
        if cpus.rstrip("+").isdigit() and gpus:
            ratios.append(int(cpus.rstrip("+")) // gpus)
    return min(ratios) if ratios else None


def job_record(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict; where the controller no longer knows the job, `sacct`'s State, ExitCode
    and Reason; empty when neither can tell."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    if shown.returncode == 0 and shown.stdout.strip():
        return dict(word.split("=", 1) for word in shown.stdout.split() if "=" in word)
    try:
        accounted = subprocess.run(["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State,ExitCode,Reason"],
                                   capture_output=True, text=True, timeout=60)
    except OSError:
        return {}
    lines = accounted.stdout.strip().splitlines()
    if accounted.returncode or not lines:
        return {}
    state, exit_code, reason = (lines[-1].split("|") + ["", "", ""])[:3]
    return {"JobState": state.split()[0], "ExitCode": exit_code, "Reason": reason}


def submit(command: list[str]) -> str:
    """Run an `sbatch --parsable` command; the job id."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise SlurmJobError(f"sbatch failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def wait_for_job(job_id: str, log: str, expects: Path | None, say: Callable[[str], None] = print,
                 poll_seconds: float = POLL_SECONDS) -> None:
    """Follow job `job_id` until it ends; return when it COMPLETED with exit 0 and `expects` (if given) exists, else
    raise SlurmJobError. A job pending for a reason that waiting cannot change is cancelled and reported at the first
    poll that shows the reason."""
    seen = ("", "0")
    while True:
        record = job_record(job_id)
        state, reason = record.get("JobState", "UNKNOWN"), record.get("Reason", "None")
        restarts = record.get("Restarts", seen[1])
        if (state, restarts) != seen:
            say(f"    SLURM job {job_id}: {state}" + (f" (requeued, restart {restarts})" if restarts != "0" else ""))
            seen = (state, restarts)
        if state == "PENDING" and reason.split(",")[0] in NEVER_STARTS:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
            raise SlurmJobError(
                f"SLURM job {job_id} cannot start: Reason={reason} (the request exceeds what the partition allows); "
                f"cancelled it. Log: {log}. Ask for what a node has (CPUS_PER_GPU= / --cpus-per-gpu, GPUS=, "
                f"NODES=; see `sinfo -o '%P %c %G %l'`) and run the same command again")
        if state not in STILL_GOING:
            break
        time.sleep(poll_seconds)
    exit_code = record.get("ExitCode", "?")
    if state == "COMPLETED" and exit_code in ("0:0", "?") and (expects is None or expects.is_file()):
        return
    if state == "COMPLETED" and expects is not None and not expects.is_file():
        what = f"it left no {expects}; read its log"
    elif state == "UNKNOWN":
        what = "neither scontrol nor sacct knows it any more, and it left no " + (str(expects) if expects else "result")
    elif state == "CANCELLED":
        what = "it was cancelled (scancel, or by an administrator); run the same command again to resubmit it"
    elif state == "TIMEOUT":
        what = "it reached its time limit without a requeue; run the same command again to resume it"
    else:
        what = "read its log, fix the cause and run the same command again"
    raise SlurmJobError(f"SLURM job {job_id} ended {state} (Reason={reason}, exit code {exit_code}); log: {log}; "
                        f"{what}")
