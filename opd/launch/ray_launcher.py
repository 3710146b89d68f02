"""`opd run --launcher ray`: the same run as `opd run`, with each component placed on a Ray cluster.

Each component stays exactly the `opd <verb>` process it is everywhere else: a small Ray actor, reserving the
component's resources from the `ray:` config section, starts that process on its node and owns it. So the
components need no Ray code, and cleanup has one chain: the process dies with its Ray actor
(PR_SET_PDEATHSIG), the actors die with this driver, and the local Ray this command started is shut down at the
end. This file is only a `Spawner` (opd/launch/supervisor.py): the watch loop, scaling and report are the
launcher's (opd/launch/launcher.py), reached through a ProcessHandle, so both launchers write the same run
directory and summary.

The learner's ranks (`learner.num_ranks` > 1) are placed together: one placement group of N bundles (one per
rank, each the `ray.learner` resources, `ray.learner_placement` strategy: PACK by default, so one node when it
fits), rank r's actor in bundle r. Each rank gets its place in the group as a scheduler gives it, by environment
(RANK, WORLD_SIZE, LOCAL_RANK=0: Ray gives each actor its own GPUs; MASTER_ADDR: the node of bundle 0, where
rank 0 runs; the port is learner.master_port, picked when the run was resolved).

Ray moves only strings and exit codes between the driver and its actors; the components talk over the broker
as always. Every component reads and writes the run directory, so on several nodes it must be on storage they
share at the same path, with `broker.type: redis` and a `weight_sync.host` the actors can reach.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from opd.config import Config
from opd.launch.rundir import LaunchError
from opd.launch.supervisor import Slot

LOCAL_OBJECT_STORE_BYTES = 128 << 20  # components never put data in Ray's object store
POLL_TIMEOUT_S = 30.0


def _ray():
    try:
        import ray
    except ImportError:
        raise LaunchError('--launcher ray needs Ray: pip install -e ".[ray]"') from None
    return ray


class ComponentHost:
    """A Ray actor owning one component process on its node (made remote in `_host_class`)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self, cmd: list[str], env_extra: dict[str, str], log_path: str, cwd: str) -> int:
        # Our own interpreter and environment (Ray's CUDA_VISIBLE_DEVICES included), plus what the launcher set;
        # the process dies with this actor, not with the driver it never saw.
        env = {**os.environ, **env_extra, "OPD_PARENT_PID": str(os.getpid())}
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, *cmd[1:]],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()


class RayProcess:
    """The subset of subprocess.Popen the launcher uses, for a process owned by a ComponentHost."""

    def __init__(self, ray, host, name: str, pid: int):
        self.ray, self.host, self.name, self.pid = ray, host, name, pid
        self.returncode: int | None = None

    def _get(self, ref, timeout: float):
        try:
            return self.ray.get(ref, timeout=timeout)
        except self.ray.exceptions.RayActorError:
            # The actor (or its node) died, and the process with it (PR_SET_PDEATHSIG).
            self.returncode = -int(signal.SIGKILL)
            return self.returncode
        except self.ray.exceptions.GetTimeoutError:
            return None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._get(self.host.poll.remote(), POLL_TIMEOUT_S)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            self._get(self.host.send_signal.remote(int(sig)), POLL_TIMEOUT_S)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            limit = POLL_TIMEOUT_S if timeout is None else timeout
            code = self._get(self.host.wait.remote(limit), limit + POLL_TIMEOUT_S)
            if code is None:
                raise subprocess.TimeoutExpired(self.name, limit)
            self.returncode = code
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            self.returncode = self._get(self.host.kill.remote(), POLL_TIMEOUT_S)


