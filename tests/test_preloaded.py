"""The preloaded interpreter (tests/preloaded.py) gives what a fresh `python SCRIPT` gives: output, status, path."""
import pytest

from conftest import REPO, Preloaded, run_script, script_env


@pytest.mark.parametrize("args", [
    ["main_dino.py", "--epochs", "-1"],                      # a bad flag: one line on stderr, status 2
    ["eval_knn.py", "--help"],                               # argparse's help on stdout, status 0
    ["tools/plot_logs.py", "/no/such/log.txt"],               # a script in a subfolder
])
def test_a_forked_run_equals_a_fresh_one(args, monkeypatch):
    forked = run_script(args, check=False)
    assert Preloaded.serves(args, script_env(), REPO) and Preloaded.proc.poll() is None
    monkeypatch.setenv("DINO_TESTS_FRESH_PROCESSES", "1")
    fresh = run_script(args, check=False)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
