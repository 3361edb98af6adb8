"""Run a command inside a private mount namespace with a real filesystem fault prepared for it.

    unshare --mount --propagation private python mount_ns.py --tmpfs 4m DIR --control CTL -- command...
    unshare --mount --propagation private python mount_ns.py --readonly DIR -- command...

`--tmpfs SIZE DIR` mounts a small tmpfs on DIR (a disk that can really fill up); with `--control CTL`, the file
CTL/fill makes this process fill that tmpfs to the last byte (then CTL/filled appears) and CTL/free removes
the filler again (then CTL/freed). `--readonly DIR` bind-mounts DIR onto itself read-only (EROFS, which not even
root can write through). The namespace ends with the command, so nothing is left mounted on the machine.
SIGTERM and SIGINT are passed on to the command; the exit code is the command's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def fill(folder: Path) -> None:
    """Write zeros until the filesystem refuses even one more byte."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, block)
    finally:
        os.close(fd)


def control(folder: Path, ctl: Path, done: threading.Event) -> None:
    while not done.is_set():
        if (ctl / "fill").exists():
            (ctl / "fill").unlink()
            fill(folder)
            (ctl / "filled").touch()
        if (ctl / "free").exists():
            (ctl / "free").unlink()
            (folder / "filler").unlink(missing_ok=True)
            (ctl / "freed").touch()
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tmpfs", nargs=2, metavar=("SIZE", "DIR"))
    parser.add_argument("--readonly", metavar="DIR")
    parser.add_argument("--control", metavar="CTL")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.tmpfs:
        size, folder = args.tmpfs
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], check=True)
    if args.readonly:
        subprocess.run(["mount", "--bind", args.readonly, args.readonly], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", args.readonly], check=True)
    done = threading.Event()
    if args.control and args.tmpfs:
        threading.Thread(target=control, args=(Path(args.tmpfs[1]), Path(args.control), done), daemon=True).start()
    child = subprocess.Popen(command)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: child.send_signal(number))
    code = child.wait()
    done.set()
    return code


if __name__ == "__main__":
    sys.exit(main())
