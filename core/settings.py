"""Settings, read from the environment (prefix FERRY_) and `.env`; one class per side."""

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
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
    # A job is failed after this many starts (each worker loss or engine death costs one).
    max_attempts: int = Field(default=3, ge=1)
    # On SIGTERM, how long jobs and requests in flight get to finish. The API stops accepting
    # connections; a worker stops taking jobs, then hands what is left back to the queue.
    shutdown_timeout_seconds: float = Field(default=30.0, ge=0)
    # Log lines as JSON objects (ts, level, logger, message, job_id, ...) or as plain text.
    log_format: Literal["json", "text"] = "json"
    # Seals the webhook signing secrets kept in Postgres (core.webhooks): without it a database
    # dump cannot sign. Needed to add webhook endpoints and to send events; no default (`make
    # run` makes one, once, in the cache folder).
    secret_key: SecretStr = SecretStr("")
    # Networks (CIDRs, comma-separated) webhooks may be sent to although they are loopback,
    # private, link-local or reserved, e.g. "10.0.0.0/8,127.0.0.0/8"; empty: none.
    webhook_allowed_networks: str = ""

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        import ipaddress

        for part in value.split(","):
            if part.strip():
                ipaddress.ip_network(part.strip(), strict=False)
        return value


class ApiSettings(CoreSettings):
    """The API process."""

    host: str = "127.0.0.1"
    port: int = 8000
    # With no live worker for the model, a synchronous request waits this long, then 503.
    no_worker_wait_seconds: float = Field(default=10.0, gt=0)
    # The longest a synchronous request waits for its job.
    sync_timeout_seconds: float = Field(default=600.0, gt=0)
    db_pool_size: int = Field(default=20, ge=1)
    # API keys and served models are read from Postgres at most once per this many seconds per
    # API process: a revoked key, or a model's new capabilities, take effect within it. A wrong
    # key is remembered as long: a key created after a client tried it works within it.
    lookup_cache_seconds: float = Field(default=5.0, ge=0)
    # Limits on what a request may send (413 or 400 past them; see README, "Limits").
    # A request body, counted as it arrives; POST /v1/files has max_upload_bytes instead.
    max_request_bytes: int = Field(default=16 << 20, ge=1024)
    # A file upload (OpenAI allows 512 MB; files are kept in Postgres).
    max_upload_bytes: int = Field(default=200 << 20, ge=1024)
    # Messages in one chat completion request, and the characters of all their content.
    max_messages: int = Field(default=2048, ge=1)
    max_messages_chars: int = Field(default=4 << 20, ge=1)
    # Arrays and objects nested in a JSON body or batch line.
    max_json_depth: int = Field(default=64, ge=2)
    # One line of a batch input file.
    max_batch_line_bytes: int = Field(default=1 << 20, ge=1024)
    # The most output one request may ask for (core/output_limits.py): choices x tokens, where a
    # request without max tokens counts the model's whole context; 262,144 is OpenAI's most
    # choices (128) over a 2,048-token context.
    max_output_tokens: int = Field(default=262_144, ge=1)
    # ... and with logprobs, tokens x (1 + top_logprobs): about 16 MB of JSON at the default.
    max_logprob_entries: int = Field(default=262_144, ge=1)
    # Requests per batch input file (OpenAI's limit is 50,000).
    batch_max_lines: int = Field(default=50_000, ge=1)
    # Batches an API process validates at once, each parsed in a process of its own (api.parsing);
    # others wait their turn.
    batch_validation_concurrency: int = Field(default=2, ge=1)
    # The reconciler's sweep: how often, and how long a queued job may wait with no message in
    # the broker before it is sent again.
    reconcile_seconds: float = Field(default=10.0, gt=0)
    requeue_grace_seconds: float = Field(default=30.0, gt=0)
    # A `store: false` job's content (its request and result) is purged by the reconciler this
    # long after the job ends, whether or not its result was delivered (and at once when it is
    # delivered, unless it has an Idempotency-Key: a retry within this time gets its result).
    unstored_purge_seconds: float = Field(default=300.0, ge=0)
    # GET /metrics answers only a scraper that sends this as its bearer token; empty (the
    # default) refuses every scrape, so nothing about the fleet is open on the API's port.
    metrics_token: SecretStr = SecretStr("")
    # Interactive API docs at /docs (Swagger UI, served by the API itself, nothing from a CDN).
    docs: bool = True


class WorkerSettings(CoreSettings):
    """A worker process: the model it serves and its engine's settings."""

    model: str = DEFAULT_MODEL
    # A local folder in Hugging Face layout; empty means the prepared default model.
    model_path: str = ""
    # Requests the engine holds at once; also the number of task threads.
    max_num_seqs: int = Field(default=256, ge=1)
    max_model_len: int = Field(default=2048, ge=16)
    # Weights' dtype (auto: the model's own, bfloat16, float16, float32); empty picks by platform:
    # float32 on CPU builds, whose bfloat16 kernels answer wrong on some hosts in one mode or the
    # other (eager on Intel with AMX, compiled on AMD EPYC; bench/engine_modes.py), the model's
    # own on GPUs.
    dtype: str = ""
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # KV cache size in GiB on CPU builds (vLLM's VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = Field(default=2, ge=1)
    # Eager (no torch.compile, no CUDA graphs) or compiled; empty picks by platform: eager on CPU
    # builds, whose compiled kernels answer wrong on some hosts (bench/engine_modes.py), compiled
    # on GPUs, where CUDA graphs pay.
    enforce_eager: bool | None = None
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # Prometheus metrics served on this port at /metrics; 0 turns them off.
    metrics_port: int = Field(default=9400, ge=0, le=65535)
    # The address they listen on: this host only by default; 0.0.0.0 (all interfaces) where a
    # private network stands between them and the world, as in docker-compose.yml.
    metrics_host: str = "127.0.0.1"
    # A chat template file; empty means the model's own (the default model: Ferry's, with tools).
    chat_template: str = ""
    # vLLM's tool-call parser for tool_choice "auto" (e.g. hermes, xlam); empty means none
    # (the default model: xlam).
    tool_call_parser: str = ""
    # Extra engine arguments, as on vLLM's command line, e.g. "--seed 1 --swap-space 4".
    engine_args: str = ""
    # "vllm", or "fake" (no model: answers after fake_engine_delay_seconds; for
    # bench/queue_overhead.py only, to measure the queue without the engine).
    engine: Literal["vllm", "fake"] = "vllm"
    fake_engine_delay_seconds: float = Field(default=0.0, ge=0)
    # Known-answer checks run after the engine loads, before the model is announced: a JSONL file
    # of {"prompt": ..., "expected": ...} lines; empty means the default model's own checks (other
    # models are then not checked). A worker whose engine fails them exits with code 4.
    self_check_file: str = ""
    # Off only to serve a model whose answers nobody has written down yet.
    self_check: bool = True
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
