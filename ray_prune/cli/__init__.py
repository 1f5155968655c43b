"""``ray-prune``: one subcommand per step of the method, plus the sweep and its status.

Each step reads what the previous one wrote (a distance table, a saved model,
an adapter), so they compose in shell scripts as well as in the sweep. Bad
input exits 2 with a one-line message and a fix; bugs keep their traceback.
"""


import sys
from typing import Sequence

from ray_prune.cli.parser import build_parser
from ray_prune.cli.steps import cmd_eval, cmd_heal, cmd_profile, cmd_prune
from ray_prune.cli.sweeps import cmd_report, cmd_status, cmd_sweep
from ray_prune.errors import UserError

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {"sweep": cmd_sweep, "status": cmd_status, "report": cmd_report, "profile": cmd_profile,
            "prune": cmd_prune, "heal": cmd_heal, "eval": cmd_eval}


def main(argv: Sequence[str] | None = None) -> int:
    from ray_prune.sweep.interrupt import SweepInterrupted

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"ray-prune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except SweepInterrupted as e:
        print(f"ray-prune {args.command}: {e}", file=sys.stderr)
        return e.exit_code
