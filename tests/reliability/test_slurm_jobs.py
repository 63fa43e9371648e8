"""The reproduce driver's SLURM jobs, with stand-in `sbatch`, `scontrol`, `sacct`, `scancel` and `sinfo`: a stage is
done only when its job COMPLETED with exit 0 and left its checkpoint; a cancelled, failed or never-starting job is
reported on one line (job id, state, reason, log, what to do) and recorded failed; waiting continues across a
requeue; CPUS_PER_GPU (default: sinfo's CPUs per GPU) sets --cpus-per-task of every job."""
import json
import os
import shlex
from pathlib import Path

import pytest

from lightning_mim.reproduce import slurm
from lightning_mim.reproduce.driver import plan_paper, run_plan
from lightning_mim.reproduce.papers import PAPERS
from lightning_mim.reproduce.presets import ReproduceError, Setup


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """Stand-in SLURM commands: `scontrol show job` prints the next line of `states` (the last one stays), the
    others print what `replies` holds for them; every call is appended to `calls`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    folder = tmp_path / "cluster"
    folder.mkdir()
    for tool in ("sbatch", "scontrol", "sacct", "scancel", "sinfo"):
        script = bin_dir / tool
        script.write_text(f"""#!/bin/bash
echo "{tool} $*" >> {folder}/calls
if [[ {tool} == scontrol ]]; then
    [[ -s {folder}/states ]] || exit 1
    head -n 1 {folder}/states
    [[ $(wc -l < {folder}/states) -gt 1 ]] && sed -i 1d {folder}/states
    exit 0
fi
cat {folder}/{tool} 2>/dev/null
""")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(slurm.wait_for_job, "__defaults__", (print, 0.01))
    return folder


def job(state: str, reason: str = "None", exit_code: str = "0:0", restarts: int = 0) -> str:
    return f"JobId=77 JobName=x JobState={state} Reason={reason} Dependency=(null) Restarts={restarts} " \
           f"ExitCode={exit_code}"


def lut_plan(tmp_path, **setup):
    data = tmp_path / "imagenet"
    (data / "train").mkdir(parents=True)
    return plan_paper(PAPERS["lut"], Setup("paper", str(data), gpus=1, slurm=True, **setup), tmp_path / "out",
                      [PAPERS["lut"].rows[0].key])


def test_cancelled_pretraining_is_reported_and_not_recorded_done(cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (cluster / "sbatch").write_text("77\n")
    (cluster / "states").write_text(job("PENDING", "Priority") + "\n" + job("CANCELLED", exit_code="0:15") + "\n")
    plan = lut_plan(tmp_path)
    with pytest.raises(ReproduceError) as error:
        run_plan(plan, dry_run=False)
    message = str(error.value)
    print(message)
    assert "\n" not in message
    for needle in ("SLURM job 77 ended CANCELLED", "Reason=None", "exit code 0:15", "pretrain.log",
                   "run the same command again"):
        assert needle in message, needle
    assert "SLURM job 77 ended CANCELLED" in capsys.readouterr().err
    state = json.loads((plan.store / "state.json").read_text())
    assert [record["status"] for record in state[plan.runs[0].pretrain.key].values()] == ["failed"]
    calls = (cluster / "calls").read_text().splitlines()
    submitted = shlex.split(calls[0])
    assert submitted[:2] == ["sbatch", "--parsable"]
    assert submitted[submitted.index("--cpus-per-task") + 1] == "10"  # sinfo tells nothing here: the default


def test_completed_job_without_its_checkpoint_is_not_done(cluster, tmp_path):
    (cluster / "states").write_text(job("COMPLETED") + "\n")
    with pytest.raises(slurm.SlurmJobError, match="ended COMPLETED .* it left no .*last.ckpt"):
        slurm.wait_for_job("77", "x.log", tmp_path / "last.ckpt")
    (tmp_path / "last.ckpt").write_bytes(b"")
    slurm.wait_for_job("77", "x.log", tmp_path / "last.ckpt")


def test_job_that_can_never_start_is_cancelled_and_reported_with_its_reason(cluster):
    (cluster / "states").write_text(job("PENDING", "PartitionConfig") + "\n")
    with pytest.raises(slurm.SlurmJobError) as error:
        slurm.wait_for_job("77", "x.log", None)
    assert "Reason=PartitionConfig" in str(error.value) and "CPUS_PER_GPU" in str(error.value)
    assert "scancel 77" in (cluster / "calls").read_text()


def test_waiting_continues_across_a_requeue(cluster, tmp_path, capsys):
    (tmp_path / "last.ckpt").write_bytes(b"")
    (cluster / "states").write_text("\n".join([
        job("RUNNING"), job("PENDING", "BeginTime", restarts=1), job("RUNNING", restarts=1),
        job("COMPLETED", restarts=1)]) + "\n")
    slurm.wait_for_job("77", "x.log", tmp_path / "last.ckpt")
    assert "SLURM job 77: PENDING (requeued, restart 1)" in capsys.readouterr().out


def test_a_job_the_controller_forgot_is_read_from_sacct(cluster):
    (cluster / "sacct").write_text("FAILED|1:0|NonZeroExitCode\n")
    with pytest.raises(slurm.SlurmJobError, match=r"SLURM job 77 ended FAILED \(Reason=NonZeroExitCode, exit code "
                                                  r"1:0\); log: x.log; read its log"):
        slurm.wait_for_job("77", "x.log", None)


def test_cpus_per_gpu_comes_from_sinfo_and_reaches_every_job(cluster, tmp_path, monkeypatch):
    (cluster / "sinfo").write_text("64 gpu:8(S:0-1)\n48 gpu:a100:4\n16 (null)\n")
    assert slurm.node_cpus_per_gpu() == 8
    monkeypatch.chdir(tmp_path)
    plan = lut_plan(tmp_path, cpus_per_gpu=6)
    for stage in plan.runs[0].stages:
        words = stage.command
        assert words[words.index("--cpus-per-task") + 1] == "6", stage.key
    evaluation = plan.runs[0].stages[-1].command
    for option, value in (("--open-mode", "append"), ("--signal", slurm.TIME_LIMIT_SIGNAL), ("--time",
                                                                                            slurm.TIME_LIMIT)):
        assert evaluation[evaluation.index(option) + 1] == value
    assert "--requeue" in evaluation and evaluation[-1].startswith("srun --cpus-per-task 6 ")
    template = Path(slurm.__file__).parents[2] / "experiments/slurm_pretrain.sbatch"
    assert f"#SBATCH --time={slurm.TIME_LIMIT}\n" in template.read_text()
    assert f"#SBATCH --signal=SIG{slurm.TIME_LIMIT_SIGNAL}\n" in template.read_text()
