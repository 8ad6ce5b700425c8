"""run_with_submitit.py: flags and resources, then real jobs on a real Slurm cluster and on submitit's local executor.

The Slurm tests (marked `slurm`) need a running cluster with a partition "debug" of at least 2 CPUs and a
partition "short" of 5 minutes: `sudo bash tests/slurm/start_local_cluster.sh` starts one on this machine
(.ci/run does it). They are skipped, with the reason, where sbatch is missing or the cluster does not answer.
"""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import REPO, make_image_folder, run_script

import main_dino  # noqa: E402  (conftest puts the repository on sys.path)
import run_with_submitit  # noqa: E402
import utils  # noqa: E402

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


def parse(argv):
    return run_with_submitit.get_args_parser().parse_args(argv)


def tiny_flags(data, out, epochs=2, **overrides):
    """A job of seconds: ViT-tiny on 32-pixel crops, 2 CPU tasks on 1 node."""
    flags = {"ngpus": 0, "nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1, "partition": "debug", "timeout": 10,
             "arch": "vit_tiny", "patch_size": 8, "global_crops_size": 32, "local_crops_size": 16,
             "local_crops_number": 2, "out_dim": 256, "batch_size_per_gpu": 4, "epochs": epochs, "warmup_epochs": 1,
             "num_workers": 0, "saveckp_freq": 0, "data_path": data, "output_dir": out}
    flags.update(overrides)
    return ["run_with_submitit.py"] + [x for k, v in flags.items() for x in (f"--{k}", str(v))]


def submitted_job_id(proc) -> str:
    match = re.search(r"^Submitted job_id: (\S+)$", proc.stdout, re.M)
    assert match, proc.stdout + proc.stderr
    return match.group(1)


def read_log(out):
    with open(os.path.join(out, "log.txt")) as f:
        return [json.loads(line) for line in f]


def task_log(out, job_id, task, ext="out"):
    with open(os.path.join(out, "submitit", f"{job_id}_{task}_log.{ext}")) as f:
        return f.read()


def all_logs(out, job_id, tasks=2):
    return "\n".join(f"--- task {t} {ext}:\n{task_log(out, job_id, t, ext)[-3000:]}"
                     for t in range(tasks) for ext in ("out", "err")
                     if os.path.exists(os.path.join(out, "submitit", f"{job_id}_{t}_log.{ext}")))


# ============ flags and resources (no Slurm needed) ============


def test_every_main_dino_flag_and_the_reference_slurm_flags():
    dino_flags = {s for a in main_dino.get_args_parser()._actions for s in a.option_strings}
    ours = {s for a in run_with_submitit.get_args_parser()._actions for s in a.option_strings}
    assert dino_flags <= ours
    args = parse([])
    assert (args.ngpus, args.nodes, args.timeout, args.partition, args.use_volta32, args.comment) == \
        (8, 2, 2800, "learnfair", False, "")
    assert args.output_dir == "." and args.arch == "vit_small"  # main_dino's own defaults come through
    assert parse(["--use_volta32"]).use_volta32 is True


