"""A throwaway PostgreSQL cluster for tests: ``initdb`` in a temp folder, a loopback port, trust auth.

The server binaries come from the system (Debian's postgresql package; ``.ci/system-packages.sh``
installs it where it is missing). PostgreSQL refuses to run as root: as root the cluster is made
and run by the ``postgres`` system user, in a folder it owns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((str(v / name) for v in versions if (v / name).exists()), None)


def available() -> bool:
    """initdb and pg_ctl exist, and (as root) a ``postgres`` user to run them."""
    if not (_bin("initdb") and _bin("pg_ctl")):
        return False
    if os.geteuid() != 0:
        return True
    return subprocess.run(["id", "postgres"], capture_output=True).returncode == 0 and bool(shutil.which("runuser"))


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres_cluster(port: int, database: str = "mlflow") -> Iterator[str]:
    """Start a cluster on 127.0.0.1:``port`` with an empty ``database``; yields its SQLAlchemy URL."""
    folder = Path(tempfile.mkdtemp(prefix="llm2clip-pg-"))
    data = folder / "data"
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    os.chmod(folder, 0o755)
    run = lambda cmd: subprocess.run(_as_owner(cmd), check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        run([_bin("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-instructions"])
        run([_bin("pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
             f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"])
        try:
            run([_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database])
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
        finally:
            run([_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
