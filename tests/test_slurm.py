"""Cluster execution: the SLURM profiles, and jobs submitted to a real SLURM controller.

The tests marked ``slurm`` need a controller that answers ``sinfo`` (CI starts one with
``.ci/slurm/start.sh``) and skip cleanly without one. The others only read the profiles or dry-run
Snakemake, which needs no controller.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import yte

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

GPU_RULES = {
    "pretrain",
    "train_central",
    "train_baseline",
    "train_site_alone",
    "train_site_round",
    "run_round_block",
    "adapt_model",
    "predict_site",
}

# Smallest target of config/ci.yaml on the CI cluster; every SLURM job costs seconds of polling.
CI_SLURM_TARGET = "results/evaluation/adapted/decoder/site5/metrics.csv"
# Upper bound of one snakemake run on the CI cluster; SIGINT, because the executor ignores SIGTERM.
SLURM_RUN_TIMEOUT_S = 900


def load_profile(name: str) -> dict:
    """Return the profile ``profiles/<name>/config.yaml`` after yte templating, as Snakemake reads it."""
    with open(REPO / "profiles" / name / "config.yaml") as stream:
        return yte.process_yaml(stream, require_use_yte=True)


def slurm_answers() -> str | None:
    """Return why a SLURM controller cannot be used here, or None when ``sinfo`` shows a usable node."""
    if shutil.which("sinfo") is None:
        return "sinfo not installed"
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if result.returncode != 0:
        return f"sinfo failed: {result.stderr.strip()[:200]}"
    if not re.search(r"^(idle|mixed|allocated)", result.stdout, re.MULTILINE):
        return f"no usable node: {result.stdout.strip()[:200]!r}"
    return None


needs_slurm = pytest.mark.slurm


@pytest.fixture
def slurm_cluster() -> None:
    """Skip the test unless a SLURM controller answers."""
    reason = slurm_answers()
    if reason is not None:
        pytest.skip(f"no SLURM controller: {reason}")


def sbatch_recorder(bin_dir: Path, record: Path) -> dict[str, str]:
    """Put an ``sbatch`` first on PATH that runs the real one and logs ``<job id> <arguments>`` per call.

    The plugin submits with ``--parsable``, so the real sbatch prints the job id (``id`` or ``id;cluster``).
    Returns the environment for the snakemake subprocess.
    """
    real = shutil.which("sbatch")
    assert real is not None
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "sbatch"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'out=$("{real}" "$@")\n'
        "rc=$?\n"
        f'printf "%s %s\\n" "${{out%%;*}}" "$*" >> "{record}"\n'
        'printf "%s\\n" "$out"\n'
        "exit $rc\n"
    )
    wrapper.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    # A GPU visible to the submitting shell would leak into CPU jobs through --export=ALL.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def recorded_calls(record: Path) -> dict[str, str]:
    """Map SLURM job id -> the sbatch argument line that submitted it, from the wrapper's record."""
    calls: dict[str, str] = {}
    for line in record.read_text().splitlines():
        job_id, _, arguments = line.partition(" ")
        assert job_id.isdigit(), f"sbatch call that returned no job id: {line[:200]}"
        calls[job_id] = arguments
    return calls


def submissions(record: Path) -> dict[str, list[str]]:
    """Map rule name -> the sbatch argument lines recorded for it (the plugin comments ``rule_<name>``)."""
    calls: dict[str, list[str]] = {}
    for line in recorded_calls(record).values():
        match = re.search(r"--comment '?rule_([A-Za-z0-9_]+?)(?:_wildcards_\S*)?'?\s", line)
        assert match, f"sbatch call without the plugin's rule comment: {line[:200]}"
        calls.setdefault(match.group(1), []).append(line)
    return calls


