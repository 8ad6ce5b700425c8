"""Shared fixtures: no network, small generated ImageFolders, running the real scripts."""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (make test: -n 2 --dist loadgroup), the Slurm tests run one after another on one worker: each
    job asks for the local cluster's every CPU, so two at once would wait in the queue for each other."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (loopback stays allowed for process groups)."""
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1", "")) \
                or self.family == socket.AF_UNIX:
            return real_connect(self, address)
        raise OSError(f"network access in a test: connect to {address}")

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host in (None, "localhost", "127.0.0.1", "::1", "") or str(host).startswith("127."):
            return real_getaddrinfo(host, *args, **kwargs)
        raise OSError(f"network access in a test: resolve {host}")

    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One intra-op thread in test processes, as the script subprocesses get (OMP_NUM_THREADS=1): the tiny models
    gain nothing from more, and on a busy 2-core machine spinning threads make them many times slower. Session-wide,
    so module-scoped fixtures run with it too: a run they make and one a test makes are then bit-comparable (float
    reductions split over 2 threads round differently from 1)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_image_folder(root, n_classes=3, per_class=8, size=32, seed=0, ext="png"):
    """Class c: images of a distinct colour plus noise, so the classes are easy to tell apart."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(n_classes, 3))
    for c in range(n_classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, size=(size, size, 3))
            img = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, f"class{c}", f"img{i}.{ext}"))
    return root


def write_split(root, colours, per_class, rng, size=40):
    """One folder per class of a train/ or val/ split; class c is colour c plus noise, so the classes are separable
    and two splits written with the same colours share their classes."""
    for c, colour in enumerate(colours):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            img = np.clip(colour + rng.integers(-50, 50, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, f"class{c}", f"img{i}.png"))



@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """make(n_classes, train_per_class, val_per_class, image_size) -> (root, model): root/data/{train,val} of
    flat-colour classes (write_split) and root/backbone.pth, the weights of a random vit_tiny/16 (seed 0), which
    model is, in eval mode. What eval_knn.py and eval_linear.py are tested on."""
    import torch
    from vision_transformer import build_model

    def make(n_classes, train_per_class, val_per_class, image_size):
        root = tmp_path_factory.mktemp("eval")
        rng = np.random.default_rng(0)
        colours = rng.integers(30, 226, size=(n_classes, 3))
        write_split(str(root / "data" / "train"), colours, train_per_class, rng, image_size)
        write_split(str(root / "data" / "val"), colours, val_per_class, rng, image_size)
        torch.manual_seed(0)
        model = build_model("vit_tiny", patch_size=16).eval()
        torch.save(model.state_dict(), root / "backbone.pth")
        return root, model
    return make


def _gloo_worker(rank, world_size, port, fn, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results[rank] = fn(rank)
    finally:
        dist.destroy_process_group()


def run_in_gloo_processes(fn, world_size=2):
    """[fn(rank) for each rank], each run in its own process of one gloo process group; fn: a module-level
    function (spawned processes import it by name)."""
    import torch.multiprocessing as mp
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gloo_worker, args=(world_size, free_port(), fn, results), nprocs=world_size, join=True)
        return [results[rank] for rank in range(world_size)]


def free_port():
    """A loopback TCP port free at this moment, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def image_folder(tmp_path):
    """A 3-class, 24-image ImageFolder of 32x32 PNGs."""
    return make_image_folder(str(tmp_path / "data"))


def script_env(**extra):
    """Environment for a script subprocess: CPU only, quiet threads, no launcher variables leaking in."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "TORCHELASTIC"))}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# Environment variables that the preloaded interpreter's imports have already read (thread pools, library paths,
# torch's import-time settings): a run that sets them otherwise gets a fresh interpreter.
IMPORT_TIME_ENV = ("OMP_", "MKL_", "KMP_", "GOMP", "OPENBLAS", "TORCH", "PYTORCH", "CUDA", "LD_", "PYTHON", "NUMEXPR")
RUNTIME_ENV = {"TORCH_HOME", "PYTHONUNBUFFERED"}


class Preloaded:
    """tests/preloaded.py, started once per test process: `python SCRIPT` for the repository's scripts, forked from
    an interpreter that has imported torch and the repository (see there). DINO_TESTS_FRESH_PROCESSES=1 runs
    every script in a fresh interpreter instead."""
    proc = None
    env = None

    @classmethod
    def serves(cls, args, env, cwd) -> bool:
        if os.environ.get("DINO_TESTS_FRESH_PROCESSES") == "1" or str(cwd) != REPO or not args:
            return False
        script = str(args[0])
        if not script.endswith(".py") or os.path.isabs(script) or not os.path.isfile(os.path.join(REPO, script)):
            return False  # -m, -c, and scripts outside the repository
        if cls.proc is None:
            cls.start()
        keys = {k for k in set(env) | set(cls.env) if k.startswith(IMPORT_TIME_ENV) and k not in RUNTIME_ENV}
        return cls.proc.poll() is None and all(env.get(k) == cls.env.get(k) for k in keys)

    @classmethod
    def start(cls):
        cls.env = script_env()
        cls.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "preloaded.py")], cwd=REPO,
                                    env=cls.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        if cls.answer() != {"ready": True}:  # its imports failed (on stderr): every script runs fresh
            cls.proc.kill()
            cls.proc.wait()

    @classmethod
    def answer(cls) -> dict:
        """One JSON line from the preloaded interpreter, read unbuffered so that select() sees what is unread."""
        line = b""
        while not line.endswith(b"\n"):
            byte = os.read(cls.proc.stdout.fileno(), 1)
            if not byte:
                return {}
            line += byte
        return json.loads(line)

    @classmethod
    def run(cls, args, env, timeout) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
            request = {"script": str(args[0]), "args": [str(a) for a in args[1:]], "env": env, "cwd": REPO,
                       "stdout": out, "stderr": err}
            cls.proc.stdin.write((json.dumps(request) + "\n").encode())
            pid = cls.answer()["pid"]
            ready, _, _ = select.select([cls.proc.stdout], [], [], timeout)
            if not ready:
                os.kill(pid, signal.SIGKILL)
            returncode = cls.answer()["returncode"]
            with open(out, errors="replace") as f_out, open(err, errors="replace") as f_err:
                proc = subprocess.CompletedProcess([sys.executable, *map(str, args)], returncode, f_out.read(),
                                                   f_err.read())
            if not ready:
                raise subprocess.TimeoutExpired(proc.args, timeout, proc.stdout, proc.stderr)
            return proc


def run_script(args, timeout=600, check=True, env=None, cwd=REPO):
    """Run `python <args>` from the repository root; return the CompletedProcess (stdout+stderr as text). The
    repository's scripts run forked from a preloaded interpreter (Preloaded), the rest (-m, -c) in a fresh one."""
    env = env or script_env()
    if Preloaded.serves(args, env, cwd):
        proc = Preloaded.run(args, env, timeout)
    else:
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc
