"""One-line errors for bad inputs: a flag, a path or a file that cannot serve, reported without a traceback."""
import os
import sys

from vision_transformer import UnknownArchError


class InputError(Exception):
    """A bad input (flag, path, file): reported by run_main as one line without a traceback."""


class RankInputError(InputError):
    """A bad input of this process only (e.g. its GPU): every process that has it reports it."""


def launch_rank() -> int:
    """This process's rank as its launcher tells it (torchrun, Slurm), known before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def run_main(main, args) -> None:
    """Call main(args); a bad input ends the process with one line on stderr and exit code 2.

    Every process of a job parses the same flags and reads the same files, so their errors are the same:
    rank 0 prints it, once for the job. A RankInputError is printed by the process it concerns.
    """
    try:
        main(args)
    except (InputError, UnknownArchError) as e:
        if isinstance(e, RankInputError):
            print(f"error: rank {launch_rank()}: {e}", file=sys.stderr, flush=True)
        elif launch_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