def test_default_resources_are_the_originals(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string
    args = parse(["--output_dir", str(tmp_path / "out")])
    run_with_submitit.resolve_paths(args)
    params = run_with_submitit.slurm_parameters(args)
    # 8 GPUs and 8 tasks per node, 10 CPUs per task, 40 GB per GPU, signal 120 s before the end, job name dino
    script = _make_sbatch_string(command="python job.py", folder=args.job_dir, **params)
    for line in ["--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--mem=320GB",
                 "--time=2800", "--signal=USR2@120", "--job-name=dino", "--partition=learnfair"]:
        assert f"#SBATCH {line}\n" in script, script
    assert "constraint" not in script and "comment" not in script
    assert f'export PYTHONPATH="{REPO}' in script  # the job imports this checkout wherever it starts
    assert run_with_submitit.MAX_TIMEOUTS == 30
    assert args.job_dir == str(tmp_path / "out" / "submitit")


def test_cpu_nodes_and_site_parameters(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string
    args = parse(["--ngpus", "0", "--tasks_per_node", "2", "--cpus_per_task", "3", "--mem_gb", "1.5",
                  "--use_volta32", "--comment", "for the paper", "--slurm_param", "account=vision",
                  "--slurm_param", "exclusive", "--job_dir", str(tmp_path / "jobs" / "%j")])
    run_with_submitit.resolve_paths(args)
    script = _make_sbatch_string(command="python job.py", folder=args.job_dir,
                                 **run_with_submitit.slurm_parameters(args))
    for line in ["--ntasks-per-node=2", "--cpus-per-task=3", "--mem=1536MB", "--constraint=volta32gb",
                 "--comment='for the paper'", "--account=vision", "--exclusive"]:
        assert f"#SBATCH {line}\n" in script, script
    assert "gpus" not in script
    assert args.job_dir == str(tmp_path / "jobs" / "%j")
    # no GPU and no --mem_gb: no memory request, the partition's default applies
    assert "mem" not in run_with_submitit.slurm_parameters(parse(["--ngpus", "0"]))
    assert run_with_submitit.local_parameters(args)["tasks_per_node"] == 2


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse(["--data_path", "data", "--output_dir", "runs/a"])
    run_with_submitit.resolve_paths(args)
    assert (args.data_path, args.output_dir, args.job_dir) == \
        (str(tmp_path / "data"), str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "a" / "submitit"))


@pytest.mark.parametrize("flags, message", [
    (["--nodes", "0"], "--nodes 0: must be >= 1"),
    (["--ngpus", "4", "--tasks_per_node", "8"], "--tasks_per_node 8 is more than --ngpus 4"),
    (["--cpus_per_task", "0"], "--cpus_per_task 0"),
    (["--mem_gb", "-1"], "--mem_gb -1.0"),
    (["--slurm_param", "=high"], "--slurm_param '=high'"),
    (["--cluster", "local", "--nodes", "2"], "use --nodes 1, not 2"),
    (["--warmup_epochs", "200", "--epochs", "100"], "--warmup_epochs 200 is more than --epochs 100"),
    (["--data_path", "/nonexistent/imagenet"], "/nonexistent/imagenet: does not exist"),
])
def test_bad_flags_fail_before_anything_is_queued(flags, message, image_folder, tmp_path):
    args = parse(["--data_path", image_folder, "--output_dir", str(tmp_path / "out"), *flags])
    run_with_submitit.resolve_paths(args)
    with pytest.raises(utils.InputError, match=re.escape(message)):
        run_with_submitit.check_args(args)
    assert not os.path.exists(tmp_path / "out")


def test_rendezvous_file_is_unique_to_a_job_and_each_of_its_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    first = run_with_submitit.rendezvous_file(tmp_path, "41", "a1")
    assert first == run_with_submitit.rendezvous_file(tmp_path, "41", "a1")  # every task of the run agrees
    names = {first, run_with_submitit.rendezvous_file(tmp_path, "42", "b2"),  # another job on the node
             run_with_submitit.rendezvous_file(tmp_path, "41", "c3")}  # requeued by submitit (new Trainer)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued by Slurm alone (scontrol requeue, preemption)
    names.add(run_with_submitit.rendezvous_file(tmp_path, "41", "a1"))
    assert len(names) == 4 and all(p.parent == tmp_path for p in names)
    # each submission and each requeue through checkpoint() gets its own run id
    args = parse([])
    assert len({run_with_submitit.Trainer(args).run_id for _ in range(3)}) == 3


def test_trainer_sets_up_the_task_from_the_job_environment(tmp_path, monkeypatch):
    """A task as the local executor starts it (rank 1 of 2); main_dino.main is replaced to capture its args."""
    env = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_FOLDER": str(tmp_path / "jobs"), "SUBMITIT_LOCAL_JOB_ID": "77",
           "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
           "SUBMITIT_LOCAL_NODEID": "0", "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
           "RANK": "", "WORLD_SIZE": "", "LOCAL_RANK": "", "CUDA_VISIBLE_DEVICES": "0"}
    for k, v in env.items():  # registered with monkeypatch, so what the Trainer writes is undone afterwards
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    at_fork = []
    monkeypatch.setattr(os, "register_at_fork", lambda **kw: at_fork.append(kw))
    seen = []
    monkeypatch.setattr(main_dino, "main", lambda args: seen.append(args))

    args = parse(["--ngpus", "0", "--output_dir", str(tmp_path / "run_%j")])
    del args.seed  # as if main_dino gained --seed after the job was submitted
    trainer = run_with_submitit.Trainer(args)
    previous_handler = signal.getsignal(signal.SIGUSR2)
    try:
        trainer()
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN  # training over: a late signal must not requeue
    finally:
        signal.signal(signal.SIGUSR2, previous_handler)
    (job_args,) = seen
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert job_args.output_dir == str(tmp_path / "run_77")
    assert job_args.dist_url == (tmp_path / "jobs" / f"77_rendezvous_{trainer.run_id}_restart0").as_uri()
    assert job_args.seed == 0
    assert at_fork == [{"after_in_child": run_with_submitit.ignore_requeue_signal}]
    assert trainer.args.output_dir == str(tmp_path / "run_%j") and not hasattr(trainer.args, "seed")

    requeued = trainer.checkpoint()  # what submitit pickles for the requeued job: the same flags, one more requeue
    assert isinstance(requeued.function, run_with_submitit.Trainer)
    assert requeued.function.args is args and requeued.function.run_id != trainer.run_id

    args.dist_url = "tcp://10.0.0.1:23456"  # a URL the user gave is kept
    try:
        run_with_submitit.Trainer(args)()
    finally:
        signal.signal(signal.SIGUSR2, previous_handler)
    assert seen[-1].dist_url == "tcp://10.0.0.1:23456"


