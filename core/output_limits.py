"""The most output one request may ask for: choices times tokens, and logprobs on top.

One answer with `n` 128 and `top_logprobs` 20 over a 2,048-token context is millions of logprob
entries, hundreds of MB of JSON built in a worker and an API process. A request is measured at
its worst: `n` choices of `max_completion_tokens` (or `max_tokens`) each, or, without either,
of the whole context of the model's workers; with logprobs, each token carries `top_logprobs`
alternatives beside its own. Past a limit it is refused with 400 before anything is stored.
"""

from core.errors import InvalidRequestError
from core.settings import ApiSettings
from core.wire.requests import ChatCompletionRequest


def check(body: ChatCompletionRequest, context_length: int | None, settings: ApiSettings) -> None:
    """InvalidRequestError if `body` may produce more than `settings` allow."""
    asked = body.max_completion_tokens or body.max_tokens
    per_choice = asked if asked is not None else context_length
    if per_choice is None:
        return
    if context_length is not None:
        per_choice = min(per_choice, context_length)
    choices = body.n or 1
    tokens = choices * per_choice
    field = "max_completion_tokens" if body.max_tokens is None else "max_tokens"
    if tokens > settings.max_output_tokens:
        raise InvalidRequestError(
            f"This request may produce {tokens:,} output tokens ({choices} choices of up to "
            f"{per_choice:,} tokens), more than the {settings.max_output_tokens:,} this "
            f"deployment allows per request. Lower 'n' or '{field}'.",
            param="n" if choices > 1 else field,
            code="output_too_large",
        )
    if not body.logprobs:
        return
    alternatives = body.top_logprobs or 0
    entries = tokens * (1 + alternatives)
    if entries > settings.max_logprob_entries:
        raise InvalidRequestError(
            f"This request may produce {entries:,} logprob entries ({tokens:,} tokens, each "
            f"with itself and {alternatives} top_logprobs), more than the "
            f"{settings.max_logprob_entries:,} this deployment allows per request. Lower "
            f"'top_logprobs', 'n' or '{field}'.",
            param="top_logprobs" if alternatives else "logprobs",
            code="output_too_large",
        )
