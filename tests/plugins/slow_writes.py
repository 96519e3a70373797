"""Runs a deepvis console script with every file write slowed down and announced on stderr
('WRITING <path>'), so that a test can send a signal while files are being written.

    python slow_writes.py optimize unit=fc:130 ...
"""
import os
import sys
import time

import deepvis_repro.files as files

_write = files.write_bytes
DELAY = float(os.environ.get("SLOW_WRITE_SECONDS", "0.4"))


def slow_write_bytes(path, data, fsync=True):
    print(f"WRITING {path}", file=sys.stderr, flush=True)
    time.sleep(DELAY)
    _write(path, data, fsync=fsync)


files.write_bytes = slow_write_bytes

if __name__ == "__main__":
    from deepvis_repro import cli

    # modules that imported write_bytes by name (from .files import write_bytes) hold their own
    # reference: every loaded one is pointed at the slow writer too
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("deepvis_repro") and getattr(mod, "write_bytes", None) is _write:
            mod.write_bytes = slow_write_bytes

    app = sys.argv[1]
    sys.argv = [f"deepvis-{app}"] + sys.argv[2:]
    getattr(cli, f"{app}_main")()
