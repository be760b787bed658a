"""Run a command with a small tmpfs mounted in a private mount namespace (`unshare -m`).

As root, chmod cannot make anything unwritable, so read-only and full-disk cases need a real file
system in that state: a tmpfs of a few KiB or MiB, mounted (or remounted read-only) only inside the
command's own mount namespace, invisible to the rest of the machine and gone when it exits.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest


def _permitted() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


_PERMITTED = None


def require_private_mounts() -> None:
    global _PERMITTED
    if _PERMITTED is None:
        _PERMITTED = _permitted()
    if not _PERMITTED:
        pytest.skip("needs `unshare -m` and tmpfs mounts (root in a private mount namespace), "
                    "which this machine does not permit")


def run_with_tmpfs(mount_point, command, *, size="1m", read_only=False, populate_from=None,
                   env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run `command` (argv list) with a tmpfs of `size` at `mount_point` (existing directory).

    populate_from: a directory whose contents are copied in first; read_only: the tmpfs is then
    remounted read-only. stdout and stderr are captured as text.
    """
    require_private_mounts()
    script = [f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount_point))}"]
    if populate_from is not None:
        script.append(f"cp -a {shlex.quote(str(populate_from))}/. {shlex.quote(str(mount_point))}/")
    if read_only:
        script.append(f"mount -o remount,ro {shlex.quote(str(mount_point))}")
    script.append("exec " + " ".join(shlex.quote(str(a)) for a in command))
    return subprocess.run(["unshare", "-m", "sh", "-c", " && ".join(script)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def python_command(code: str) -> list:
    """argv that runs `code` with this interpreter."""
    return [sys.executable, "-c", code]
