"""Several "hosts" on one machine: Linux network namespaces joined by veth pairs to a bridge, for multi-host fault
tests (tests/e2e/test_multihost_faults.py).

Each host is a namespace with its own loopback and one interface, `eth0`, whose peer sits on a bridge in the root
namespace. The bridge holds the subnet's .254 address, so the test process (root namespace) reaches every host
the way an operator's laptop would reach a cluster. Every name carries a random token and the subnet is one free
/24 of 10.231.0.0/16, so parallel runs do not clash; `close()` removes everything this object made, and only that.

Faults, all on links this object made:
- `link_down(host)` / `link_up(host)`: the host's cable is pulled (`ip link set <veth> down`).
- `impair(host, delay_s, loss)` / `clear(host)`: traffic towards the host is delayed and randomly dropped, the
  semantics of `tc qdisc add dev <veth> root netem delay ... loss ...` on its bridge-side veth. Kernels built
  without sch_netem (this CI's is one) get the same from a small forwarder process (`python3 -m tests.netns
  forward`) spliced into the link with AF_PACKET sockets.
- `partition(host, peer)` / `heal(host)`: every IP packet between the two is silently dropped, both ways, by tc
  filters on the host's eth0 that redirect them to an interface that is down (needs only cls_u32 and
  act_mirred, which kernels without act_gact or nftables still have).
"""

from __future__ import annotations

