"""docker-compose.yml, the Dockerfile and deploy/slurm/ against the code they launch.

No Docker engine runs here, so the compose file is checked two ways: `docker-compose config` (the real parser,
when Debian's docker-compose is installed) and each component service's command line through opd's own parser
and config loader, so a renamed verb, a stale config key or an address that points nowhere fails here.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from opd.config import load_config
from opd.launch.cli import _component_config, _parser
from opd.launch.cluster import auto_index
from opd.runtime.prometheus import metrics_port
from tests.conftest import REPO, TINY

COMPOSE = REPO / "docker-compose.yml"
COMPONENTS = {"learner": "learner", "actor": "actor", "teacher-scorer": "scorer"}
SERVICES = {"redis", "prepare", *COMPONENTS, "prometheus", "grafana"}
APP = "/app/"  # where the Dockerfile copies the repository


def _services(env: dict[str, str] | None = None) -> dict:
    """The services, with `${VAR:-default}` interpolated as docker compose does (from `env`, else the default)."""
    env = env or {}
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), COMPOSE.read_text())
    return yaml.safe_load(text)["services"]  # PyYAML resolves the `<<:` merge keys


def _mounts(service: dict) -> dict[str, str]:
    """container path -> source (volume name or host path) of a service's short-syntax volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_compose_file_passes_docker_compose_config():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip(
            "docker-compose not installed: apt-get install --no-install-recommends docker-compose (.ci/run does)"
        )
    out = subprocess.run(
        [binary, "-f", str(COMPOSE), "config"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    services = yaml.safe_load(out.stdout)["services"]
    # docker-compose 1.x lists a profile's services too, 2.x only the active profiles' (two teachers: an env file)
    assert SERVICES <= set(services) <= SERVICES | {"teacher-scorer-2"}
    scorer = services["teacher-scorer"]
    assert "container_name" not in scorer and "ports" not in scorer, "--scale needs neither"
    for name in COMPONENTS:
        assert services[name]["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    redis = services["redis"]
    assert redis["command"][:1] == ["redis-server"]
    assert " ".join(redis["command"]).count("--appendonly yes --appendfsync everysec") == 1
    assert any(v.endswith(":/data:rw") and not v.startswith("/") for v in redis["volumes"]), "a named volume"


@pytest.mark.parametrize("service", ["prepare", *COMPONENTS])
def test_each_command_is_a_valid_opd_command_line(service):
    services = _services()
    spec = services[service]
    args = _parser().parse_args(spec["command"])
    assert args.config.startswith(APP), "configs are read from the image"
    args.config = str(REPO / args.config.removeprefix(APP))
    mounts = _mounts(spec)
    if service == "prepare":
        assert args.verb == "prepare"
        cfg = load_config(args.config, args.overrides)
    else:
        assert args.verb == COMPONENTS[service]
        cfg = _component_config(args)  # what `opd <verb>` checks before starting: run id, ports, known keys
        assert Path(mounts["/runs"]) == Path("runs") and cfg.run.output_dir.is_relative_to("/runs")
        # every container must meet the others at service names of this file
        assert cfg.weight_sync.host in services and cfg.weight_sync.port > 0
        name = "learner" if args.verb == "learner" else f"{args.verb}-{args.index}"
        assert metrics_port(cfg, name) == 9400 and cfg.metrics.host == "0.0.0.0"
    assert cfg.broker.type == "redis"
    assert re.fullmatch(r"redis://([\w-]+):6379/0", cfg.broker.url).group(1) in services
    assert mounts["/cache"] == "cache" and cfg.run.cache_dir == Path("/cache"), "built once by `prepare`"


def test_prometheus_and_grafana_mount_the_repository_files():
    services = _services()
    mounts = {**_mounts(services["prometheus"]), **_mounts(services["grafana"])}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    for source in mounts.values():
        assert (REPO / source).exists(), f"{source} is mounted but missing"
    dashboards = (REPO / mounts["/var/lib/grafana/dashboards"]).glob("*.json")
    assert any(dashboards), "grafana would start without a dashboard"


def test_scaled_replicas_get_distinct_stable_indexes():
    for service in ("actor", "teacher-scorer"):
        args = _parser().parse_args(_services()[service]["command"])
        assert args.index == auto_index(socket.gethostname())
    container_ids = [f"{n:012x}" for n in range(0x3F2A5C000000, 0x3F2A5C000000 + 40 * 7919, 7919)]
    indexes = [auto_index(h) for h in container_ids]
    assert len(set(indexes)) == len(container_ids) and all(0 <= i < 2**31 for i in indexes)
    assert indexes == [auto_index(h) for h in container_ids], "a restarted container keeps its name"
    for bad in ("x", "-1", "1.5"):
        with pytest.raises(SystemExit):
            _parser().parse_args(["scorer", "--config", TINY, "--index", bad])
    assert _parser().parse_args(["actor", "--config", TINY, "--index", "3"]).index == 3


def test_dockerfile_builds_cpu_and_cuda_with_the_project_torch():
    text = (REPO / "Dockerfile").read_text()
    pin = re.search(r'"(torch==[\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert f'"{pin}"' in text, f"the image must install the project's {pin}"
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M) and re.search(r"^FROM base-\$\{VARIANT\}$", text, re.M)
    stages = {name: base for base, name in re.findall(r"^FROM (\S+) AS (base-\w+)$", text, re.M)}
    assert stages["base-cpu"].startswith("python:3.11") and stages["base-cuda"] == "${CUDA_BASE}"
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:\S+runtime\S*$", text, re.M)
    assert "https://download.pytorch.org/whl/cpu" in text
    assert 'ENTRYPOINT ["opd"]' in text and "COPY . /app" in text  # compose's commands are opd's argv
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {"runs/", ".cache/", ".venv*"} <= set(ignored)


def test_cluster_resolve_writes_one_run_config_and_refuses_a_second(tmp_path, capsys):
    from opd.launch.cluster import main as cluster

    run_dir = tmp_path / "run"
    assert cluster(["resolve", TINY, "broker.type=redis", f"run.output_dir={run_dir}"]) == 0
    assert Path(capsys.readouterr().out.strip()) == run_dir / "config.yaml"
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.run.run_id and cfg.weight_sync.port > 0 and cfg.run.cache_dir.is_absolute()
    assert cluster(["resolve", TINY, "broker.type=redis", f"run.output_dir={run_dir}"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cluster(["resolve", TINY, f"run.output_dir={tmp_path / 'other'}"]) == 2
    assert "broker.type" in capsys.readouterr().err


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "deploy" / "slurm").glob("*.s*")))
def test_slurm_scripts_parse(script):
    out = subprocess.run(
        ["bash", "-n", str(REPO / "deploy" / "slurm" / script)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
