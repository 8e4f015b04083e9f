"""Webhooks: the events, their signatures, the sealed secrets, which URLs may receive them, and
when to try again.

Events are written by triggers in the transaction that ends a batch or an asynchronous
completion (migration 0014) and sent by the API's sender (api.webhooks). They are signed as
Standard Webhooks (the `standardwebhooks` library): `webhook-id` (the event's id, the same on
every attempt), `webhook-timestamp` and `webhook-signature`, which during a rotation carries a
signature by each of the two secrets. Secrets are kept sealed with Fernet under a key derived
from FERRY_SECRET_KEY, so that the database alone cannot sign.
"""

import base64
import codecs
import ipaddress
import random
import secrets
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel
from standardwebhooks.webhooks import Webhook

from core.settings import CoreSettings

BATCH_EVENTS = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")
COMPLETION_EVENTS = ("chat.completion.completed", "chat.completion.failed")
EVENT_TYPES = BATCH_EVENTS + COMPLETION_EVENTS

# Each attempt's limit, and how much of an answer's body is kept.
ATTEMPT_TIMEOUT_SECONDS = 10.0
KEPT_BODY_BYTES = 1024
# Retries: the wait before attempt n+1 is drawn between 0 and BASE * 2**(n-1), at most CAP
# ("full jitter"), never under FLOOR; a delivery is given up this long after its event.
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_CAP_SECONDS = 3600.0
BACKOFF_FLOOR_SECONDS = 1.0
GIVE_UP_AFTER = timedelta(hours=72)
# The circuit breaker: after this many failed attempts in a row, an endpoint is sent nothing
# for OPEN_SECONDS; then one delivery probes it, and its success closes the circuit.
BREAKER_FAILURES = 5
BREAKER_OPEN_SECONDS = 30.0
# How long a rotated-out secret still signs unless told otherwise.
DEFAULT_GRACE = timedelta(hours=24)

SECRET_PREFIX = "whsec_"


class WebhookSettingsError(RuntimeError):
    """A setting webhooks need is missing or wrong."""


class RefusedUrl(ValueError):
    """A URL webhooks may not be sent to (its scheme, or where its host resolves)."""


# https://github.com/openai/openai-openapi (WebhookBatchCompleted and the other WebhookBatch*):
# the envelope every event comes in, with the id of what it is about.
class EventData(BaseModel):
    id: str


class Event(BaseModel):
    created_at: int
    id: str
    data: EventData
    object: Literal["event"] = "event"
    type: str


def body_of(payload: dict[str, Any]) -> str:
    """The event as sent: its fields in the spec's order, compact JSON."""
    return Event.model_validate(payload).model_dump_json()