import fcntl
import heapq
import os
import random
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = Path("/run/lock/opd-netns.lock")  # serialises the choice of a free subnet between parallel runs
ROOT_HOST = 254  # the root namespace's address on the bridge: 10.231.<k>.254


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a reason to skip with), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    missing = [tool for tool in ("ip", "tc", "ss") if shutil.which(tool) is None]
    if missing:
        return f"iproute2 is not installed ({', '.join(missing)} missing; apt-get install iproute2, .ci/run does)"
    name = f"opdprobe-{secrets.token_hex(3)}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns add` fails here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    """One iproute2/tc command; a failure names the command and its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _die_with_test() -> None:
    """In the child before exec: SIGKILL when the test process dies, even by SIGKILL (PR_SET_PDEATHSIG survives
    `ip netns exec`, which execs the program), so a killed test leaves no component running on a host."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Net:
    """Hosts (network namespaces) on one bridge. Use as a context manager or call close() in a finalizer."""

    def __init__(self, hosts: list[str]):
        self.token = secrets.token_hex(3)
        self.hosts = list(hosts)
        self.bridge = f"opd{self.token}"
        self.procs: list[subprocess.Popen] = []
        self.forwarders: dict[str, tuple[subprocess.Popen, str]] = {}
        self.netem: set[str] = set()
        self.subnet: str | None = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ names and addresses
    def ns(self, host: str) -> str:
        return f"opdnet-{self.token}-{host}"

    def veth(self, host: str) -> str:
        """The host's cable as seen from the bridge (root namespace); at most 15 characters."""
        return f"opd{self.token}{self.hosts.index(host)}"

    def addr(self, host: str) -> str:
        return f"{self.subnet}.{ROOT_HOST if host == 'root' else self.hosts.index(host) + 1}"

    # ------------------------------------------------------------------ building and removing
    def _free_subnet(self) -> str:
        used = sh("ip", "-4", "addr", "show").stdout
        for k in random.sample(range(256), 256):
            if f"10.231.{k}." not in used:
                return f"10.231.{k}"
        raise RuntimeError("no free /24 left in 10.231.0.0/16")

    def _build(self) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held until the bridge owns its address
            self.subnet = self._free_subnet()
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{self.addr('root')}/24", "dev", self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
        for host in self.hosts:
            ns, veth = self.ns(host), self.veth(host)
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p", "netns", ns)
            sh("ip", "link", "set", veth, "master", self.bridge, "up")
            sh("ip", "-n", ns, "link", "set", f"{veth}p", "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Stop what was started in the hosts (by PID), then remove namespaces, forwarders and the bridge."""
        for proc in [*self.procs, *(p for p, _ in self.forwarders.values())]:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for host in self.hosts:
            sh("ip", "netns", "del", self.ns(host), check=False)  # takes eth0 and its bridge-side peer along
            sh("ip", "link", "del", self.veth(host), check=False)
            sh("ip", "link", "del", f"{self.veth(host)}i", check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ processes
    def popen(self, host: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start `argv` on `host` (`ip netns exec`, which execs it: the PID is the program's), output to `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(host), *argv],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_test,
            )
        self.procs.append(proc)
        return proc

    def run(self, host: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns(host), *cmd, check=check)

    # ------------------------------------------------------------------ faults
    def link_down(self, host: str) -> None:
        sh("ip", "link", "set", self.veth(host), "down")

    def link_up(self, host: str) -> None:
        sh("ip", "link", "set", self.veth(host), "up")

    def impair(self, host: str, delay_s: float, loss: float, seed: int = 0) -> str:
        """Delay and drop traffic towards `host`; returns how ("netem" or "forwarder")."""
        veth = self.veth(host)
        netem = sh(
            "tc", "qdisc", "add", "dev", veth, "root", "netem",
            "delay", f"{delay_s * 1000:.0f}ms", "loss", f"{loss * 100:g}%",
            check=False,
        )  # fmt: skip
        if netem.returncode == 0:
            self.netem.add(host)
            return "netem"
        inner = f"{veth}i"  # the forwarder's own port on the bridge; its peer {veth}j is where it reads
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", f"{veth}j")
        sh("ip", "link", "set", f"{veth}j", "up")
        sh("ip", "link", "set", inner, "master", self.bridge, "up")
        sh("ip", "link", "set", veth, "nomaster")
        sh("ip", "link", "set", veth, "arp", "off")  # the root namespace must not answer ARP on the loose end
        cmd = [
            sys.executable,
            "-m",
            "tests.netns",
            "forward",
            veth,
            f"{veth}j",
            str(delay_s),
            str(loss),
            str(seed),
        ]
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_test
        )
        self.forwarders[host] = (proc, inner)
        time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"the impairment forwarder for {host} exited with {proc.returncode}")
        return "forwarder"

    def clear(self, host: str) -> None:
        """Undo impair(): the link is direct again."""
        veth = self.veth(host)
        if host in self.netem:
            sh("tc", "qdisc", "del", "dev", veth, "root")
            self.netem.discard(host)
            return
        proc, inner = self.forwarders.pop(host)
        proc.kill()
        proc.wait(10)
        sh("ip", "link", "set", veth, "arp", "on")
        sh("ip", "link", "set", veth, "master", self.bridge)
        sh("ip", "link", "del", inner)

    def partition(self, host: str, peer: str) -> None:
        """Drop every IP packet between host and peer (both ways, silently: connections time out)."""
        ns, other = self.ns(host), self.addr(peer)
        sh("ip", "-n", ns, "link", "add", "sink", "type", "ifb")  # left down: what is sent to it is dropped
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "clsact")
        for hook, field in (("egress", "dst"), ("ingress", "src")):
            sh(
                "ip", "netns", "exec", ns, "tc", "filter", "add", "dev", "eth0", hook, "protocol", "ip",
                "u32", "match", "ip", field, f"{other}/32", "action", "mirred", "egress", "redirect", "dev", "sink",
            )  # fmt: skip

    def heal(self, host: str) -> None:
        ns = self.ns(host)
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "clsact")
        sh("ip", "-n", ns, "link", "del", "sink")

    def reachable(self, host: str, peer: str, port: int, timeout_s: float = 1.0) -> bool:
        """Whether a TCP connection from host to peer:port opens (a probe for faults and their undoing)."""
        code = f"import socket; socket.create_connection(({self.addr(peer)!r}, {port}), timeout={timeout_s})"
        return self.run(host, sys.executable, "-c", code, check=False).returncode == 0


# ---------------------------------------------------------------------- a run's components on the hosts


