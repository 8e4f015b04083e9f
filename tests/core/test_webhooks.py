"""Webhooks' pure parts: signatures the real openai SDK accepts (and refuses when tampered with
or old), both secrets during a rotation, sealing, refused URLs, backoff and the breaker."""

import json
import random
import socket
from datetime import UTC, datetime, timedelta

import openai
import pytest

from core import webhooks
from core.settings import CoreSettings
from tests.openai_schema import validate

# Whatever the environment says: no network allowed beyond the public ones.
SETTINGS = CoreSettings(
    _env_file=None,  # type: ignore[call-arg]
    secret_key="unit-test-key",
    webhook_allowed_networks="",
)
SDK = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")


def payload(kind: str = "batch.completed", about: str = "batch_abc") -> dict:
    return {
        "id": "evt_0123456789abcdef",
        "object": "event",
        "created_at": 1_780_000_000,
        "type": kind,
        "data": {"id": about},
    }


def signed(secrets: list[str], when: datetime | None = None) -> tuple[str, dict[str, str]]:
    body = webhooks.body_of(payload())
    return body, webhooks.sign("evt_0123456789abcdef", when or datetime.now(UTC), body, secrets)


def test_the_sdk_unwraps_a_signed_event() -> None:
    secret = webhooks.new_secret()
    body, headers = signed([secret])
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    event = SDK.webhooks.unwrap(body, headers, secret=secret)
    assert (event.id, event.type, event.data.id) == (
        "evt_0123456789abcdef",
        "batch.completed",
        "batch_abc",
    )


def test_the_sdk_refuses_a_tampered_body_another_secret_and_an_old_timestamp() -> None:
    secret = webhooks.new_secret()
    body, headers = signed([secret])
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.unwrap(body.replace("batch_abc", "batch_xyz"), headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        SDK.webhooks.unwrap(body, headers, secret=webhooks.new_secret())
    old = datetime.now(UTC) - timedelta(minutes=10)
    body, headers = signed([secret], old)
    with pytest.raises(openai.InvalidWebhookSignatureError, match="too old"):
        SDK.webhooks.unwrap(body, headers, secret=secret)


def test_during_a_rotation_both_secrets_sign() -> None:
    old, new = webhooks.new_secret(), webhooks.new_secret()
    body, headers = signed([new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        assert SDK.webhooks.unwrap(body, headers, secret=secret).id == "evt_0123456789abcdef"


def test_signing_secrets_take_the_previous_one_only_during_its_grace() -> None:
    current, previous = webhooks.new_secret(), webhooks.new_secret()
    sealed = webhooks.seal(current, SETTINGS)
    sealed_previous = webhooks.seal(previous, SETTINGS)
    now = datetime.now(UTC)
    during = webhooks.signing_secrets(
        sealed, sealed_previous, now + timedelta(hours=1), SETTINGS, now
    )
    after = webhooks.signing_secrets(
        sealed, sealed_previous, now - timedelta(seconds=1), SETTINGS, now
    )
    assert during == [current, previous]
    assert after == [current]


@pytest.mark.parametrize(
    "kind", ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"]
)
def test_batch_payloads_are_openais(kind: str) -> None:
    sent = json.loads(webhooks.body_of(payload(kind)))
    validate(f"WebhookBatch{kind.split('.')[1].capitalize()}", sent)
    assert list(sent) == ["created_at", "id", "data", "object", "type"]


def test_secrets_are_sealed_under_the_key() -> None:
    secret = webhooks.new_secret()
    sealed = webhooks.seal(secret, SETTINGS)
    assert secret not in sealed and secret.removeprefix("whsec_") not in sealed
    assert webhooks.unseal(sealed, SETTINGS) == secret
    other = CoreSettings(_env_file=None, secret_key="another-key")  # type: ignore[call-arg]
    with pytest.raises(webhooks.WebhookSettingsError, match="FERRY_SECRET_KEY"):
        webhooks.unseal(sealed, other)
    unset = CoreSettings(_env_file=None, secret_key="")  # type: ignore[call-arg]
    with pytest.raises(webhooks.WebhookSettingsError, match="FERRY_SECRET_KEY is not set"):
        webhooks.seal(secret, unset)


def resolver(*addresses: str):
    def resolve(host: str, port: int, type: int = 0) -> list:
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, type, 6, "", (a, port))
            for a in addresses
        ]

    return resolve


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.10",
        "172.16.5.5",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00::1",
        "::ffff:127.0.0.1",
        "240.0.0.1",
    ],
)
def test_urls_resolving_to_inner_addresses_are_refused(address: str) -> None:
    with pytest.raises(webhooks.RefusedUrl, match="FERRY_WEBHOOK_ALLOWED_NETWORKS"):
        webhooks.check_url("https://hooks.example.com/x", SETTINGS, resolver(address))


