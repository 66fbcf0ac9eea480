"""`bench/datapath.py --size-mib 8 --repeat 1`: the agent's backup and restore against raw podman."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.bench_scripts import run_bench_script, table_row

pytestmark = pytest.mark.slow


def test_bench_datapath_small_prints_table() -> None:
    result, output = run_bench_script("datapath.py", "--size-mib", "8", "--repeat", "1")

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
