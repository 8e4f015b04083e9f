"""What a request still in flight gets when the API stops.

On SIGTERM uvicorn stops accepting connections and gives the requests in flight
FERRY_SHUTDOWN_TIMEOUT_SECONDS to finish; then it cancels them, and would answer uvicorn's bare
500. A request cut off that way gets OpenAI's envelope instead: 503, retry. Its job is not
touched: it runs to its end on a worker and its result is stored, so that a retry with the same
`Idempotency-Key` (on another API process) gets it without running it twice.
"""

import asyncio

from starlette.types import Message, Receive, Scope, Send

from api.errors import send_error
from api.middleware import HttpMiddleware
from core.errors import ServiceUnavailableError

SHUTTING_DOWN = ServiceUnavailableError(
    "The server shut down before this request finished; retry it. A completion it had started "
    "still runs to its end: retried with the same Idempotency-Key, the request gets that result "
    "without running again."
)


class AnswerWhenCutOff(HttpMiddleware):
    """Pure ASGI middleware: a request cancelled before its answer started gets a 503."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except asyncio.CancelledError:
            if started:
                raise
            await send_error(send, SHUTTING_DOWN, (b"retry-after", b"1"), (b"connection", b"close"))
            # Answered: the cancellation has done what it was for, ending this request.