def test_one_inner_address_among_public_ones_refuses_the_url() -> None:
    with pytest.raises(webhooks.RefusedUrl):
        webhooks.check_url(
            "https://hooks.example.com/", SETTINGS, resolver("93.184.216.34", "10.0.0.1")
        )


def test_allowed_networks_let_inner_addresses_through() -> None:
    allowing = CoreSettings(
        _env_file=None,  # type: ignore[call-arg]
        secret_key="k",
        webhook_allowed_networks="127.0.0.0/8, ::1/128",
    )
    target = webhooks.check_url("http://localhost:8080/hook?a=1", allowing, resolver("127.0.0.1"))
    assert target.connect_url == "http://127.0.0.1:8080/hook?a=1"
    assert target.host_header == "localhost:8080"
    target = webhooks.check_url("http://[::1]/h", allowing, resolver("::1"))
    assert target.connect_url == "http://[::1]:80/h" and target.host_header == "[::1]"
    with pytest.raises(webhooks.RefusedUrl):
        webhooks.check_url("http://x.example/", allowing, resolver("10.0.0.1"))


def test_a_public_address_is_connected_to_as_resolved() -> None:
    target = webhooks.check_url("https://hooks.example.com/in", SETTINGS, resolver("93.184.216.34"))
    assert target.connect_url == "https://93.184.216.34:443/in"
    assert (target.host, target.host_header) == ("hooks.example.com", "hooks.example.com")


@pytest.mark.parametrize(
    "url", ["ftp://example.com/", "file:///etc/passwd", "https://user:pw@example.com/", "nothing"]
)
def test_other_schemes_and_credentials_are_refused(url: str) -> None:
    with pytest.raises(webhooks.RefusedUrl):
        webhooks.check_url(url, SETTINGS, resolver("93.184.216.34"))


def test_a_host_that_does_not_resolve_is_refused() -> None:
    def fails(host: str, port: int, type: int = 0) -> list:
        raise socket.gaierror("Name or service not known")

    with pytest.raises(webhooks.RefusedUrl, match="does not resolve"):
        webhooks.check_url("https://nowhere.invalid/", SETTINGS, fails)


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    for attempts in range(1, 40):
        ceiling = min(
            webhooks.BACKOFF_CAP_SECONDS, webhooks.BACKOFF_BASE_SECONDS * 2 ** (attempts - 1)
        )
        waits = [webhooks.backoff_seconds(attempts, rng) for _ in range(200)]
        assert all(webhooks.BACKOFF_FLOOR_SECONDS <= w <= max(ceiling, 1.0) for w in waits)
    late = [webhooks.backoff_seconds(30, rng) for _ in range(500)]
    # Spread over the whole range, not bunched at the cap.
    assert min(late) < webhooks.BACKOFF_CAP_SECONDS / 4 < webhooks.BACKOFF_CAP_SECONDS * 0.75
    assert max(late) > webhooks.BACKOFF_CAP_SECONDS * 0.75


def test_retries_over_72_hours_take_many_attempts() -> None:
    rng = random.Random(1)
    waited, attempts = 0.0, 0
    while waited < webhooks.GIVE_UP_AFTER.total_seconds():
        attempts += 1
        waited += webhooks.backoff_seconds(attempts, rng)
    assert 60 < attempts < 400


def test_the_breaker_opens_after_five_failures_in_a_row() -> None:
    now = datetime.now(UTC)
    assert all(webhooks.circuit_open_until(n, now) is None for n in range(5))
    until = webhooks.circuit_open_until(5, now)
    assert until == now + timedelta(seconds=webhooks.BREAKER_OPEN_SECONDS)


def test_event_names_are_checked() -> None:
    assert webhooks.parse_events(None) is None
    assert webhooks.parse_events("batch.completed, batch.failed") == [
        "batch.completed",
        "batch.failed",
    ]
    with pytest.raises(ValueError, match=r"batch\.done"):
        webhooks.parse_events("batch.completed,batch.done")


def test_at_most_a_kibibyte_of_an_answer_is_kept() -> None:
    assert webhooks.kept_text(b"x" * 5000) == "x" * 1024
    # 3 bytes each: the 342nd is cut in two and left out.
    kept = webhooks.kept_text("\u20ac".encode() * 2000)
    assert kept == "\u20ac" * 341 and len(kept.encode()) <= 1024
    assert webhooks.kept_text(b"a\x00b") == "ab"
