"""Optional request features that depend on the served model, and the fields that ask for them.

A worker declares what its model supports (`ferry worker --capabilities reasoning,audio`); the API
refuses a request that asks a model for a feature no worker has declared, rather than ignore it.
"""

from core.errors import InvalidRequestError
from core.wire.requests import ChatCompletionRequest

AUDIO = "audio"
REASONING = "reasoning"
VERBOSITY = "verbosity"
WEB_SEARCH = "web_search"
MODERATION = "moderation"
KNOWN = frozenset({AUDIO, REASONING, VERBOSITY, WEB_SEARCH, MODERATION})


def required(body: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(field, capability) for every feature the request asks for."""
    asks: list[tuple[str, str]] = []
    if body.modalities and "audio" in body.modalities:
        asks.append(("modalities", AUDIO))
    if body.audio is not None:
        asks.append(("audio", AUDIO))
    if body.reasoning_effort is not None:
        asks.append(("reasoning_effort", REASONING))
    if body.verbosity is not None:
        asks.append(("verbosity", VERBOSITY))
    if body.web_search_options is not None:
        asks.append(("web_search_options", WEB_SEARCH))
    if body.moderation is not None:
        asks.append(("moderation", MODERATION))
    return asks


def check(body: ChatCompletionRequest, supported: list[str]) -> None:
    """Refuse the first field that asks the model for a feature it does not have."""
    for field, capability in required(body):
        if capability not in supported:
            raise InvalidRequestError(
                f"The model '{body.model}' does not support '{field}': its workers do not "
                f"declare the '{capability}' capability.",
                param=field,
                code="unsupported_parameter",
            )
