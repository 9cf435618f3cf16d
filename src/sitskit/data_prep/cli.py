"""`python data_prep.py <command> …`: simulate, show, pastis, mtlcc, info, verify.

Each command lives with the code it drives; this module only assembles the parser. A command that
fails on bad input raises `UserFacingError`: one line on stderr, exit code 2, nothing left behind.
"""
from __future__ import annotations

import argparse
import os
import sys

from sitskit.errors import UserFacingError, interrupt_exit_code, raise_on_sigterm


def program_name() -> str:
    """What the user typed: "data_prep.py", "sitskit-data-prep" (the console script) or the module."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m sitskit.data_prep.cli" if name in ("", "-c", "cli.py", "__main__.py") else name


def build_parser() -> argparse.ArgumentParser:
    from sitskit.data_prep import commands as prep_commands
    from sitskit.simulate import cli as simulate_cli

    parser = argparse.ArgumentParser(
        prog=program_name(),
        description="Simulate SITS datasets in their real on-disk formats, inspect them, and convert "
                    "PASTIS / MTLCC to one HDF5 file.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    simulate_cli.register(sub)   # simulate, show
    prep_commands.register(sub)  # pastis, mtlcc, info, verify
    return parser


def _quiet_stdout() -> None:
    """The reader of our stdout left (`… | head`): send the rest to /dev/null, no BrokenPipeError."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # --help or a usage error, already printed: flush it here, where a closed pipe is caught
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_stdout()
        raise
    raise_on_sigterm()
    try:
        result = args.func(args)
        sys.stdout.flush()
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the command has cleaned up (or kept a --resume file)
        print("terminated" if interrupt_exit_code(exc) == 143 else "interrupted", file=sys.stderr)
        return interrupt_exit_code(exc)
    except BrokenPipeError:  # e.g. `data_prep.py info f.h5 | head`: the reader left, not an error
        _quiet_stdout()
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
