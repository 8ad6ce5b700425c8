"""A preloaded interpreter for the script tests: it imports torch, torchvision and the repository's modules once, then
forks a child per script run (conftest.run_script). Importing them costs 6-8 s of CPU on a 2-core machine, about
the whole run of a small test script, and the suite runs ~150 of them.

The child is what `python SCRIPT ARGS` would be: the environment, working directory, argv, sys.path and standard
streams of the request, the script run as __main__, then Python's own shutdown order (non-daemon threads joined,
atexit handlers, streams flushed). For a script in a subfolder, whose sys.path[0] is not the repository, the
repository's modules are dropped from sys.modules first: it imports them only if it adds the repository itself. Nothing
runs in this process but imports, so no thread exists when it forks.

Protocol on stdin/stdout, one JSON line each way: {"script", "args", "env", "cwd", "stdout", "stderr"} (the last two
are file paths) is answered by {"pid"} when the child starts and {"returncode"} when it ends (negative: the signal
that ended it, as subprocess has it).
"""
import atexit
import io
import json
import os
import runpy
import sys
import threading
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE_PATH = sys.path[1:]  # sys.path[0] is the folder of the script run
PRELOAD = ("numpy", "PIL.Image", "torch", "torch.distributed", "torchvision", "utils", "vision_transformer",
           "main_dino", "eval_knn", "eval_linear")


def run_child(request: dict) -> int:
    """In the forked child: become `python SCRIPT ARGS` and run it; returns the exit status."""
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, target in ((stdin, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    unbuffered = bool(request["env"].get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True, write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, write_through=True,
                                  errors="backslashreplace")
    script = os.path.join(REPO, request["script"])
    sys.argv = [script, *request["args"]]
    sys.path[:] = [os.path.dirname(script), *SITE_PATH]  # a fresh interpreter's path for this script
    if os.path.dirname(script) != REPO:  # a script in a subfolder imports the repository only if it adds it
        for name, module in list(sys.modules.items()):
            if name != "__main__" and (getattr(module, "__file__", None) or "").startswith(REPO + os.sep):
                del sys.modules[name]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # what the interpreter prints for an uncaught exception, and its status
        traceback.print_exc()
        code = 1
    threading._shutdown()  # the interpreter's own shutdown: wait for non-daemon threads, then atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def main():
    sys.path[0] = REPO  # was tests/, this file's folder
    for name in PRELOAD:
        __import__(name)
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # the children's output goes to their own files; this process's stderr stays the test's
    answers.write(json.dumps({"ready": True}) + "\n")
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            requests.close()
            answers.close()
            code = 1
            try:
                code = run_child(request)
            finally:
                os._exit(code & 0xFF)
        answers.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")


if __name__ == "__main__":
    main()
