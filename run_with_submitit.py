"""DINO training on Slurm through submitit: every main_dino.py flag, plus the job's resources.

    # the paper's setup: 2 nodes x 8 GPUs (16 tasks), ViT-S/16
    python run_with_submitit.py --nodes 2 --ngpus 8 --arch vit_small --data_path /path/to/imagenet/train \
        --output_dir /path/to/saving_dir
    # CPU-only nodes: 1 node, 2 tasks of 1 CPU each, on a partition named debug
    python run_with_submitit.py --ngpus 0 --tasks_per_node 2 --cpus_per_task 1 --nodes 1 --partition debug \
        --arch vit_tiny --data_path /path/to/train --output_dir /path/to/saving_dir
    # the same job on this machine, without Slurm (submitit's local executor)
    python run_with_submitit.py --cluster local --ngpus 0 --tasks_per_node 2 --nodes 1 --arch vit_tiny ...

A job that times out or is preempted is checkpointed by submitit, requeued (up to 30 timeouts) and resumes
from output_dir/checkpoint.pth. Logs: <job_dir>/<job id>_<task>_log.out and .err, one pair per task;
--job_dir defaults to <output_dir>/submitit. "%j" in --output_dir or --job_dir stands for the job id.
"""
import argparse
import contextlib
import copy
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import submitit

import main_dino
import utils

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
MEM_GB_PER_GPU = 40
MAX_TIMEOUTS = 30  # requeues after a timeout; preemptions are requeued without limit
# Reasons Slurm gives a pending job that no amount of waiting will start
NEVER_STARTS = {
    "PartitionConfig": "the request does not fit the partition: CPUs, memory or GPUs per node, nodes or time",
    "PartitionNodeLimit": "it asks more nodes than the partition allows",
    "PartitionTimeLimit": "--timeout is above the partition's time limit",
    "BadConstraints": "no node of the partition has the requested features (--use_volta32 or a constraint)",
}


def get_args_parser():
    parser = argparse.ArgumentParser("Submitit for DINO", parents=[main_dino.get_args_parser()], add_help=False)
    parser.add_argument("--ngpus", default=8, type=int,
                        help="GPUs to request on each node; 0 for CPU-only nodes (then see --tasks_per_node).")
    parser.add_argument("--nodes", default=2, type=int, help="Number of nodes to request.")
    parser.add_argument("--timeout", default=2800, type=int, help="""Duration of the job in minutes. Slurm warns
        the job --signal_delay_s seconds before the end; it is then requeued and resumes from its last checkpoint.""")
    parser.add_argument("--partition", default="learnfair", type=str, help="Partition where to submit.")
    parser.add_argument("--use_volta32", action="store_true",
                        help="Request 32 GB V100 GPUs (Slurm constraint volta32gb). Big models need them.")
    parser.add_argument("--comment", default="", type=str,
                        help="Comment to pass to the scheduler, e.g. a priority message.")

    # Resources a site may need to change
    parser.add_argument("--tasks_per_node", default=None, type=int,
                        help="Processes per node (default: one per GPU; 1 with --ngpus 0).")
    parser.add_argument("--cpus_per_task", default=10, type=int,
                        help="CPUs per task: the data-loading workers (--num_workers) run on them.")
    parser.add_argument("--mem_gb", default=None, type=float, help=f"""Memory per node in GB (default:
        {MEM_GB_PER_GPU} per GPU; with --ngpus 0, none is asked and the partition's default applies).""")
    parser.add_argument("--signal_delay_s", default=120, type=int,
                        help="Seconds before the time limit at which Slurm signals the job to checkpoint and requeue.")
    parser.add_argument("--slurm_param", default=[], action="append", metavar="KEY=VALUE",
                        help="""Any other sbatch option, repeatable: --slurm_param account=myproject
        --slurm_param qos=high; a KEY alone (e.g. exclusive) is a flag without value.""")
    parser.add_argument("--job_dir", default="", type=str, help="""Folder for submitit's job files and the
        per-task logs (default: <output_dir>/submitit). Every node must see it: it is on a shared file system.""")
    parser.add_argument("--cluster", default="slurm", choices=["slurm", "local"],
                        help="slurm: submit with sbatch; local: run the job here with submitit's local executor.")
    return parser


