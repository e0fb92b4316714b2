"""Run a command with its stderr on a new pseudo-terminal, as a user's terminal would show it."""

from __future__ import annotations

import os
import pty
import subprocess


def run_on_a_terminal(
    cmd: list[str], *, cwd=None, env: dict | None = None, timeout: float = 900
) -> tuple[int, str, str]:
    """``(returncode, stdout, stderr)`` of ``cmd`` with stderr on a fresh pty, stdout piped.

    The terminal is drained while the command runs (a full pty would block it); a pty turns
    ``\\n`` into ``\\r\\n``, so a test looking for a bar's bare ``\\r`` must discount those.
    """
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the command closed its end
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    stdout = proc.stdout.read()
    return proc.wait(timeout=timeout), stdout, err.decode(errors="replace")
