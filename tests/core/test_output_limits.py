"""How much output a request may ask for, and which results ride with a job-done notification
(fast; no stack)."""

import pytest

from core import output_limits
from core.errors import InvalidRequestError
from core.settings import ApiSettings
from core.wire.requests import ChatCompletionRequest

SETTINGS = ApiSettings(_env_file=None, max_output_tokens=1024, max_logprob_entries=16_384)


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields}
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 8, "max_completion_tokens": 128},
        {"n": 4, "max_tokens": 128, "logprobs": True, "top_logprobs": 20},
        # Without max tokens, the model's context (512 here) counts.
        {"n": 2},
        # Asking for more than the context gets at most the context.
        {"n": 2, "max_tokens": 5000},
    ],
)
def test_requests_within_the_limits_pass(fields: dict) -> None:
    output_limits.check(request(**fields), 512, SETTINGS)


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {"n": 8, "max_completion_tokens": 129},
            "n",
            "1,032 output tokens (8 choices of up to 129",
        ),
        ({"max_tokens": 1025}, "max_tokens", "1,025 output tokens"),
        ({"n": 3}, "n", "12,288 output tokens (3 choices of up to 4,096"),
        (
            {"n": 8, "max_tokens": 128, "logprobs": True, "top_logprobs": 20},
            "top_logprobs",
            "21,504 logprob entries",
        ),
    ],
)
def test_requests_past_a_limit_are_refused_naming_what_to_lower(
    fields: dict, param: str, says: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        output_limits.check(request(**fields), 4096, SETTINGS)
    assert refused.value.status_code == 400
    assert refused.value.param == param and refused.value.code == "output_too_large"
    assert says in str(refused.value)


def test_without_a_known_context_only_asked_tokens_count() -> None:
    output_limits.check(request(n=128), None, SETTINGS)
    with pytest.raises(InvalidRequestError):
        output_limits.check(request(n=128, max_tokens=9), None, SETTINGS)