def component_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every process started on a host: the one place to add what a component started by hand
    needs (e.g. a weight-sync secret, through `extra`). One intra-op thread each (2 cores shared by the run)."""
    env = {k: v for k, v in os.environ.items() if k != "OPD_PARENT_PID"}  # no launcher owns these processes
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("GLOO_SOCKET_IFNAME", None)  # weight sync must find its interface from weight_sync.host alone
    env.update(extra or {})
    return env


def start_redis(net: Net, host: str, workdir: Path, binary: str, port: int = 6379) -> str:
    """redis-server on `host`, bound to that host's address only, AOF on (everysec); returns its URL once it
    answers from the root namespace (through the bridge)."""
    import redis

    workdir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", net.addr(host), "--dir", str(workdir), "--save", ""]
    argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
    proc = net.popen(host, argv, component_env(), workdir / "redis.log")
    url = f"redis://{net.addr(host)}:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return url
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server on {host} did not answer: {(workdir / 'redis.log').read_text()}"
                ) from None
            time.sleep(0.1)


def start_component(
    net: Net, host: str, verb: str, config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`python -m opd <verb> --config <config> <args>` on `host`, as an operator starts one on each machine, with
    `env` (default: component_env()); output to <run dir>/logs/netns-<host>.log."""
    argv = [sys.executable, "-m", "opd", verb, "--config", str(config), *args]
    env = component_env() if env is None else env
    return net.popen(host, argv, env, config.parent / "logs" / f"netns-{host}.log")


def listening(net: Net, host: str, port: int) -> list[str]:
    """The local addresses `host` listens on at TCP `port` (`ss`, from iproute2): "*" or "0.0.0.0" for every
    interface, else the one address bound."""
    out = net.run(host, "ss", "-ltnH").stdout
    found = [line.split()[3].rsplit(":", 1) for line in out.splitlines() if len(line.split()) >= 4]
    return [addr for addr, p in found if p == str(port)]


# ---------------------------------------------------------------------- the userspace netem
SOL_PACKET = 263  # not exported by Python's socket module
PACKET_IGNORE_OUTGOING = 23
PACKET_VNET_HDR = 15
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


def _raw(ifname: str) -> socket.socket:
    """An AF_PACKET socket on one interface, with virtio-net headers so GSO super-frames pass whole."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


def forward(host_side: str, bridge_side: str, delay_s: float, loss: float, seed: int) -> None:
    """Relay frames between two interfaces: host-bound ones after `delay_s`, each dropped with probability
    `loss`; the others at once. Runs until killed."""
    rng = random.Random(seed)
    to_host, to_bridge = _raw(host_side), _raw(bridge_side)
    due: list[tuple[float, int, bytes]] = []
    n = 0
    while True:
        wait = max(0.0, due[0][0] - time.monotonic()) if due else 1.0
        ready, _, _ = select.select([to_host, to_bridge], [], [], wait)
        for sock in ready:
            for _ in range(64):
                try:
                    frame, where = sock.recvfrom(1 << 17)
                except OSError:  # nothing more to read, or the link is down for now
                    break
                if where[2] == PACKET_OUTGOING:
                    continue
                if sock is to_host:
                    _send(to_bridge, frame)
                elif rng.random() >= loss:
                    n += 1
                    heapq.heappush(due, (time.monotonic() + delay_s, n, frame))
        while due and due[0][0] <= time.monotonic():
            _send(to_host, heapq.heappop(due)[2])


def _send(sock: socket.socket, frame: bytes) -> None:
    try:
        sock.send(frame)
    except OSError:  # the link is down or the queue full: the frame is lost, as on a wire
        pass


if __name__ == "__main__":
    if sys.argv[1:2] == ["forward"]:
        a, b, d, p, seed = sys.argv[2:7]
        forward(a, b, float(d), float(p), int(seed))
    else:
        sys.exit(
            f"usage: python3 -m tests.netns forward HOST_IF BRIDGE_IF DELAY_S LOSS SEED (got {sys.argv[1:]})"
        )