@pytest.mark.slow
def test_forked_children_ignore_the_requeue_signal_the_parent_handles():
    """A forked DataLoader worker must not run submitit's requeue handler; the training process must."""
    code = """if True:
        import os, signal, sys, time
        import run_with_submitit
        handled = []
        signal.signal(signal.SIGUSR2, lambda *a: handled.append(os.getpid()))
        os.register_at_fork(after_in_child=run_with_submitit.ignore_requeue_signal)
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.2)
            os._exit(10 + len(handled))
        _, status = os.waitpid(pid, 0)
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.2)
        print("child", os.waitstatus_to_exitcode(status), "parent", len(handled))
    """
    proc = run_script(["-c", code])
    assert proc.stdout.split() == ["child", "10", "parent", "1"]


def test_no_slurm_here_is_a_clear_error(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # submitit looks for srun with which()
    args = parse(["--ngpus", "0", "--data_path", image_folder, "--output_dir", str(tmp_path / "out")])
    run_with_submitit.resolve_paths(args)
    with pytest.raises(utils.InputError, match="no Slurm on this machine.*--cluster local"):
        run_with_submitit.build_executor(args)


# ============ a real job on submitit's local executor (no Slurm needed) ============


@pytest.mark.slow
def test_local_executor_runs_two_tasks(tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class=8)
    out = str(tmp_path / "out")
    proc = run_script(tiny_flags(data, out, epochs=1, cluster="local", num_workers=1))
    job_id = submitted_job_id(proc)
    results = [os.path.join(out, "submitit", f"{job_id}_{t}_result.pkl") for t in range(2)]
    deadline = time.time() + 240
    while not all(os.path.exists(r) for r in results) and time.time() < deadline:
        time.sleep(0.5)
    assert all(os.path.exists(r) for r in results), all_logs(out, job_id)
    for r in results:
        with open(r, "rb") as f:
            assert pickle.load(f)[0] == "success", all_logs(out, job_id)
    assert "| distributed: world size 2, rank 0, device cpu" in task_log(out, job_id, 0)
    assert f"| task 1 of 2: job {job_id}" in task_log(out, job_id, 1)
    assert [s["epoch"] for s in read_log(out)] == [0]
    assert utils.torch_load(os.path.join(out, "checkpoint.pth"))["epoch"] == 1


# ============ a real Slurm cluster ============


@pytest.fixture(scope="module")
def slurm():
    """Skip unless a Slurm cluster answers here with the partitions the tests use."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not found: start a local cluster with `sudo bash tests/slurm/start_local_cluster.sh`")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %c %a"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"sinfo failed ({e}): is the Slurm cluster running? (tests/slurm/start_local_cluster.sh)")
    rows = [line.split() for line in out.stdout.splitlines()]
    partitions = {p.rstrip("*"): (int(c.rstrip("+")), a) for p, c, a in rows}  # "debug*" is the default, "2+" CPUs
    if out.returncode != 0 or partitions.get("debug", (0, ""))[0] < 2 or "short" not in partitions:
        pytest.skip(f"no Slurm partitions debug (>= 2 CPUs) and short here (sinfo: {out.stdout or out.stderr!r}); "
                    f"start them with tests/slurm/start_local_cluster.sh")
    return partitions


def job_info(job_id) -> dict:
    return run_with_submitit.scontrol_job(job_id)


def wait_for_job(job_id, out, timeout_s, until=None):
    """Poll `scontrol show job` until the job ends (or `until()` is true); return its last fields."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in TERMINAL_STATES or (until and until()):
            return info
        time.sleep(0.25)
    subprocess.run(["scancel", job_id], capture_output=True)
    raise AssertionError(f"job {job_id} still {job_info(job_id).get('JobState')} after {timeout_s} s; "
                         f"cancelled it\n{all_logs(out, job_id)}")


def report(job_id, info):
    print(f"\nSlurm job {job_id}: JobState={info.get('JobState')} ExitCode={info.get('ExitCode')} "
          f"Restarts={info.get('Restarts')} (scontrol show job)")


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_two_tasks_completes(slurm, tmp_path):
    data = make_image_folder(str(tmp_path / "data"), per_class=8)
    out = str(tmp_path / "out")
    proc = run_script(tiny_flags(data, out, epochs=2))
    job_id = submitted_job_id(proc)
    assert f"{out}/submitit/{job_id}_<task>_log.out" in proc.stdout
    info = wait_for_job(job_id, out, timeout_s=180)
    report(job_id, info)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), all_logs(out, job_id)
    assert info["NumTasks"] == "2" and info["Partition"] == "debug" and info["JobName"] == "dino"

    # both ranks took part: rank 0 saw a world of 2, rank 1 started as task 1 of 2 and finished
    assert "| distributed: world size 2, rank 0, device cpu" in task_log(out, job_id, 0)
    assert f"| task 1 of 2: job {job_id}" in task_log(out, job_id, 1)
    for task in range(2):
        assert "Job completed successfully" in task_log(out, job_id, task)
    assert [s["epoch"] for s in read_log(out)] == [0, 1]
    checkpoint = utils.torch_load(os.path.join(out, "checkpoint.pth"))
    assert checkpoint["epoch"] == 2 and checkpoint["args"]["world_size"] == 2
    assert any(k.startswith("module.backbone.") for k in checkpoint["student"])


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_requeued_twice_resumes_and_finishes(slurm, tmp_path):
    """Requeued twice mid-training, it resumes from checkpoint.pth each time instead of starting over.

    1. USR2, the signal Slurm sends --signal_delay_s before the time limit: submitit calls Trainer.checkpoint on
       rank 0 and requeues the job (with one DataLoader worker per task, which must not requeue it too).
    2. `scontrol requeue`, as an administrator or a preemption does it: no signal to checkpoint on, the job is
       killed and started again from its last checkpoint.
    """
    data = make_image_folder(str(tmp_path / "data"), per_class=8)
    out = str(tmp_path / "out")
    job_id = submitted_job_id(run_script(tiny_flags(data, out, epochs=3, num_workers=1)))
    log = os.path.join(out, "log.txt")

    def epochs_done():
        return len(read_log(out)) if os.path.exists(log) else 0

    wait_for_job(job_id, out, timeout_s=180, until=lambda: epochs_done() >= 1)
    assert job_info(job_id)["JobState"] == "RUNNING", all_logs(out, job_id)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for_job(job_id, out, timeout_s=180, until=lambda: epochs_done() >= 2)
    assert job_info(job_id)["JobState"] == "RUNNING", all_logs(out, job_id)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    info = wait_for_job(job_id, out, timeout_s=240)
    report(job_id, info)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "2"), all_logs(out, job_id)

    rank0 = task_log(out, job_id, 0)
    assert rank0.count("Requeuing the job: it resumes from") == 1, all_logs(out, job_id)  # rank 0 only, once
    assert rank0.count("| distributed: world size 2, rank 0") == 3
    assert rank0.count(f"Found checkpoint at {out}/checkpoint.pth") == 2
    epochs = [s["epoch"] for s in read_log(out)]
    # each epoch trained once (a killed run may finish the epoch it was in before SIGKILL): resumed, not restarted
    assert epochs == sorted(set(epochs)) and epochs[0] == 0 and epochs[-1] == 2, epochs
    assert utils.torch_load(os.path.join(out, "checkpoint.pth"))["epoch"] == 3
    # one rendezvous file per run, as each run printed it (torch removes the file once a run ends cleanly): the
    # second run has a new run id (checkpoint) and restart count, the third (scontrol requeue) the same run id
    # and a new restart count
    runs = re.findall(rf"rendezvous file://{re.escape(out)}/submitit/{job_id}_rendezvous_(\w+)_restart(\d)", rank0)
    assert [r for _, r in runs] == ["0", "1", "2"] and runs[0][0] != runs[1][0] == runs[2][0], runs


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.parametrize("flags, expected", [
    (lambda cpus: {"partition": "nosuchpartition"},
     r"sbatch refused the job: invalid partition specified: nosuchpartition"),
    (lambda cpus: {"tasks_per_node": cpus + 1},  # more tasks than the node has CPUs
     r"job (\d+) can never start on partition debug \(Slurm: PartitionConfig"),
    (lambda cpus: {"cpus_per_task": cpus},  # 2 tasks of all the node's CPUs each
     r"job (\d+) can never start on partition debug \(Slurm: PartitionConfig"),
    (lambda cpus: {"partition": "short", "timeout": 10},  # above the partition's 5 minutes
     r"job (\d+) can never start on partition short .*time limit 5:00"),
], ids=["no-such-partition", "more-tasks-than-cpus", "more-cpus-than-the-node", "timeout-above-partition-limit"])
def test_slurm_impossible_request_is_a_clear_error(slurm, flags, expected, image_folder, tmp_path):
    out = str(tmp_path / "out")
    proc = run_script(tiny_flags(image_folder, out, **flags(slurm["debug"][0])), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    match = re.search(expected, lines[0])
    assert match, lines[0]
    assert "Submitted job_id" not in proc.stdout
    if match.groups():  # it was queued: now cancelled, not waiting forever
        info = job_info(match.group(1))
        report(match.group(1), info)
        assert info.get("JobState") == "CANCELLED"
    else:  # refused by sbatch: no job, no stray job files
        assert os.listdir(os.path.join(out, "submitit")) == []
