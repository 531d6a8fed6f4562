"""Status lines as Go's net/http writes them ("202 Accepted"), for the gateway and the replicas.

OpenFaaS's gateway and of-watchdog are Go servers; werkzeug upper-cases reason phrases
("202 ACCEPTED"). Clients rarely read the phrase, but faas-cli prints it ("Deployed. 202
Accepted."), so both servers rewrite the status line through :func:`go_status_middleware`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

__all__ = ["go_status", "go_status_middleware", "status_line"]

# Go's http.StatusText where it differs from (or is missing in) Python's HTTPStatus phrases.
_GO_TEXT = {
    413: "Request Entity Too Large",
    414: "Request URI Too Long",
    416: "Requested Range Not Satisfiable",
    418: "I'm a teapot",
    422: "Unprocessable Entity",
}
_CACHE: dict[int, str] = {}


def go_status(code: int) -> str:
    """The reason phrase Go's net/http uses for ``code`` ("" for unknown codes)."""
    text = _CACHE.get(code)
    if text is None:
        try:
            text = _GO_TEXT.get(code) or HTTPStatus(code).phrase
        except ValueError:
            text = ""
        _CACHE[code] = text
    return text


def status_line(code: int) -> str:
    """``"404 Not Found"``: a WSGI status string with Go's phrase."""
    text = go_status(code)
    return f"{code} {text}" if text else f"{code} status code {code}"


def go_status_middleware(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """Wrap a WSGI app so every status line carries Go's reason phrase."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def fixed(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            code = status.split(" ", 1)[0]
            if code.isdigit():
                status = status_line(int(code))
            return start_response(status, headers, exc_info)

        return app(environ, fixed)

    return wrapped
