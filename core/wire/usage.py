"""OpenAI's Usage API for completions: time buckets of token counts, one result per group.

Reference: OpenAI's OpenAPI document, `docs/openai-openapi.yaml`: `UsageResponse`,
`UsageTimeBucket` and `UsageCompletionsResult` (`GET /organization/usage/completions`). Fields
are in the spec's order. Ferry's engine reads text only, so every audio and image count is 0, and
its prompt cache is vLLM's automatic prefix cache, which writes without being asked: no
cache-write tokens either.
"""

from typing import Literal

from pydantic import BaseModel

UsageGroup = Literal["project_id", "user_id", "api_key_id", "model", "batch", "service_tier"]
USAGE_GROUPS: tuple[UsageGroup, ...] = (
    "project_id",
    "user_id",
    "api_key_id",
    "model",
    "batch",
    "service_tier",
)
BucketWidth = Literal["1m", "1h", "1d"]


class UsageCompletionsResult(BaseModel):
    """`UsageCompletionsResult`: one group's usage in one bucket; a field not grouped by is
    null."""

    object: Literal["organization.usage.completions.result"] = (
        "organization.usage.completions.result"
    )
    input_tokens: int
    input_cached_tokens: int
    input_cache_write_tokens: int = 0
    input_uncached_tokens: int
    output_tokens: int
    input_text_tokens: int
    output_text_tokens: int
    input_cached_text_tokens: int
    input_audio_tokens: int = 0
    input_cached_audio_tokens: int = 0
    output_audio_tokens: int = 0
    input_image_tokens: int = 0
    input_cached_image_tokens: int = 0
    output_image_tokens: int = 0
    num_model_requests: int
    project_id: str | None = None
    user_id: str | None = None
    api_key_id: str | None = None
    model: str | None = None
    batch: bool | None = None
    service_tier: str | None = None

    @classmethod
    def of(
        cls,
        input_tokens: int,
        cached_tokens: int,
        output_tokens: int,
        requests: int,
        **groups: str | bool | None,
    ) -> "UsageCompletionsResult":
        """A group's sums: every input token is text, cached or not."""
        uncached = input_tokens - cached_tokens
        return cls.model_validate(
            {
                "input_tokens": input_tokens,
                "input_cached_tokens": cached_tokens,
                "input_uncached_tokens": uncached,
                "output_tokens": output_tokens,
                "input_text_tokens": uncached,
                "output_text_tokens": output_tokens,
                "input_cached_text_tokens": cached_tokens,
                "num_model_requests": requests,
                **groups,
            }
        )


class UsageTimeBucket(BaseModel):
    """`UsageTimeBucket`: [start_time, end_time) in Unix seconds, and its results."""

    object: Literal["bucket"] = "bucket"
    start_time: int
    end_time: int
    results: list[UsageCompletionsResult]


class UsageResponse(BaseModel):
    """`UsageResponse`: a page of buckets, oldest first; `next_page` is the cursor to the next."""

    object: Literal["page"] = "page"
    data: list[UsageTimeBucket]
    has_more: bool
    next_page: str | None
