"""`bench/datapath.py --size-mib 8 --repeat 1`: the agent's backup and restore against raw podman."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def table_row(stdout: str, operation: str) -> list[str]:
    line = next(line for line in stdout.splitlines() if line.startswith(operation))
    return [cell.strip() for cell in line.split("|")]


def test_bench_datapath_small_prints_table() -> None:
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "bench" / "datapath.py"), "--size-mib", "8", "--repeat", "1"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"

    assert result.returncode == 0, output
    assert "agent median s" in result.stdout, output
    assert "raw median s" in result.stdout, output
    assert "cores " in result.stdout, output
    assert "size 8 MiB (4 MiB random, 4 MiB zeros)" in result.stdout, output

    for operation in ("backup (commit + push)", "restore (pull + run)"):
        cells = table_row(result.stdout, operation)
        assert len(cells) == 5, output
        assert float(cells[1]) > 0, output
        assert float(cells[2]) > 0, output
        assert float(cells[3]) > 0, output
        assert cells[4] == "1", output

    # Each backup run line: side, seconds, commit s, push s, other s, registry blob bytes, manifest type.
    backup_runs = re.findall(
        r"^  (agent|raw) +[\d.]+ +[\d.]+ +[\d.]+ +-?[\d.]+ +(\d+) ", result.stdout, re.MULTILINE
    )
    assert sorted(side for side, _ in backup_runs) == ["agent", "raw"], output

    # Both sides pushed the same layers. The sizes may still differ by a few bytes, because
    # the image config and manifest contain the commit time, whose text length varies.
    sizes = [int(size) for _, size in backup_runs]
    assert max(sizes) - min(sizes) <= 1024, output

    # The script deletes its work directory, which contains the Podman storage and the registry.
    workdir = re.search(r"work directory (\S+)", result.stderr)
    assert workdir is not None, output
    assert not Path(workdir.group(1)).exists(), output