def rules_run_per_slurm_job(workdir: Path) -> dict[str, list[str]]:
    """Map SLURM job id -> the rule of every Snakemake job it ran, from the plugin's per-job logs.

    The plugin writes each SLURM job's output to ``.snakemake/slurm_logs/{rule_R|group_G}/.../<job id>.log``
    (kept by ``slurm-keep-successful-logs``); inside it, Snakemake announces each job it runs as
    ``localrule NAME:``. A group job lists several.
    """
    ran: dict[str, list[str]] = {}
    for log in (workdir / ".snakemake" / "slurm_logs").rglob("*.log"):
        if log.stem.isdigit():
            ran[log.stem] = re.findall(r"^localrule (\w+):", log.read_text(), flags=re.MULTILINE)
    return ran


def gpu_request(sbatch_line: str) -> str | None:
    """Return the GPU request (``--gpus=...`` or ``--gres=gpu...``) of one sbatch call, if any."""
    match = re.search(r"--gpus[= ](\S+)|--gres[= ](gpu\S*)", sbatch_line.split(" --wrap", 1)[0])
    return None if match is None else match.group(0)


def job_stats(output: str) -> dict[str, int]:
    """Parse the ``Job stats`` table Snakemake prints for a (dry) run into rule -> count."""
    stats: dict[str, int] = {}
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats:"))
    for line in lines[start + 3 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        stats[parts[0]] = int(parts[1])
    return stats


# ----- profiles: no controller needed -------------------------------------------------------------------


def test_profile_name_slurm_resolves_to_profiles_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: `snakemake --profile slurm` looks for ./slurm in the working directory.
    from snakemake.cli import get_profile_dir

    monkeypatch.chdir(REPO)
    # Execute
    found = get_profile_dir("slurm")
    # Assert
    assert found is not None, "no ./slurm profile at the repository root"
    assert Path(found[1]).resolve() == (REPO / "profiles" / "slurm" / "config.yaml").resolve()


@pytest.mark.parametrize("name", ["slurm", "slurm-ci"])
def test_cluster_profiles_give_every_gpu_rule_matching_cores_and_threads(name: str) -> None:
    # Prepare
    profile = load_profile(name)
    set_resources, set_threads = profile["set-resources"], profile["set-threads"]
    # Execute
    gpu_in_profile = {rule for rule, res in set_resources.items() if "cpus_per_gpu" in res}
    # Assert: each GPU rule gets cores per GPU, and Snakemake's threads equal the cores SLURM grants.
    assert profile["executor"] == "slurm"
    assert gpu_in_profile == GPU_RULES
    for rule in GPU_RULES:
        res = set_resources[rule]
        assert set_threads[rule] == res["cpus_per_gpu"] * res.get("gpu", 1), rule
        assert {"slurm_partition", "mem_mb", "runtime"} <= set(res), rule
    for rule in set(set_resources) - GPU_RULES:
        assert not {"gpu", "gpu_model", "gres", "cpus_per_gpu"} & set(set_resources[rule]), rule
    # cpus_per_task in the defaults would win over cpus_per_gpu in the plugin and decouple threads.
    assert "cpus_per_task" not in profile["default-resources"]
    assert "slurm_partition" in profile["default-resources"]


def test_local_profile_lets_one_gpu_job_run_at_a_time() -> None:
    # Prepare / Execute
    with open(REPO / "profiles" / "local" / "config.yaml") as stream:
        profile = yaml.safe_load(stream)
    # Assert
    assert profile["resources"] == {"gpu": 1}
    assert profile.get("executor", "local") == "local"


def test_every_rule_that_asks_for_a_gpu_is_in_the_cluster_profile() -> None:
    # Prepare: rule blocks of the workflow, split at each `rule NAME:` line.
    rules_dir = REPO / "workflow" / "rules"
    if not any(rules_dir.glob("*.smk")):
        pytest.skip("workflow/rules/*.smk not written yet")
    text = "\n".join(p.read_text() for p in sorted(rules_dir.glob("*.smk")))
    blocks = re.split(r"^\s*rule (\w+):", text, flags=re.MULTILINE)
    # Execute
    asking = {
        name for name, body in zip(blocks[1::2], blocks[2::2], strict=True) if re.search(r"\bgpu\s*=", body)
    }
    # Assert
    assert asking == GPU_RULES, f"GPU rules in workflow {sorted(asking)} != profile {sorted(GPU_RULES)}"


@pytest.mark.slow  # builds the full paper DAG: about 80 s on 2 busy cores
def test_paper_dry_run_on_the_slurm_profile_submits_one_job_per_block_of_rounds() -> None:
    # Prepare
    paper = REPO / "config" / "paper.yaml"
    if not (REPO / "Snakefile").exists() or not paper.exists():
        pytest.skip("Snakefile or config/paper.yaml not written yet")
    config = yaml.safe_load(paper.read_text())
    rounds_per_job = int(config["federated"]["rounds_per_job"])
    settings = config["federated"]["settings"]
    # Execute: a dry run builds the whole DAG with the cluster profile but submits nothing.
    result = subprocess.run(
        [SNAKEMAKE, "--profile", "slurm", "-n", "all", "--configfile", str(paper), "--quiet", "rules"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # Assert
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stats = job_stats(result.stdout + result.stderr)
    assert rounds_per_job > 1, "the paper config should run blocks of rounds per cluster job"
    blocks = sum(math.ceil(int(s["rounds"]) / rounds_per_job) for s in settings.values())
    assert stats.get("run_round_block") == blocks
    assert "train_site_round" not in stats and "aggregate_round" not in stats
    assert stats["total"] == sum(v for k, v in stats.items() if k != "total")


# ----- real SLURM --------------------------------------------------------------------------------------

MECHANISM_SNAKEFILE = """
# One CPU rule, then one GPU rule, named like ungrouped rules of the workflow so the CI profile applies
# to them and each goes to SLURM as its own job.
rule all:
    input: "results/gpu.txt"

rule evaluate_site:
    output: "results/cpu.txt"
    log: "logs/evaluate_site.log"
    shell: "{ENV_TO_LOG} > {log}; touch {output}"

rule pretrain:
    input: "results/cpu.txt"
    output: "results/gpu.txt"
    log: "logs/pretrain.log"
    threads: 1
    resources: gpu=1
    shell: "{ENV_TO_LOG} > {log}; touch {output}"
""".replace(
    "{ENV_TO_LOG}",
    "echo SLURM_JOB_ID=$SLURM_JOB_ID threads={threads} "
    "SLURM_STEP_GPUS=${{SLURM_STEP_GPUS:-}} CUDA_VISIBLE_DEVICES=${{CUDA_VISIBLE_DEVICES:-}}",
)


def run_on_slurm(workdir: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run snakemake with the CI SLURM profile in ``workdir``, bounded by SIGINT (SIGTERM is ignored)."""
    command = ["timeout", "-s", "INT", "-k", "30", str(SLURM_RUN_TIMEOUT_S), SNAKEMAKE]
    command += ["--profile", str(REPO / "profiles" / "slurm-ci"), *args]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)


@needs_slurm
def test_gpu_rule_is_submitted_with_a_gpu_and_cpu_rule_without(tmp_path: Path, slurm_cluster: None) -> None:
    # Prepare
    (tmp_path / "Snakefile").write_text(MECHANISM_SNAKEFILE)
    record = tmp_path / "sbatch_calls.txt"
    env = sbatch_recorder(tmp_path / "bin", record)
    # Execute
    result = run_on_slurm(tmp_path, [], env)
    # Assert: the run finished, each rule went through sbatch once, GPU request only on the GPU rule.
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    calls = submissions(record)
    assert set(calls) == {"evaluate_site", "pretrain"}
    assert all(len(lines) == 1 for lines in calls.values())
    assert gpu_request(calls["pretrain"][0]) == "--gpus=ci:1"
    assert "--cpus-per-gpu=1" in calls["pretrain"][0]
    assert gpu_request(calls["evaluate_site"][0]) is None
    assert "--cpus-per-task=1" in calls["evaluate_site"][0]
    # Assert: each rule ran inside its own SLURM job; only the GPU job was granted a GPU.
    logged = {rule: (tmp_path / "logs" / f"{rule}.log").read_text() for rule in calls}
    job_ids = {rule: re.search(r"SLURM_JOB_ID=(\d+)", text).group(1) for rule, text in logged.items()}
    assert sorted(job_ids.values()) == sorted(recorded_calls(record)), "job ids seen != ids sbatch gave"
    assert re.search(r"SLURM_STEP_GPUS=\S", logged["pretrain"])
    assert re.search(r"SLURM_STEP_GPUS=\s", logged["evaluate_site"])
    # Assert: the plugin kept each job's SLURM log under the job id the job saw.
    for rule, job_id in job_ids.items():
        assert (tmp_path / ".snakemake" / "slurm_logs" / f"rule_{rule}" / f"{job_id}.log").is_file()


@needs_slurm
def test_ci_workflow_target_runs_on_slurm(tmp_path: Path, slurm_cluster: None) -> None:
    # Prepare: the real workflow with the tiny config, in a scratch copy of nothing but its inputs.
    if not (REPO / "config" / "ci.yaml").exists():
        pytest.skip("config/ci.yaml not written yet")
    record = tmp_path / "sbatch_calls.txt"
    env = sbatch_recorder(tmp_path / "bin", record)
    # The adapted model comes from a one-round setting (V2 here, 20 local iterations): profiles/slurm-ci
    # groups a round's site jobs and the aggregation, which holds for a one-round chain only (a second round's
    # site jobs would sit between two jobs of one group). The target goes before --configfile, which takes
    # every following word as a file.
    one_round = tmp_path / "one_round.yaml"
    federated = {"settings": {"V1": None, "V2": {"local_iterations": 20, "rounds": 1}}, "default": "V2"}
    one_round.write_text(yaml.safe_dump({"federated": federated}))
    args = [CI_SLURM_TARGET, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path)]
    args += ["--configfile", str(REPO / "config.yaml"), str(REPO / "config" / "ci.yaml"), str(one_round)]
    # Execute
    result = run_on_slurm(REPO, args, env)
    # Assert: the run finished and made the target.
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / CI_SLURM_TARGET).is_file()
    # Assert: every job of the DAG (data, training, federated, adaptation, prediction, evaluation) ran
    # inside a SLURM job that this run submitted, as the plugin's per-job log under its job id shows.
    planned = job_stats(result.stdout + result.stderr)
    calls = recorded_calls(record)
    ran = rules_run_per_slurm_job(tmp_path)
    assert set(ran) == set(calls), f"SLURM logs {sorted(ran)} != submitted jobs {sorted(calls)}"
    executed: dict[str, int] = {}
    for rules in ran.values():
        for rule in rules:
            executed[rule] = executed.get(rule, 0) + 1
    assert executed == {rule: n for rule, n in planned.items() if rule != "total"}
    assert {"preprocess_case", "pretrain", "train_site_round", "adapt_model", "predict_site"} <= set(executed)
    # Assert: the CI profile's groups took effect (fewer SLURM jobs than Snakemake jobs)...
    assert len(calls) < planned["total"]
    # ...and each SLURM job asked for a GPU exactly when the rules it ran are GPU rules.
    for job_id, rules in ran.items():
        assert rules, f"SLURM job {job_id} ran no rule"
        kinds = {rule in GPU_RULES for rule in rules}
        assert len(kinds) == 1, f"SLURM job {job_id} mixes GPU and CPU rules: {rules}"
        wants_gpu = gpu_request(calls[job_id]) is not None
        assert wants_gpu == kinds.pop(), f"job {job_id} ({sorted(set(rules))}): {calls[job_id][:300]}"
