"""docker-compose.yml and .env.example, checked by reading them (no Docker engine here)."""

import re
from pathlib import Path

import pytest
import yaml

from core.settings import ApiSettings, WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    f"FERRY_{name.upper()}" for cls in (ApiSettings, WorkerSettings) for name in cls.model_fields
}
COMPOSE_ONLY = {"POSTGRES_PASSWORD", "FERRY_MODELS_DIR", "FLOWER_PORT"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_healthchecks(compose: dict) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "flower"} <= set(services)
    for name in ("postgres", "redis", "api"):
        assert services[name]["healthcheck"]["test"], name
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"


def test_worker_reserves_a_gpu_and_scales(compose: dict) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["build"]["args"]["ENGINE"] == "gpu"
    # `--scale worker=N` needs no fixed name and no published port.
    assert "container_name" not in worker and "ports" not in worker


def test_every_variable_passed_is_a_setting(compose: dict) -> None:
    passed = {
        key
        for service in compose["services"].values()
        for key in (service.get("environment") or {})
        if key.startswith("FERRY_")
    }
    assert passed, "the compose file passes no FERRY_ settings"
    assert passed <= SETTINGS, passed - SETTINGS


def test_env_example_lists_every_setting() -> None:
    listed = set()
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.lstrip("# ").strip()
        if "=" in line and line.split("=", 1)[0].isupper():
            listed.add(line.split("=", 1)[0])
    assert listed - COMPOSE_ONLY == SETTINGS


def test_env_example_ships_the_settings_defaults() -> None:
    """Copied to .env, it changes nothing: what ships is what the suite's workers run."""
    for cls in (ApiSettings, WorkerSettings):
        assert cls(_env_file=ROOT / ".env.example") == cls(_env_file=None), cls.__name__


def test_compose_ships_the_settings_defaults(compose: dict) -> None:
    defaults = {
        **ApiSettings(_env_file=None).model_dump(),
        **WorkerSettings(_env_file=None).model_dump(),
    }
    checked = 0
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            found = re.fullmatch(r"\$\{(FERRY_\w+):-(.*)\}", str(value))
            if not found or found[1] != key:
                continue
            setting = key.removeprefix("FERRY_").lower()
            default = defaults[setting]
            shipped = type(default)(found[2]) if found[2] or default == "" else None
            assert shipped == default, (name, key, found[2], default)
            checked += 1
    assert checked >= 8, checked


def test_dockerfile_installs_the_engine_build_it_is_given() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'pip install ".[${ENGINE}]"' in dockerfile
    assert "ferry model prepare" in dockerfile
    assert 'ENTRYPOINT ["ferry"]' in dockerfile
