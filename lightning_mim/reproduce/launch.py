"""The launchers of the paper preset's stages: torchrun on this node, an sbatch job of the pre-training template, and
any evaluation wrapped in a one-node SLURM job with the same time limit, signal and requeue."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

from lightning_mim.reproduce.presets import Setup, config, shown
from lightning_mim.reproduce.slurm import TIME_LIMIT, TIME_LIMIT_SIGNAL


def torchrun_command(setup: Setup, fit_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """experiments/torchrun_pretrain.sh on this node (NODE_RANK, default 0); with NODES > 1 the other nodes run
    the same command with their NODE_RANK and node 0's MASTER_ADDR."""
    env = {"NNODES": str(setup.nodes), "GPUS_PER_NODE": str(setup.gpus),
           "NODE_RANK": os.environ.get("NODE_RANK", "0")}
    if setup.nodes > 1:
        env["MASTER_ADDR"] = os.environ.get("MASTER_ADDR", "<node 0 address>")
    return [config("experiments/torchrun_pretrain.sh"), *fit_args], env


def sbatch_command(setup: Setup, fit_args: list[str], log: Path, job_name: str) -> list[str]:
    """experiments/slurm_pretrain.sbatch submitted for GPUS x NODES tasks with CPUS_PER_GPU CPUs each; `--parsable`
    prints the job id, which the driver follows until the job ends (`reproduce.slurm.wait_for_job`)."""
    return ["sbatch", "--parsable", "--nodes", str(setup.nodes), "--ntasks-per-node", str(setup.gpus),
            "--gpus-per-node", str(setup.gpus), "--cpus-per-task", str(setup.cpus_per_gpu), "--job-name", job_name,
            "--output", shown(log), config("experiments/slurm_pretrain.sbatch"), *fit_args]


def sbatch_wrap(command: list[str], tasks: int, log: Path, job_name: str, cpus_per_task: int) -> list[str]:
    """An evaluation submitted as a one-node SLURM job of `tasks` GPU tasks with the pre-training template's log
    mode, time limit, time-limit signal and requeue; `--parsable` prints the job id the driver follows."""
    return ["sbatch", "--parsable", "--nodes", "1", "--ntasks-per-node", str(tasks), "--gpus-per-node", str(tasks),
            "--cpus-per-task", str(cpus_per_task), "--time", TIME_LIMIT, "--signal", TIME_LIMIT_SIGNAL,
            "--requeue", "--open-mode", "append", "--job-name", job_name, "--output", shown(log),
            "--wrap", f"srun --cpus-per-task {cpus_per_task} {shlex.join(command)}"]


__all__ = ["sbatch_command", "sbatch_wrap", "torchrun_command"]
