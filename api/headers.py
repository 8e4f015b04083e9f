"""Security headers on every response, and the Content-Security-Policy of each page.

The API answers JSON, server-sent events and files, and two pages: the dashboard and /docs, both
served by the API itself with nothing from another origin. A page's policy allows its own inline
scripts and styles by their hashes (never 'unsafe-inline'), everything else from the API's origin
only; any other response gets a policy that allows nothing at all. No response may be framed, and
none sends a Referer on: the dashboard's address may carry a key (`#key=`).
"""

import base64
import hashlib
import re

from starlette.datastructures import MutableHeaders
from starlette.types import Message, Receive, Scope, Send

from api.middleware import HttpMiddleware

# For JSON, events and files: no script, no style, no frame, no form, nothing.
NOTHING = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # frame-ancestors 'none' says the same to browsers that read CSP; this to those that do not.
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}

# Inline code: <script> and <style> elements without attributes, as the pages write them.
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.S)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def page_policy(html: str) -> str:
    """The Content-Security-Policy for `html`: its inline scripts and styles by hash, scripts,
    styles, images and requests from the page's own origin, nothing else."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _INLINE.findall(html):
        hashes[tag].append(_sha256(body))
    return "; ".join(
        [
            "default-src 'none'",
            " ".join(["script-src 'self'", *hashes["script"]]),
            " ".join(["style-src 'self'", *hashes["style"]]),
            "img-src 'self' data:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


class SecurityHeaders(HttpMiddleware):
    """Pure ASGI middleware: the headers above on every HTTP response, and the policy that
    allows nothing on any response whose route did not set a policy of its own."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", []))
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
                headers.setdefault("Content-Security-Policy", NOTHING)
            await send(message)

        await self.app(scope, receive, send_with_headers)
