"""docker-compose.yml, the Dockerfile and .env.example, checked by reading them (no Docker engine
here): the compose file as `docker compose` interpolates it; Redis' command line and healthcheck
run by the shell as in their container."""

import re
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from kombu.utils.url import url_to_parts

from bench.stack import free_port
from core.settings import ApiSettings, WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    f"FERRY_{name.upper()}" for cls in (ApiSettings, WorkerSettings) for name in cls.model_fields
}
# What .env must set for `docker compose up`: no default, no password anyone can guess.
REQUIRED = {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "FERRY_SECRET_KEY"}
COMPOSE_ONLY = {name for name in REQUIRED if not name.startswith("FERRY_")} | {
    "FERRY_MODELS_DIR",
    "FLOWER_PORT",
}
SECRETS = {
    "POSTGRES_PASSWORD": "pgSecret1",
    "REDIS_PASSWORD": "redisSecret2",
    "FLOWER_BASIC_AUTH": "admin:flowerSecret3",
    "FERRY_SECRET_KEY": "sealingSecret4",
}
COMPILERS = {"gcc", "g++", "clang", "cc", "c++", "build-essential", "make"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


class Required(Exception):
    """A `${VAR:?message}` whose variable is unset or empty: compose refuses to start."""


_VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """`value` (the parsed compose file) with variables replaced as `docker compose` does:
    ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$ for a dollar."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def one(found: re.Match) -> str:
        if found[1]:
            return "$"
        name, operator, argument = found[2] or found[5], found[3], found[4]
        present = env.get(name)
        if operator is not None and operator.startswith(":") and present == "":
            present = None
        if present is not None:
            return present
        if operator in (":?", "?"):
            raise Required(f"{name}: {argument}")
        return argument if operator in (":-", "-") else ""

    return _VARIABLE.sub(one, value)


@pytest.fixture(scope="module")
def deployed(compose: dict) -> dict:
    """The compose file as `docker compose up` reads it, with .env setting the secrets."""
    return interpolate(compose, SECRETS)


def _env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            name, value = line.split("=", 1)
            values[name] = value
    return values


def _dockerfile_stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continued lines joined, comments dropped), by stage name."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    text = (ROOT / "Dockerfile").read_text()
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("FROM "):
            current = stages.setdefault(line.split()[-1], [])
        current.append(line)
    return stages


def _installed_by_apt(instruction: str) -> set[str]:
    """The packages an instruction installs with apt-get."""
    packages: set[str] = set()
    for command in re.split(r"&&|;|\|\|", instruction):
        words = command.split()
        if "apt-get" in words and "install" in words:
            packages |= {w for w in words[words.index("install") + 1 :] if not w.startswith("-")}
    return packages


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


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_compose_refuses_to_start_without_each_secret(compose: dict, name: str) -> None:
    without = {k: v for k, v in SECRETS.items() if k != name}
    with pytest.raises(Required, match=name):
        interpolate(compose, without)
    with pytest.raises(Required, match=name):
        interpolate(compose, {**without, name: ""})


def test_env_example_leaves_the_secrets_to_set() -> None:
    """Copied to .env unedited, it starts nothing with a password everyone knows."""
    values = _env_example()
    assert {name: values[name] for name in REQUIRED} == dict.fromkeys(REQUIRED, "")


def test_every_service_gets_the_passwords(deployed: dict) -> None:
    services = deployed["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pgSecret1"
    for name in ("migrate", "api", "worker"):
        env = services[name]["environment"]
        assert urlsplit(env["FERRY_DATABASE_URL"]).password == "pgSecret1", name
        # As redis-py (the API, the workers) and kombu (Celery's broker) read the URL.
        url = env["FERRY_REDIS_URL"]
        assert redis.Redis.from_url(url).connection_pool.connection_kwargs["password"] == (
            "redisSecret2"
        )
        assert url_to_parts(url).password == "redisSecret2", name
    flower = services["flower"]["environment"]
    assert url_to_parts(flower["CELERY_BROKER_URL"]).password == "redisSecret2"
    assert flower["FLOWER_BASIC_AUTH"] == "admin:flowerSecret3"


def test_no_secret_is_on_a_command_line(deployed: dict) -> None:
    """Command lines show in `docker inspect` and `ps`; the environment is the place for them."""
    for name, service in deployed["services"].items():
        command = " ".join(service.get("command") or [])
        for secret in SECRETS.values():
            assert secret not in command, name


def test_flower_listens_on_loopback_behind_a_password(deployed: dict) -> None:
    flower = deployed["services"]["flower"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"]
    # Nothing but the API is published on every interface.
    published = {
        name: service["ports"]
        for name, service in deployed["services"].items()
        if "ports" in service
    }
    assert set(published) == {"api", "flower"}


@pytest.mark.services  # starts a redis-server
def test_redis_asks_for_its_password_and_its_healthcheck_gives_it(
    deployed: dict, tmp_path: Path
) -> None:
    """Redis' command and healthcheck, run by the shell as in their container (on a free port,
    in a scratch folder, since this host runs a Redis of its own)."""
    service = deployed["services"]["redis"]
    env = {"PATH": "/usr/bin:/bin", **service["environment"]}
    port = free_port()
    shell, flag, script = service["command"]
    server = subprocess.Popen(
        [shell, flag, f"{script} --port {port} --dir {tmp_path}"],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    try:
        plain = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                plain.ping()
            except redis.AuthenticationError:
                break  # up, and asking for a password
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.1)
                continue
            pytest.fail("Redis answered without a password")
        assert redis.Redis(port=port, password="redisSecret2").ping()

        kind, check = service["healthcheck"]["test"]
        assert kind == "CMD-SHELL"
        check = check.replace("redis-cli", f"redis-cli -p {port}")
        assert subprocess.run(["sh", "-c", check], env=env).returncode == 0
        wrong = {**env, "REDIS_PASSWORD": "wrong"}
        assert subprocess.run(["sh", "-c", check], env=wrong, capture_output=True).returncode != 0
    finally:
        server.terminate()
        server.wait(10)


def test_worker_metrics_listen_on_the_compose_network_only(deployed: dict) -> None:
    assert WorkerSettings(_env_file=None).metrics_host == "127.0.0.1"  # make run, the suite
    worker = deployed["services"]["worker"]
    assert worker["environment"]["FERRY_METRICS_HOST"] == "0.0.0.0"
    assert worker["expose"] == ["9400"] and "ports" not in worker


def test_each_service_builds_its_own_image(deployed: dict) -> None:
    services = deployed["services"]
    stages = _dockerfile_stages()
    for name, target in (("migrate", "api"), ("api", "api"), ("worker", "worker")):
        assert services[name]["build"]["target"] == target, name
        assert target in stages
    assert services["worker"]["image"] != services["api"]["image"]


def test_images_run_as_an_unprivileged_user() -> None:
    stages = _dockerfile_stages()
    assert stages["base"][0] == "FROM python:3.11-slim AS base"
    assert any(i.startswith("RUN useradd") and "--uid 10001" in i for i in stages["base"])
    for name in ("api", "worker"):
        instructions = stages[name]
        assert instructions[0] == f"FROM base AS {name}"
        users = [i.split()[1] for i in instructions if i.startswith("USER ")]
        assert users and users[-1] == "ferry", name
        # Nothing runs after the switch but the image's own command.
        after = instructions[instructions.index("USER ferry") + 1 :]
        assert not [i for i in after if i.startswith(("RUN ", "USER "))], name
        assert 'ENTRYPOINT ["ferry"]' in instructions


def test_compilers_stay_in_the_build_stages() -> None:
    stages = _dockerfile_stages()
    assert COMPILERS & _installed_by_apt(" ".join(stages["build"]))
    for name in ("base", "api"):
        assert not any(_installed_by_apt(i) for i in stages[name]), name
    # The GPU worker's C compiler, which Triton needs at run time; never a C++ one.
    worker_installs = [i for i in stages["worker"] if _installed_by_apt(i)]
    assert len(worker_installs) == 1
    assert worker_installs[0].startswith('RUN if [ "$ENGINE" = gpu ]; then')
    assert _installed_by_apt(worker_installs[0]) == {"gcc", "libc6-dev"}
    # The final stages take the built virtualenv, not pip and the sources.
    for name, built in (("api", "build-api"), ("worker", "build-worker")):
        assert f"COPY --from={built} /opt/venv /opt/venv" in stages[name]
        assert not any(i.startswith("RUN pip") or "COPY core" in i for i in stages[name])
    assert not any("[${ENGINE}]" in i for i in stages["build-api"])


def test_the_worker_image_holds_the_prepared_model_its_user_can_rebuild() -> None:
    stages = _dockerfile_stages()
    assert "ENV PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH FERRY_CACHE_DIR=/var/cache/ferry" in (
        " ".join(i.split()) for i in stages["base"]
    )
    assert "RUN ferry model prepare" in stages["build-worker"]
    assert (
        "COPY --from=build-worker --chown=ferry:ferry /var/cache/ferry /var/cache/ferry"
        in stages["worker"]
    )
