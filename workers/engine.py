"""The engine host: one long-lived vLLM engine per worker process, fed by many task threads.

The engine and vLLM's own OpenAI chat layer (`OpenAIServingChat`: chat template, sampling
parameters, tool parsing, structured outputs, logprobs) run on an asyncio loop in a background
thread. Celery task threads hand requests to that loop and block on the answer, so every task in
flight is a request inside the engine, which batches them all.
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import shlex
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, NoReturn, TypeVar

from core.errors import FerryError, InvalidRequestError
from core.settings import WorkerSettings
from core.wire.wording import refused

log = logging.getLogger(__name__)

T = TypeVar("T")


class EngineDead(Exception):
    """The engine can take no more requests; the worker must exit and be restarted."""


def with_platform_defaults(settings: WorkerSettings) -> WorkerSettings:
    """The settings with what they leave to the platform decided: eager float32 on CPU builds,
    compiled with the model's own dtype on GPUs."""
    if settings.enforce_eager is not None and settings.dtype:
        return settings
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    decided: dict[str, object] = {}
    if settings.enforce_eager is None:
        decided["enforce_eager"] = cpu
    if not settings.dtype:
        decided["dtype"] = "float32" if cpu else "auto"
    return settings.model_copy(update=decided)


class EngineSettingsError(ValueError):
    """vLLM refuses the engine's settings (an option, or a value of one)."""


