"""Team mode on this machine, without Docker: PostgreSQL, an MLflow tracking server on it, a
Prefect server on it with a process work pool and a worker, and the scheduled retraining
deployment.

    make team-up          # python -m pipelines.team up; then: source team.env
    make team-down        # python -m pipelines.team down: stops them all, keeps the data
    python -m pipelines.team status

Everything lives in `.team/` (git-ignored): the database cluster, MLflow's artifacts (served
by the tracking server: `--serve-artifacts`), each service's log and `state.json` (ports,
pids, the generated passwords). Every service listens on 127.0.0.1 only. MLflow runs its
basic-auth app: the generated admin user and password are in team.env, which also points
MLFLOW_TRACKING_URI and PREFECT_API_URL at the servers, so after `source team.env`,
`make run`, `python -m pipelines.retrain` and `ratchet predict` track to the team's server.
A second `up` reuses the data and starts only what is not running.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ratchet.errors import RatchetError

PORTS = {"postgres": 55432, "mlflow": 5001, "prefect": 4201}  # make ui keeps 5000; Prefect's own 4200
SERVICES = ("worker", "prefect", "mlflow")  # stopped in this order, PostgreSQL last
DATABASES = ("mlflow", "mlflow_auth", "prefect")
POOL = "ratchet"
USER = "ratchet"
START_TIMEOUT_S = 180  # a first start migrates two new databases: ~16 s each on an idle 2-core machine


@dataclass
class Team:
    root: Path                              # the project: params.yaml, dvc.yaml
    dir: Path                               # its state: .team/
    ports: dict[str, int] = field(default_factory=lambda: dict(PORTS))
    secrets: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path, state_dir: Path | None = None, ports: dict[str, int] | None = None) -> "Team":
        """The stack's saved state (ports and passwords stay those of the first `up`), or a new one."""
        root = root.resolve()
        team = cls(root=root, dir=(state_dir or root / ".team").resolve())
        if team.state_file.is_file():
            saved = json.loads(team.state_file.read_text())
            team.ports, team.secrets, team.pids = saved["ports"], saved["secrets"], saved.get("pids", {})
        elif ports:
            team.ports.update(ports)
        for key in ("db", "admin", "flask"):
            team.secrets.setdefault(key, secrets.token_urlsafe(18))
        return team

    state_file = property(lambda self: self.dir / "state.json")
    env_file = property(lambda self: self.root / "team.env")
    pgdata = property(lambda self: self.dir / "postgres")

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_private(self.state_file, json.dumps(
            {"ports": self.ports, "secrets": self.secrets, "pids": self.pids}, indent=2))

    def db_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{USER}:{self.secrets['db']}@127.0.0.1:{self.ports['postgres']}/{database}"

    def env(self) -> dict[str, str]:
        """What team.env exports: where to track and orchestrate, and as whom."""
        return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.ports['mlflow']}",
                "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": self.secrets["admin"],
                "PREFECT_API_URL": f"http://127.0.0.1:{self.ports['prefect']}/api"}

    def process_env(self, **extra: str) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)  # mlflow, prefect and the stages' `ratchet`
        return {**os.environ, **self.env(), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                "PREFECT_HOME": str(self.dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", **extra}


def write_private(path: Path, text: str) -> None:
    """Write a file that holds passwords: readable by its owner only, replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def postgres_bin() -> Path:
    """The server binaries of Debian's postgresql package (/usr/lib/postgresql/<version>/bin,
    off PATH), the newest version; else whatever initdb PATH has."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    if shutil.which("pg_ctl"):
        return Path(shutil.which("pg_ctl")).parent
    raise RatchetError("PostgreSQL server binaries not found (pg_ctl, initdb): `make team-up` installs "
                       "Debian's postgresql package, or install PostgreSQL 13+ yourself")


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as the postgres user there."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child that exited
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def start_postgres(team: Team) -> None:
    bindir, data, port = postgres_bin(), team.pgdata, team.ports["postgres"]
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True)
        pwfile = team.dir / "pgpass.tmp"
        write_private(pwfile, team.secrets["db"] + "\n")
        if os.geteuid() == 0:
            shutil.chown(data, "postgres")
            shutil.chown(pwfile, "postgres")
            if subprocess.run(as_postgres(["test", "-w", str(data), "-a", "-r", str(pwfile)])).returncode != 0:
                raise RatchetError(f"the postgres user cannot reach {data}: PostgreSQL refuses to run as root, so it "
                                   "runs as postgres, and every folder above it must let others in (chmod o+x)")
        try:
            run(as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256",
                             f"--pwfile={pwfile}", "-E", "UTF8", "--no-instructions"]), "initdb", team)
        finally:
            pwfile.unlink(missing_ok=True)
    if not listening(port):
        # Loopback TCP only, no Unix socket (its default folder, /var/run/postgresql, belongs to
        # the system's own server).
        log = team.dir / "postgres.log"
        log.touch()
        if os.geteuid() == 0:
            shutil.chown(log, "postgres")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''"
        run(as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                         "-t", str(START_TIMEOUT_S), "-o", options, "start"]), "pg_ctl start", team)
    import psycopg2

    try:
        conn = psycopg2.connect(team.db_url("postgres"), connect_timeout=10)
    except psycopg2.OperationalError as exc:
        raise RatchetError(f"postgres on 127.0.0.1:{port} refused {USER} ({str(exc).strip().splitlines()[-1]}): "
                           f"another server on that port? (ports: {team.state_file})") from None
    conn.autocommit = True  # CREATE DATABASE runs outside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            existing = {row[0] for row in cur.fetchall()}
            for name in DATABASES:
                if name not in existing:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def run(cmd: list[str], what: str, team: Team) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=team.dir)
    if out.returncode != 0:
        last = (out.stderr or out.stdout).strip().splitlines()
        raise RatchetError(f"{what} failed (exit {out.returncode}): {last[-1] if last else ''}")