class Trainer:
    """What each task of the job runs: torch.distributed set up from submitit's job environment, then DINO.

    On a timeout or a preemption submitit calls checkpoint() on rank 0, which gives back the same training
    to requeue; it resumes from output_dir/checkpoint.pth, written at the end of every epoch.
    """

    def __init__(self, args):
        self.args = args
        self.run_id = uuid.uuid4().hex[:12]  # new at each submission and each requeue through checkpoint()

    def __call__(self):
        job_env = submitit.JobEnvironment()
        # the requeued job must start from the flags as submitted (%j is replaced below): work on a copy. The job runs
        # the checkout's code as it is when the job (re)starts: a flag added since submission gets its default.
        defaults = vars(main_dino.get_args_parser().parse_args([]))
        args = argparse.Namespace(**copy.deepcopy({**defaults, **vars(self.args)}))
        args.output_dir = args.output_dir.replace("%j", str(job_env.job_id))
        if args.ngpus == 0:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU-only job: no task picks up a GPU the node may have
        os.environ.update(RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks),
                          LOCAL_RANK=str(job_env.local_rank))
        if args.dist_url == "env://":  # the default: no launcher sets MASTER_ADDR here; any other URL is kept
            args.dist_url = rendezvous_file(job_env.paths.folder, job_env.job_id, self.run_id).as_uri()
        # Slurm signals every process of the job, DataLoader workers included, and forked workers inherit
        # submitit's handler: left alone, a worker of rank 0 would checkpoint and requeue the job a second time
        os.register_at_fork(after_in_child=ignore_requeue_signal)
        print(f"| task {job_env.global_rank} of {job_env.num_tasks}: job {job_env.job_id} on {job_env.hostname}, "
              f"node {job_env.node} of {job_env.num_nodes}, local rank {job_env.local_rank}, "
              f"rendezvous {args.dist_url}", flush=True)
        main_dino.main(args)
        ignore_requeue_signal()  # training is over: a late timeout signal must not requeue the finished job

    def checkpoint(self):
        output_dir = self.args.output_dir.replace("%j", str(submitit.JobEnvironment().job_id))
        print(f"Requeuing the job: it resumes from {os.path.join(output_dir, 'checkpoint.pth')}", flush=True)
        return submitit.helpers.DelayedSubmission(Trainer(self.args))


def ignore_requeue_signal() -> None:
    """Ignore the signal on which submitit checkpoints and requeues (in DataLoader workers; after training)."""
    signal.signal(getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG), signal.SIG_IGN)


def rendezvous_file(job_folder, job_id: str, run_id: str) -> Path:
    """The file through which the job's tasks find each other (torch.distributed's file:// init).

    No TCP port is chosen, so none can clash: gloo and NCCL then connect through ports the kernel gives
    them. The name is unique to this job and this run of it, so it never meets a stale file: a requeued job
    (same job id) has a new run_id when submitit requeued it (the only change the local executor shows) and
    one more Slurm restart (SLURM_RESTART_COUNT, also after `scontrol requeue` or a preemption); run_id
    also tells apart two jobs of one id in one folder (a cluster whose job ids started over).
    """
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return Path(job_folder) / f"{job_id}_rendezvous_{run_id}_restart{restarts}"


def resolve_paths(args) -> None:
    """Absolute paths (the job may start elsewhere) and the job folder under output_dir by default."""
    args.data_path = os.path.abspath(args.data_path)
    args.output_dir = os.path.abspath(args.output_dir)
    args.job_dir = os.path.abspath(args.job_dir) if args.job_dir else os.path.join(args.output_dir, "submitit")


# The job's resources; main_dino.check_args checks the training flags
FLAG_DOMAINS = {
    "nodes": utils.AT_LEAST_ONE, "ngpus": utils.NON_NEGATIVE, "timeout": utils.AT_LEAST_ONE,
    "tasks_per_node": utils.AT_LEAST_ONE, "cpus_per_task": utils.AT_LEAST_ONE, "mem_gb": utils.POSITIVE,
    "signal_delay_s": utils.NON_NEGATIVE,
}


def check_args(args) -> None:
    """One-line errors for resources and flags before anything is queued."""
    utils.check_flag_domains(args, FLAG_DOMAINS)
    if args.ngpus and args.tasks_per_node is not None and args.tasks_per_node > args.ngpus:
        raise utils.InputError(f"--tasks_per_node {args.tasks_per_node} is more than --ngpus {args.ngpus}: "
                               f"each task drives one GPU (use --ngpus 0 for CPU tasks)")
    if args.cluster == "local" and args.nodes != 1:
        raise utils.InputError(f"--cluster local runs on this machine only: use --nodes 1, not {args.nodes}")
    slurm_extra_params(args.slurm_param)
    main_dino.check_args(args)
    utils.check_image_folder(args.data_path)  # the nodes read the same shared path: fail now, not after queuing


def slurm_extra_params(pairs: list) -> dict:
    """--slurm_param KEY=VALUE options as a dict; KEY alone is a flag (True)."""
    extra = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not key.strip() or key != key.strip():
            raise utils.InputError(f"--slurm_param {pair!r}: expected KEY=VALUE (e.g. account=myproject) or KEY")
        extra[key] = value if sep else True
    return extra


def tasks_per_node(args) -> int:
    return args.tasks_per_node or args.ngpus or 1


def slurm_parameters(args) -> dict:
    """submitit.SlurmExecutor parameters: the original's resources unless a flag changes them."""
    params = dict(job_name="dino", partition=args.partition, nodes=args.nodes, ntasks_per_node=tasks_per_node(args),
                  cpus_per_task=args.cpus_per_task, time=args.timeout, signal_delay_s=args.signal_delay_s,
                  setup=[python_path_setup()])
    if args.ngpus:
        params["gpus_per_node"] = args.ngpus
    mem_gb = args.mem_gb if args.mem_gb is not None else MEM_GB_PER_GPU * args.ngpus
    if mem_gb:
        params["mem"] = f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"
    if args.comment:
        params["comment"] = args.comment
    if args.use_volta32:
        params["constraint"] = "volta32gb"
    extra = slurm_extra_params(args.slurm_param)
    if extra:
        params["additional_parameters"] = extra
    return params


