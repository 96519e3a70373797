"""The commands' entry points (pyproject's [project.scripts]), outside the package: importing
deepvis_repro loads torch, Hydra and the rest, the first seconds of every run, and a Ctrl-C then
would print the interpreter's traceback of whatever import it hit. Here it is one line and status
130, as everywhere else (deepvis_repro/console.py). This module imports nothing heavy itself."""
from __future__ import annotations

import os
import signal
import sys


def _run(command: str) -> None:
    # A KeyboardInterrupt raised inside a library's import can be swallowed by a broad except
    # there (seen once in CI: Ctrl-C mid-import, then the command ran on and exited 0). The
    # handler notes the signal as well, so that a Ctrl-C while loading always stops the command.
    asked = []

    def interrupt(signum, frame):
        asked.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    try:
        from deepvis_repro import cli

        main = getattr(cli, command)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the commands' own handling from here
        if asked:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        prog = os.path.basename(sys.argv[0]) or "deepvis"
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    main()


def inspect_main() -> None:
    _run("inspect_main")


def optimize_main() -> None:
    _run("optimize_main")


def live_main() -> None:
    _run("live_main")


def reproduce_main() -> None:
    _run("reproduce_main")


def mine_main() -> None:
    _run("mine_main")


def convert_main() -> None:
    _run("convert_main")


def search_main() -> None:
    _run("search_main")
