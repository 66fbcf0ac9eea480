"""Start `sandbox-backup serve` with two benchmark-only changes made from outside the package.

- Every SQL statement the manager sends is counted (SQLAlchemy `before_cursor_execute`) and the
  count is written to the file named by `BENCH_SQL_COUNT_FILE` every 0.2 s, because the shared
  PostgreSQL server may not load pg_stat_statements.
- Redis keys get the prefix in `BENCH_REDIS_KEY_PREFIX`, so the run shares no lock with other
  managers on the same Redis (`serve` has no setting for the prefix).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time

from sqlalchemy import event
from sqlalchemy.engine import Engine

from sandbox_backup.cli.main import app
from sandbox_backup.coordination import factory
from sandbox_backup.manager import service

_statements = 0


def _count_statement(*_args: object) -> None:
    global _statements
    _statements += 1


def _write_count(path: str) -> None:
    while True:
        with open(path + ".tmp", "w", encoding="utf-8") as file:
            file.write(str(_statements))
        os.replace(path + ".tmp", path)
        time.sleep(0.2)


def main() -> None:
    event.listen(Engine, "before_cursor_execute", _count_statement)
    threading.Thread(target=_write_count, args=(os.environ["BENCH_SQL_COUNT_FILE"],), daemon=True).start()
    service.create_coordinator = functools.partial(factory.create_coordinator, key_prefix=os.environ["BENCH_REDIS_KEY_PREFIX"])
    sys.argv = ["sandbox-backup", "serve"]
    app()


if __name__ == "__main__":
    main()
