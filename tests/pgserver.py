"""A real PostgreSQL server for the tests, in a folder of its own (data, log, unix socket), on a
free TCP port of 127.0.0.1, trusting local connections, with one database; stdlib only, so CI can
start it with the system's python3 before the virtual environment exists:

    python3 -m tests.pgserver start DIR   # prints the server's SQLAlchemy URL
    python3 -m tests.pgserver stop DIR

The binaries (initdb, pg_ctl, createdb) are taken from PATH, else from the newest
/usr/lib/postgresql/*/bin (where Debian's packages put them). PostgreSQL refuses to run as root,
so as root they run as the `postgres` user (which the Debian packages create) and DIR is given to
that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

DATABASE = "seqlab_test"
SERVER_USER = "postgres"  # the server's user when run as root, and the database's superuser
TOOLS = ("initdb", "pg_ctl", "createdb")


class PostgresError(RuntimeError):
    """The server could not be started or stopped; the message says why."""


def find_tool(name: str) -> Path | None:
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else -1,
    )
    return Path(found[-1]) if found else None


def missing_tools() -> list[str]:
    return [name for name in TOOLS if find_tool(name) is None]


def _run(args: list[str], what: str) -> None:
    if os.geteuid() == 0:
        args = ["runuser", "-u", SERVER_USER, "--", *args]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise PostgresError(
            f"{what} failed (exit {done.returncode}): {' '.join(args)}\n{done.stdout}{done.stderr}"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_folder() -> Path:
    """A new empty folder under the system's temporary folder, short enough for a unix socket's
    path (about 100 characters at most)."""
    return Path(tempfile.mkdtemp(prefix="seqlab-pg-"))


def start(folder: str | os.PathLike) -> str:
    """Make a cluster in `folder` (which must be empty or absent), start it and create the
    database; returns its SQLAlchemy URL (psycopg 3), also written to folder/url."""
    missing = missing_tools()
    if missing:
        raise PostgresError(
            f"PostgreSQL's {', '.join(missing)} not found on PATH or in "
            "/usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)"
        )
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise PostgresError(f"{folder} is not empty; give a new folder for the server")
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise PostgresError(
                f"running as root, and there is no {SERVER_USER!r} user to run PostgreSQL as "
                "(the Debian packages create it)"
            ) from None
        os.chown(folder, user.pw_uid, user.pw_gid)
    data, log = folder / "data", folder / "server.log"
    port = _free_port()
    tool = {name: str(find_tool(name)) for name in TOOLS}
    _run(
        [tool["initdb"], "-D", str(data), "-U", SERVER_USER, "--auth=trust", "-E", "UTF8"]
        + ["--locale=C", "--no-sync"],
        f"initdb in {data} (is {folder} reachable by the {SERVER_USER!r} user?)",
    )
    # fsync off: a test server's data need not survive a crash of the machine
    options = (
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
    )
    _run(
        [tool["pg_ctl"], "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options, "start"],
        f"starting PostgreSQL (its log: {log})",
    )
    _run(
        [tool["createdb"], "-h", "127.0.0.1", "-p", str(port), "-U", SERVER_USER, DATABASE],
        "createdb",
    )
    url = f"postgresql+psycopg://{SERVER_USER}@127.0.0.1:{port}/{DATABASE}"
    (folder / "url").write_text(url + "\n")
    return url


def stop(folder: str | os.PathLike) -> None:
    """Stop the server of `folder` (immediately: a test server's data are thrown away)."""
    data = Path(folder).resolve() / "data"
    if not (data / "postmaster.pid").exists():
        return
    _run(
        [str(find_tool("pg_ctl")), "-D", str(data), "-m", "immediate", "-w", "stop"], "pg_ctl stop"
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python3 -m tests.pgserver start|stop DIR", file=sys.stderr)
        return 2
    command, folder = argv
    try:
        if command == "start":
            print(start(folder))
        else:
            stop(folder)
    except PostgresError as e:
        print(f"tests.pgserver {command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