class RaySpawner:
    """The Spawner of `--launcher ray`: joins (or starts) Ray, then one ComponentHost per component, with that
    role's `ray.<role>` resources; `close` kills the hosts and leaves Ray."""

    def __init__(self, cfg: Config, log: Callable[..., None]):
        self.cfg, self.log, self.ray = cfg, log, _ray()
        self._init_ray()
        self.host_class = self.ray.remote(max_restarts=0)(ComponentHost)
        self.hosts: list = []
        self.rank_hosts: dict[int, object] = {}  # learner rank -> its host actor (in that rank's bundle)
        self.learner_pg = None  # the learner ranks' placement group, made with the first rank
        self.master_addr = ""  # the node of bundle 0 (rank 0): the ranks' rendezvous host

    def _init_ray(self) -> None:
        ray, rc = self.ray, self.cfg.ray
        if rc.address is None:
            ray.init(
                num_cpus=rc.num_cpus,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
                log_to_driver=False,
            )
            self.log(f"ray: started a local Ray ({ray.cluster_resources().get('CPU', 0):g} CPUs)")
        else:
            ray.init(address=rc.address, log_to_driver=False)
            self.log(f"ray: joined {rc.address} ({ray.cluster_resources()})")

    def start(self, slot: Slot, argv: list[str], env: dict[str, str], log_path: Path) -> RayProcess:
        res = getattr(self.cfg.ray, slot.role)
        options = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
        env_extra = {k: v for k, v in env.items() if k.startswith("OPD_") or os.environ.get(k) != v}
        ranked = slot.role == "learner" and self.cfg.learner.num_ranks > 1
        if ranked:
            argv = self._as_rank(slot.index, argv, env_extra, options)
        host = self.host_class.options(**options).remote()
        self.hosts.append(host)
        if ranked:
            self.rank_hosts[slot.index] = host
        timeout = self.cfg.ray.placement_timeout_s
        try:
            pid = self.ray.get(
                host.start.remote(argv, env_extra, str(Path(log_path).resolve()), os.getcwd()),
                timeout=timeout,
            )
        except self.ray.exceptions.GetTimeoutError:
            self.ray.kill(host)
            self.hosts.remove(host)
            if ranked:
                del self.rank_hosts[slot.index]
            raise LaunchError(
                f"Ray did not place {slot.name} within ray.placement_timeout_s={timeout:g}s: it asks for "
                f"ray.{slot.role}.num_cpus={res.num_cpus:g}, num_gpus={res.num_gpus:g}, and the cluster has "
                f"{self.ray.available_resources()} free; lower the request or add resources"
            ) from None
        self.log(f"ray: {slot.name} placed (pid {pid}, {res.num_cpus:g} CPU, {res.num_gpus:g} GPU)")
        return RayProcess(self.ray, host, slot.name, pid)

    # ---------------------------------------------------------------------------------- learner ranks
    def _as_rank(self, rank: int, argv: list[str], env: dict[str, str], options: dict) -> list[str]:
        """Rank `rank`'s actor: into bundle `rank` of the learner's placement group, its place in the group by
        environment (LOCAL_RANK 0: Ray shows each actor only its own GPUs, so `--index` cannot be its device);
        returns its argv without `--index`. A rank placed again (a restart) first frees its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = self._learner_group()
        old = self.rank_hosts.pop(rank, None)
        if old is not None:  # its process has ended (or was stopped): the bundle holds one actor at a time
            self._kill(old)
            self.hosts.remove(old)
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=rank
        )
        env.update(RANK=str(rank), WORLD_SIZE=str(self.cfg.learner.num_ranks), LOCAL_RANK="0")
        if self.cfg.learner.master_addr is None:
            env["MASTER_ADDR"] = self.master_addr
        i = argv.index("--index")
        return argv[:i] + argv[i + 2 :]

    def _learner_group(self):
        """The placement group of the learner ranks, made (and waited for) on the first rank's start."""
        if self.learner_pg is not None:
            return self.learner_pg
        from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

        res, n, strategy = self.cfg.ray.learner, self.cfg.learner.num_ranks, self.cfg.ray.learner_placement
        bundle = {k: v for k, v in (("CPU", res.num_cpus), ("GPU", res.num_gpus)) if v > 0} or {"CPU": 0.01}
        pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy, name="opd-learner-ranks")
        timeout = self.cfg.ray.placement_timeout_s
        try:
            self.ray.get(pg.ready(), timeout=timeout)
        except self.ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise LaunchError(
                f"Ray could not place the {n} learner ranks together within ray.placement_timeout_s={timeout:g}s: "
                f"{n} bundles of {bundle} ({strategy}, ray.learner_placement) and the cluster has "
                f"{self.ray.available_resources()} free; lower ray.learner.num_cpus/num_gpus, learner.num_ranks, "
                "or choose ray.learner_placement: SPREAD"
            ) from None
        node = placement_group_table(pg)["bundles_to_node_id"][0]
        self.master_addr = next(n["NodeManagerAddress"] for n in self.ray.nodes() if n["NodeID"] == node)
        self.learner_pg = pg
        self.log(f"ray: {n} learner ranks placed together ({strategy}; rendezvous on {self.master_addr})")
        return pg

    def _kill(self, host) -> None:
        try:
            self.ray.kill(host)
        except Exception:  # already gone with its node
            pass

    def close(self) -> None:
        """Kill every host actor (their processes die with them if the launcher has not stopped them yet), then
        leave Ray: a local Ray this spawner started is shut down (raylet, GCS, workers), a joined cluster runs on."""
        for host in self.hosts:
            self._kill(host)
        self.hosts.clear()
        self.rank_hosts.clear()
        if self.learner_pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.learner_pg)
            except Exception:  # Ray is already gone
                pass
            self.learner_pg = None
        self.ray.shutdown()