def local_parameters(args) -> dict:
    """submitit.LocalExecutor parameters: the same tasks, GPUs and time limit on this machine."""
    return dict(tasks_per_node=tasks_per_node(args), gpus_per_node=args.ngpus, timeout_min=args.timeout,
                signal_delay_s=args.signal_delay_s, setup=[python_path_setup()])


def python_path_setup() -> str:
    """Shell line run before the job: the job imports main_dino and utils from this checkout wherever it starts."""
    return f'export PYTHONPATH="{REPO_DIR}${{PYTHONPATH:+:$PYTHONPATH}}"'


def build_executor(args):
    """A SlurmExecutor (needs srun/sbatch here) or a LocalExecutor, with the job's resources."""
    if args.cluster == "local":
        executor = submitit.LocalExecutor(folder=args.job_dir, max_num_timeout=MAX_TIMEOUTS)
        executor.update_parameters(**local_parameters(args))
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=args.job_dir, max_num_timeout=MAX_TIMEOUTS)
    except RuntimeError:  # submitit looks for srun
        raise utils.InputError("no Slurm on this machine (srun not found); submit from a Slurm login node, or "
                               "run the job here with --cluster local") from None
    executor.update_parameters(**slurm_parameters(args))
    return executor


def submit(executor, trainer):
    """executor.submit with sbatch's refusal (bad partition, impossible request) as one InputError line."""
    folder = submitit.core.utils.JobPaths.get_first_id_independent_folder(executor.folder)
    before = set(folder.iterdir()) if folder.is_dir() else set()
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # submitit echoes sbatch's stderr before raising
            job = executor.submit(trainer)
    except submitit.core.utils.FailedJobError as e:
        for path in set(folder.iterdir()) - before:  # the pickle and script of a job that does not exist
            path.unlink()
        lines = [line.strip().removeprefix("sbatch: error: ") for line in (str(e) or captured.getvalue()).splitlines()]
        message = "; ".join(line for line in lines if line)
        raise utils.InputError(f"sbatch refused the job: {message}") from None
    sys.stderr.write(captured.getvalue())  # warnings of a successful submission are the user's to see
    return job


def scontrol_job(job_id: str) -> dict:
    """`scontrol show job` as a dict of its KEY=VALUE fields (empty once Slurm has forgotten the job)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                         timeout=60).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def check_job_can_start(job_id: str, args, wait_s: float = 15.0) -> None:
    """Cancel the job and raise InputError if Slurm says it can never start, instead of leaving it queued forever.

    Slurm accepts some impossible requests (more CPUs per node than any node has, a --timeout above the
    partition's limit) and keeps them pending with a reason such as PartitionConfig. The scheduler gives
    that reason within seconds of the submission; a normal wait (Resources, Priority) passes.
    """
    deadline = time.time() + wait_s
    while True:
        job = scontrol_job(job_id)
        state, reason = job.get("JobState", ""), job.get("Reason", "None")
        if reason in NEVER_STARTS:
            subprocess.run(["scancel", str(job_id)], capture_output=True, timeout=60)
            raise utils.InputError(f"job {job_id} can never start on partition {args.partition} (Slurm: {reason}, "
                                   f"{NEVER_STARTS[reason]}), so it was cancelled. Asked: {resources_asked(args)}; "
                                   f"the partition has: {partition_nodes(args.partition)}")
        if (state and state != "PENDING") or reason != "None" or time.time() > deadline:
            return
        time.sleep(0.5)


def resources_asked(args) -> str:
    mem = slurm_parameters(args).get("mem", "the default memory")
    return (f"{args.nodes} nodes x {tasks_per_node(args)} tasks x {args.cpus_per_task} CPUs, {args.ngpus} GPUs and "
            f"{mem} per node, for {args.timeout} minutes")


def partition_nodes(partition: str) -> str:
    """sinfo's summary of a partition: node count, CPUs, memory, GPUs and time limit per kind of node."""
    out = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%D nodes of %c CPUs, %m MB, gres %G, time limit %l"],
                         capture_output=True, text=True, timeout=60).stdout
    return "; ".join(line for line in out.splitlines() if line) or "no nodes"


def main(args):
    resolve_paths(args)
    check_args(args)

    # ============ submitting the job ... ============
    executor = build_executor(args)
    job = submit(executor, Trainer(args))
    if args.cluster == "slurm":
        check_job_can_start(job.job_id, args)

    print(f"Submitted job_id: {job.job_id}")
    print(f"Logs: {job.paths.folder}/{job.job_id}_<task>_log.out and .err, tasks 0 to "
          f"{args.nodes * tasks_per_node(args) - 1}; task 0 has the training log")
    print(f"Checkpoints and log.txt will be saved at: {args.output_dir.replace('%j', str(job.job_id))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser("Submitit for DINO", parents=[get_args_parser()])
    utils.run_main(main, parser.parse_args())
