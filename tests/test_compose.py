"""docker-compose.yml: no Docker engine runs here, so its structure is checked instead."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from seqtune.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def test_services_and_start_order() -> None:
    assert set(SERVICES) == {"postgres", "migrate", "api", "worker"}
    assert "pg_isready" in " ".join(SERVICES["postgres"]["healthcheck"]["test"])
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert (
            SERVICES[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )
    assert "/readyz" in " ".join(SERVICES["api"]["healthcheck"]["test"])


def test_commands_are_real_seqtune_commands() -> None:
    parser = build_parser()
    for name in ("migrate", "api", "worker"):
        cmd = SERVICES[name]["command"]
        assert cmd[0] == "seqtune"
        parser.parse_args(cmd[1:])  # exits (fails the test) on an unknown option
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["seqtune", "serve"' in dockerfile and "pip install" in dockerfile


def test_every_app_container_shares_the_database_and_data_volume() -> None:
    for name in ("migrate", "api", "worker"):
        env = SERVICES[name]["environment"]
        assert env["SEQTUNE_DATABASE_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in env["SEQTUNE_DATABASE_URL"]
        assert "data:/data" in SERVICES[name]["volumes"]
    assert set(COMPOSE["volumes"]) == {"pgdata", "data"}
    assert SERVICES["api"]["environment"]["SEQTUNE_MIGRATE_ON_START"] == "false"


def test_workers_reserve_a_gpu_and_can_scale() -> None:
    worker = SERVICES["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # `docker compose up --scale worker=N` needs no fixed name and no published port.
    assert "container_name" not in worker and "ports" not in worker
    assert worker["stop_grace_period"] == "2m"


def test_the_image_holds_every_package_and_the_server_and_worker_extras() -> None:
    """The image builds: it copies every top-level package pyproject.toml ships (a package
    missing from the build context fails `pip install`), and installs the extra compose asks
    for, which brings both the service's and the worker's dependencies."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./\1$", dockerfile, flags=re.MULTILINE))
    shipped = {p.split(".")[0] for p in pyproject["tool"]["setuptools"]["packages"]}
    assert shipped <= copied, f"the Dockerfile does not copy {sorted(shipped - copied)}"
    extra = SERVICES["api"]["build"]["args"]["EXTRAS"]
    assert all(SERVICES[n]["build"]["args"]["EXTRAS"] == extra for n in ("migrate", "worker"))
    assert "pip install" in dockerfile and '".[${EXTRAS}]"' in dockerfile
    extras = pyproject["project"]["optional-dependencies"]
    assert {"seqtune[server]", "seqtune[worker]"} <= set(extras[extra])