def new_secret() -> str:
    """A signing secret as Standard Webhooks and OpenAI's SDK read it: `whsec_` and base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(event_id: str, timestamp: datetime, body: str, signing: list[str]) -> dict[str, str]:
    """The Standard Webhooks headers for `body`, signed by each secret in `signing`."""
    signatures = " ".join(Webhook(secret).sign(event_id, timestamp, body) for secret in signing)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signatures,
    }


def _fernet(settings: CoreSettings) -> Fernet:
    key = settings.secret_key.get_secret_value()
    if not key:
        raise WebhookSettingsError(
            "FERRY_SECRET_KEY is not set: webhook secrets are sealed with it. Set it to a long "
            'random string (e.g. `python -c "import secrets; print(secrets.token_urlsafe(32))"`), '
            "the same for every API process and the CLI."
        )
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"ferry webhook secrets"
    ).derive(key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def seal(secret: str, settings: CoreSettings) -> str:
    """The secret encrypted under FERRY_SECRET_KEY, as it is stored."""
    return _fernet(settings).encrypt(secret.encode()).decode()


def unseal(sealed: str, settings: CoreSettings) -> str:
    """The secret a `seal` stored; WebhookSettingsError if FERRY_SECRET_KEY is another."""
    try:
        return _fernet(settings).decrypt(sealed.encode()).decode()
    except InvalidToken:
        raise WebhookSettingsError(
            "a webhook secret does not open with this FERRY_SECRET_KEY (was it changed?)"
        ) from None


def signing_secrets(
    sealed: str,
    previous_sealed: str | None,
    previous_until: datetime | None,
    settings: CoreSettings,
    now: datetime | None = None,
) -> list[str]:
    """The secrets that sign now: the current one, and the previous one during its grace."""
    now = now or datetime.now(UTC)
    signing = [unseal(sealed, settings)]
    if previous_sealed is not None and previous_until is not None and previous_until > now:
        signing.append(unseal(previous_sealed, settings))
    return signing


def allowed_networks(settings: CoreSettings) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """FERRY_WEBHOOK_ALLOWED_NETWORKS, parsed."""
    networks = []
    for part in settings.webhook_allowed_networks.split(","):
        if part.strip():
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError as exc:
                raise WebhookSettingsError(f"FERRY_WEBHOOK_ALLOWED_NETWORKS: {exc}") from None
    return networks


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_reserved
        or address.is_multicast
        or address.is_unspecified
        or not address.is_global
    )


def address_allowed(
    address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    """Whether webhooks may be sent to this IP address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return _public(ip) or any(ip in network for network in networks)


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (an address its host resolved to, every one of which is
    allowed), and what to say to it (the host, for the Host header and TLS)."""

    url: str
    scheme: str
    host: str
    port: int
    path: str
    address: str

    @property
    def connect_url(self) -> str:
        """The URL with the checked address in place of the host name: no second lookup."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{self.scheme}://{host}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def check_url(url: str, settings: CoreSettings, resolve=socket.getaddrinfo) -> Target:
    """The URL's target if webhooks may be sent there; RefusedUrl saying why if not.

    Refused: anything but http(s), credentials in the URL, a host that does not resolve, and a
    host any of whose addresses is loopback, private, link-local or reserved, unless it is in
    FERRY_WEBHOOK_ALLOWED_NETWORKS.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RefusedUrl(f"'{url}' is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RefusedUrl(f"'{url}' is not an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise RefusedUrl(f"'{url}' has credentials in it; put them in the path or a query")
    port = port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname
    try:
        found = resolve(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise RefusedUrl(f"the host of '{url}' does not resolve: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    if not addresses:
        raise RefusedUrl(f"the host of '{url}' does not resolve")
    networks = allowed_networks(settings)
    refused = [address for address in addresses if not address_allowed(address, networks)]
    if refused:
        raise RefusedUrl(
            f"'{url}' resolves to {', '.join(refused)}: loopback, private, link-local and "
            "reserved addresses are refused unless FERRY_WEBHOOK_ALLOWED_NETWORKS allows them"
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(url, parts.scheme, host, port, path, addresses[0])


def kept_text(body: bytes) -> str:
    """What is kept of a receiver's answer: text of at most KEPT_BODY_BYTES bytes in UTF-8 (a
    character cut at the end is left out; Postgres' text holds no NUL)."""
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(body[:KEPT_BODY_BYTES])
    text = text.replace("\x00", "")
    while len(text.encode()) > KEPT_BODY_BYTES:
        text = text[:-1]
    return text


def backoff_seconds(attempts: int, rng: random.Random | None = None) -> float:
    """The wait after the `attempts`-th failed attempt: exponential, with full jitter."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** min(attempts - 1, 30))
    return max(BACKOFF_FLOOR_SECONDS, (rng or random).uniform(0, ceiling))


def circuit_open_until(failures: int, now: datetime) -> datetime | None:
    """When an endpoint with `failures` failed attempts in a row may be tried again; None while
    its circuit stays closed."""
    if failures < BREAKER_FAILURES:
        return None
    return now + timedelta(seconds=BREAKER_OPEN_SECONDS)


def parse_events(text: str | None) -> list[str] | None:
    """`--events a,b` as a list (None: every event); ValueError naming unknown ones."""
    if text is None or not text.strip():
        return None
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in EVENT_TYPES]
    if unknown:
        raise ValueError(
            f"unknown event type(s) {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}"
        )
    return names
