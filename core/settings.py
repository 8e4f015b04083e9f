"""Settings, read from the environment (prefix FERRY_) and `.env`; one class per side."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """Where prepared model folders live unless FERRY_CACHE_DIR says otherwise."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ferry"


class CoreSettings(BaseSettings):
    """What both the API and the workers need: where Postgres and Redis are."""

    model_config = SettingsConfigDict(env_prefix="FERRY_", env_file=".env", extra="ignore")

    database_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/ferry"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # A worker whose heartbeat is older than this is taken for dead.
    worker_ttl_seconds: float = Field(default=15.0, gt=0)
    # Redis visibility timeout: a message not acknowledged within it is delivered again.
    # It must exceed the longest job.
    visibility_timeout_seconds: int = Field(default=7200, gt=0)
    cache_dir: Path = Field(default_factory=default_cache_dir)


class ApiSettings(CoreSettings):
    """The API process."""

    host: str = "127.0.0.1"
    port: int = 8000
    # With no live worker for the model, a synchronous request waits this long, then 503.
    no_worker_wait_seconds: float = Field(default=10.0, gt=0)
    # The longest a synchronous request waits for its job.
    sync_timeout_seconds: float = Field(default=600.0, gt=0)
    db_pool_size: int = Field(default=20, ge=1)


class WorkerSettings(CoreSettings):
    """A worker process: the model it serves and its engine's settings."""

    model: str = DEFAULT_MODEL
    # A local folder in Hugging Face layout; empty means the prepared default model.
    model_path: str = ""
    # Requests the engine holds at once; also the number of task threads.
    max_num_seqs: int = Field(default=256, ge=1)
    max_model_len: int = Field(default=2048, ge=16)
    dtype: str = "auto"
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # KV cache size in GiB on CPU builds (vLLM's VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = Field(default=2, ge=1)
    enforce_eager: bool = False
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # A chat template file; empty means the model's own (the default model: Ferry's, with tools).
    chat_template: str = ""
    # vLLM's tool-call parser for tool_choice "auto" (e.g. hermes, xlam); empty means none
    # (the default model: xlam).
    tool_call_parser: str = ""
    # Extra engine arguments, as on vLLM's command line, e.g. "--seed 1 --swap-space 4".
    engine_args: str = ""
    # Optional request features the model supports (core.capabilities.KNOWN), e.g. ["reasoning"].
    capabilities: Annotated[list[str], NoDecode] = []

    @field_validator("capabilities", mode="before")
    @classmethod
    def _split_capabilities(cls, value: object) -> object:
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("capabilities")
    @classmethod
    def _known_capabilities(cls, value: list[str]) -> list[str]:
        from core.capabilities import KNOWN

        unknown = set(value) - KNOWN
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {sorted(KNOWN)}")
        return value


@lru_cache
def api_settings() -> ApiSettings:
    """The API's settings, read once."""
    return ApiSettings()