def service_command(team: Team, name: str) -> tuple[list[str], dict[str, str], str | None]:
    """How each service starts: the command, its environment, and the URL that answers when
    it is ready (None: the worker, which serves nothing)."""
    if name == "mlflow":
        auth = team.dir / "basic_auth.ini"
        write_private(auth, "[mlflow]\ndefault_permission = READ\n"
                            f"database_uri = {team.db_url('mlflow_auth')}\nadmin_username = {USER}\n"
                            f"admin_password = {team.secrets['admin']}\n"
                            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        (team.dir / "artifacts").mkdir(parents=True, exist_ok=True)
        port = team.ports["mlflow"]
        cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--app-name", "basic-auth",
               "--serve-artifacts", "--artifacts-destination", str(team.dir / "artifacts"), "--workers", "2"]
        # The database URI holds the password: through the environment, not the command line.
        env = team.process_env(MLFLOW_BACKEND_STORE_URI=team.db_url("mlflow"), MLFLOW_AUTH_CONFIG_PATH=str(auth),
                               MLFLOW_FLASK_SERVER_SECRET_KEY=team.secrets["flask"])
        return cmd, env, f"http://127.0.0.1:{port}/health"
    if name == "prefect":
        port = team.ports["prefect"]
        env = team.process_env(PREFECT_SERVER_DATABASE_CONNECTION_URL=team.db_url("prefect", "postgresql+asyncpg"))
        return ["prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, \
            f"http://127.0.0.1:{port}/api/health"
    # The worker runs each flow run as a subprocess in this checkout, with this environment
    # (team.env's tracking server and credentials).
    return ["prefect", "worker", "start", "--pool", POOL, "--type", "process", "--name", f"{POOL}-worker"], \
        team.process_env(), None


def start_service(team: Team, name: str) -> str:
    cmd, env, ready_url = service_command(team, name)
    if alive(team.pids.get(name)) and (ready_url is None or answers(ready_url)):
        return "already running"
    if ready_url and listening(int(ready_url.split(":")[2].split("/")[0])):
        raise RatchetError(f"{name}: port {ready_url.split('/')[2]} is taken by another program "
                           f"(change it in {team.state_file})")
    log = team.dir / f"{name}.log"
    with open(log, "ab") as out:  # detached: it outlives `make team-up`
        proc = subprocess.Popen(cmd, cwd=team.root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    team.pids[name] = proc.pid
    team.save()
    deadline = time.monotonic() + START_TIMEOUT_S
    while ready_url and not answers(ready_url):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            raise RatchetError(f"{name} did not start (see {log}): {tail[0]}")
        time.sleep(1)
    return "started"


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def deploy(team: Team, cron: str | None) -> str:
    """The work pool (if new) and the retrain deployment, registered by pipelines/deploy.py."""
    env = team.process_env()
    prefect = [sys.executable, "-m", "prefect"]
    if subprocess.run([*prefect, "work-pool", "inspect", POOL], env=env, capture_output=True).returncode != 0:
        run_env([*prefect, "work-pool", "create", POOL, "--type", "process"], env, "work-pool create", team)
    out = run_env([sys.executable, "-m", "pipelines.deploy", "--pool", POOL, *(["--cron", cron] if cron else [])],
                  env, "pipelines.deploy", team)
    return out.strip().splitlines()[-1]


def run_env(cmd: list[str], env: dict[str, str], what: str, team: Team) -> str:
    out = subprocess.run(cmd, cwd=team.root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise RatchetError(f"{what} failed (exit {out.returncode}): {lines[-1] if lines else ''}")
    return out.stdout


def up(team: Team, cron: str | None = None, say=print) -> None:
    """Start what is not running, deploy, and write team.env. On a failure the services started
    so far keep running (their logs say why); `down` stops them."""
    team.save()
    t0 = time.monotonic()
    start_postgres(team)
    say(f"postgres  127.0.0.1:{team.ports['postgres']}  databases {', '.join(DATABASES)}  ({team.pgdata})")
    for name in reversed(SERVICES):
        if name == "worker":  # its pool and the deployment first: the worker would make a bare pool
            say(deploy(team, cron))
        state = start_service(team, name)
        where = team.env()["MLFLOW_TRACKING_URI"] if name == "mlflow" else \
            team.env()["PREFECT_API_URL"] if name == "prefect" else f"pool {POOL!r}"
        say(f"{name:<9} {where}  {state}  (log {team.dir / (name + '.log')})")
    write_private(team.env_file, "# Team mode (make team-up): source this file, then make run, "
                  "python -m pipelines.retrain, ratchet predict ...\n"
                  + "".join(f"export {key}={value}\n" for key, value in team.env().items()))
    say(f"wrote {team.env_file.name}; up in {time.monotonic() - t0:.0f} s. Next: source {team.env_file.name}")


def down(team: Team, say=print, timeout_s: float = 30) -> None:
    """Stop the worker and servers (SIGTERM to each process group, SIGKILL after `timeout_s`),
    then PostgreSQL. The data stays in .team/."""
    for name in SERVICES:
        pid = team.pids.pop(name, None)
        if alive(pid):
            stop_group(pid, timeout_s)
            say(f"{name:<9} stopped")
    team.save()
    if (team.pgdata / "postmaster.pid").is_file():
        run(as_postgres([str(postgres_bin() / "pg_ctl"), "-D", str(team.pgdata), "-m", "fast", "-w", "stop"]),
            "pg_ctl stop", team)
        say("postgres  stopped")
    busy = [f"{name} {port}" for name, port in team.ports.items() if listening(port)]
    if busy:
        raise RatchetError(f"still listening after team-down: {', '.join(busy)}")


def stop_group(pid: int, timeout_s: float) -> None:
    for sig, wait in ((15, timeout_s), (9, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive(pid):
            return


def status(team: Team, say=print) -> None:
    say(f"postgres  {'up' if listening(team.ports['postgres']) else 'down'}  127.0.0.1:{team.ports['postgres']}")
    for name in reversed(SERVICES):
        say(f"{name:<9} {'up' if alive(team.pids.get(name)) else 'down'}  pid {team.pids.get(name, '-')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--root", type=Path, default=Path("."), help="the project (default: this folder)")
    parser.add_argument("--cron", help="the deployment's schedule (default: params.yaml's schedule.cron)")
    args = parser.parse_args(argv)
    team = Team.load(args.root)
    try:
        {"up": lambda: up(team, args.cron), "down": lambda: down(team), "status": lambda: status(team)}[args.command]()
    except RatchetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
