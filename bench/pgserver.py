"""A throwaway PostgreSQL server for the benchmark, with pg_stat_statements loaded.

The machine's shared server may not preload pg_stat_statements, and changing its configuration
needs a restart that other users would notice. This one lives in a temporary folder, listens on
a free loopback port and is removed when the benchmark ends.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def _bin_dir() -> Path:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise RuntimeError("initdb was not found under /usr/lib/postgresql; install it with `apt-get install -y postgresql`")
    return versions[-1].parent


class PrivatePostgres:
    """`initdb` + `pg_ctl start` in `directory`; the server runs as the postgres user when started as root."""

    def __init__(self, port: int) -> None:
        # Its own folder under the system temp folder: the server's account must be able to reach it.
        self.directory = Path(tempfile.mkdtemp(prefix="sandbox-backup-bench-pg-"))
        self.port = port
        self.bin = _bin_dir()
        self.data = self.directory / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        if os.geteuid() == 0:
            # initdb refuses to run as root.
            account = pwd.getpwnam("postgres")
            shutil.chown(self.directory, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.directory}",
                "-c shared_preload_libraries=pg_stat_statements",
                "-c pg_stat_statements.track=top",
                "-c max_connections=100",
            ]
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.directory / "server.log"), "-o", options, "-w", "start")

    def cpu_seconds(self) -> float:
        """CPU used by the server so far: the postmaster, its live backends and those that exited."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        total = _cpu(postmaster, children_that_exited=True)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == postmaster:
                total += _cpu(int(stat.parent.name))
        return total

    def stop(self) -> None:
        if self.data.exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        command = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.directory)
        if check and result.returncode != 0:
            raise RuntimeError(f"{tool} failed with status {result.returncode}: {result.stderr.strip() or result.stdout.strip()}")


def _cpu(pid: int, *, children_that_exited: bool = False) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime, stime, cutime and cstime are fields 14 to 17 of proc(5); fields[0] here is field 3.
    ticks = int(fields[11]) + int(fields[12])
    if children_that_exited:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")