def serve_args(argv: list[str]) -> argparse.Namespace:
    """vLLM's parsed and checked arguments for `argv`; EngineSettingsError if it refuses them."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Refusing(FlexibleArgumentParser):
        # argparse's own way out is SystemExit, after printing its whole usage; on the engine's
        # loop that would end the loop's thread and leave the worker waiting for it forever.
        def error(self, message: str) -> NoReturn:
            raise EngineSettingsError(message)

    args = make_arg_parser(Refusing()).parse_args(argv)
    try:
        validate_parsed_serve_args(args)
    except (ValueError, TypeError) as exc:
        raise EngineSettingsError(str(exc)) from exc
    return args


def engine_argv(settings: WorkerSettings, model_path: str) -> list[str]:
    """vLLM's command-line arguments for this worker's engine."""
    argv = [
        "--model",
        model_path,
        "--served-model-name",
        settings.model,
        "--max-num-seqs",
        str(settings.max_num_seqs),
        "--max-model-len",
        str(settings.max_model_len),
        "--dtype",
        settings.dtype,
        "--tensor-parallel-size",
        str(settings.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(settings.gpu_memory_utilization),
        "--disable-log-stats",
        # usage.prompt_tokens_details.cached_tokens, from the prefix cache.
        "--enable-prompt-tokens-details",
        # tool_choice "none" means the model never sees the tools, as at OpenAI.
        "--exclude-tools-when-tool-choice-none",
        # Interactive requests are scheduled ahead of batch work (which asks for a lower priority).
        "--scheduling-policy",
        "priority",
    ]
    if settings.enforce_eager:
        argv.append("--enforce-eager")
    if settings.chat_template:
        argv += ["--chat-template", settings.chat_template]
    if settings.tool_call_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", settings.tool_call_parser]
    return argv + shlex.split(settings.engine_args)


class LoopHost:
    """An asyncio loop in a background thread that task threads hand coroutines to."""

    def __init__(self, settings: WorkerSettings, model_path: str) -> None:
        self.settings = settings
        self.model_path = model_path
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="engine-loop", daemon=True
        )
        self._stack = contextlib.AsyncExitStack()
        self.dead = threading.Event()

    def start(self) -> None:
        """Open the engine; returns when it takes requests."""
        self._thread.start()
        self._call(self._open())

    async def _open(self) -> None:
        raise NotImplementedError

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        """Start `coro` on the engine's loop; cancelling the future aborts it in the engine."""
        if self.dead.is_set():
            coro.close()
            raise EngineDead("the engine has stopped")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the engine's loop; blocks the calling (task) thread, not the engine."""
        return self.submit(coro).result()

    async def complete(self, request_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """One chat completion, as vLLM's response dict (on the engine loop)."""
        raise NotImplementedError

    def stream(self, request_id: str, fields: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """One streamed chat completion: vLLM's chunk dicts as they come (on the engine loop)."""
        raise NotImplementedError

    def close(self) -> None:
        """Shut the engine down and stop the loop; again, it does nothing."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._stack.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class EngineHost(LoopHost):
    """Owns the vLLM engine and vLLM's chat serving object, on the loop thread."""

    def __init__(self, settings: WorkerSettings, model_path: str) -> None:
        super().__init__(settings, model_path)
        self._args: Any = None
        self._engine: Any = None
        self._chat: Any = None

    def start(self) -> None:
        """Load the model and warm the engine; returns when it takes requests.

        Raises EngineSettingsError, before anything loads, if vLLM refuses the settings.
        """
        from workers.parent_watch import mark_worker

        self._args = serve_args(engine_argv(self.settings, self.model_path))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kv_cache_gib))
        mark_worker()
        super().start()

    async def _open(self) -> None:
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

        args = self._args
        self._engine = await self._stack.enter_async_context(build_async_engine_client(args))
        state = State()
        await init_app_state(self._engine, state, args, await self._engine.get_supported_tasks())
        self._chat = state.openai_serving_chat

    async def complete(self, request_id: str, fields: dict[str, Any]) -> dict[str, Any]:
        """One chat completion, as vLLM's response dict (on the engine loop)."""
        async with self._translated_errors():
            result = await self._create(request_id, fields)
            return result.model_dump(mode="json")

    async def stream(
        self, request_id: str, fields: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """One streamed chat completion: vLLM's chunk dicts as they come (on the engine loop)."""
        async with self._translated_errors():
            result = await self._create(request_id, fields)
            async for event in result:
                for line in event.splitlines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: ") :]
                    if payload == "[DONE]":
                        return
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        error = chunk["error"]
                        raise engine_error(
                            error.get("message", ""),
                            int(error.get("code") or 500),
                            error.get("param"),
                            self.settings.max_model_len,
                        )
                    yield chunk

    async def _create(self, request_id: str, fields: dict[str, Any]) -> Any:
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        try:
            request = ChatCompletionRequest.model_validate({**fields, "request_id": request_id})
        except ValidationError as exc:
            # Ferry's types let through what vLLM's refuse: worded as the API would word it.
            raise refused(exc) from exc
        result = await self._chat.create_chat_completion(request)
        if isinstance(result, ErrorResponse):
            raise engine_error(
                result.error.message,
                result.error.code,
                result.error.param,
                self.settings.max_model_len,
            )
        return result

    @contextlib.asynccontextmanager
    async def _translated_errors(self) -> AsyncIterator[None]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            yield
        except EngineDeadError as exc:
            self.dead.set()
            raise EngineDead(str(exc)) from exc
        except VLLMClientError as exc:
            # The message without vLLM's "(parameter=..., value=...)" suffix.
            raise engine_error(
                str(exc.args[0]) if exc.args else str(exc),
                400,
                getattr(exc, "parameter", None),
                self.settings.max_model_len,
            ) from exc

    def close(self) -> None:
        super().close()
        # Collected now, while the interpreter is whole, not at its exit.
        self._engine = self._chat = None
        kill_engine_processes()


def kill_engine_processes() -> None:
    """Kill what is left of the engine's processes; a dead engine core can orphan its workers."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


# vLLM refuses an output budget larger than the whole context, whatever the prompt.
_OUTPUT_OVER_CONTEXT = re.compile(
    r"(max_completion_tokens|max_tokens)=(\d+) cannot be greater than max_model_len=(\d+)"
)
# vLLM's budget once it has cut max_tokens to the room the prompt leaves: none at all.
_NO_ROOM = "max_tokens must be at least 1, got 0"


def engine_error(
    message: str, status: int, param: str | None = None, context_length: int | None = None
) -> FerryError:
    """vLLM's error as Ferry's, with OpenAI's type, code and param for what it says.

    vLLM cuts `max_tokens` to the room the prompt leaves in the context; what it still refuses
    reads as OpenAI words it: an output budget over the whole context names its field, and a
    prompt that leaves no room for one token is `context_length_exceeded`, as a longer one is.
    """
    if not 400 <= status < 500:
        return FerryError(message, status_code=status, type="server_error", code="engine_error")
    if too_many := _OUTPUT_OVER_CONTEXT.search(message):
        field, asked, most = too_many.groups()
        return InvalidRequestError(
            f"{field} is too large: {asked}. This model supports at most {most} completion "
            f"tokens (its whole context), whereas you provided {asked}.",
            param=field,
            code="invalid_value",
            status_code=status,
        )
    if message.startswith(_NO_ROOM):
        length = f" is {context_length} tokens" if context_length else ""
        return InvalidRequestError(
            f"This model's maximum context length{length}. However, your messages fill all of "
            "it, leaving no room for a completion token. Please reduce the length of the "
            "messages.",
            param="messages",
            code="context_length_exceeded",
            status_code=status,
        )
    if "context length" in message.lower():
        return InvalidRequestError(
            message, param="messages", code="context_length_exceeded", status_code=status
        )
    return InvalidRequestError(message, param=param, status_code=status)
