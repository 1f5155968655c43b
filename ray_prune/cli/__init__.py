"""``ray-prune``: one subcommand per step of the method, plus the sweep and its status.

Each step reads what the previous one wrote (a distance table, a saved model,
an adapter), so they compose in shell scripts as well as in the sweep. Bad
input exits 2 with a one-line message and a fix; bugs keep their traceback.
"""


import os
import signal
import sys
from typing import Sequence

from ray_prune.cli.parser import build_parser
from ray_prune.cli.steps import cmd_eval, cmd_heal, cmd_profile, cmd_prune
from ray_prune.cli.sweeps import cmd_report, cmd_status, cmd_sweep
from ray_prune.errors import UserError

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {"sweep": cmd_sweep, "status": cmd_status, "report": cmd_report, "profile": cmd_profile,
            "prune": cmd_prune, "heal": cmd_heal, "eval": cmd_eval}


class _Stopped(Exception):
    """SIGTERM (``kill``, ``ray job stop``) in a step command: unwound like Ctrl-C, to one line and exit 143."""


def _on_sigterm(signum, frame) -> None:
    raise _Stopped()


def _say_interrupted(command: str, signum: int) -> int:
    name = signal.Signals(signum).name
    print(f"ray-prune {command}: interrupted by {name}; nothing partial was written, run the same command again",
          file=sys.stderr)
    return 128 + signum


def exit_now(command: str, e) -> None:
    """The sweep's fast stop: one line, then out at once (its rows are on storage; Ray goes with the process)."""
    print(f"ray-prune {command}: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(e.exit_code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command: bad input is one line and exit 2; Ctrl-C and SIGTERM are one line and exit 130 / 143."""
    from ray_prune.sweep.interrupt import SweepInterrupted

    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure") and not sys.stdout.isatty():
        # Into a file or a pipe (a job's log, `| tee`), each line as it is printed, as in a terminal: progress read
        # from a log is otherwise minutes behind, stuck in Python's block buffer.
        sys.stdout.reconfigure(line_buffering=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"ray-prune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        print(f"ray-prune {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return _say_interrupted(args.command, signal.SIGINT)
    except _Stopped:
        return _say_interrupted(args.command, signal.SIGTERM)
    except Exception as e:  # noqa: BLE001 - environmental faults become one line; bugs keep their traceback
        from ray_prune.cli.faults import explain

        said = explain(e, _written_paths(args))
        if said is None:
            raise
        print(f"ray-prune {args.command}: error: {said[0]}\n  fix: {said[1]}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _written_paths(args) -> list[str]:
    """Where a command writes: its output or storage, and Ray's temp dir (Tune's state)."""
    paths = [p for p in (getattr(args, "out", None), getattr(args, "storage", None)) if p and "://" not in p]
    return paths + [os.environ.get("RAY_TMPDIR", "/tmp")]


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
