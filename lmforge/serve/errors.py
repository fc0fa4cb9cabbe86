"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the status the reference uses.

Every lmforge input error (`lmforge.errors.LmforgeError`: a sampling setting, a schema, a chat template, a prompt
the engine cannot take) is a 400 naming its `param`; `ApiError` carries its own status (401, 404, 429, ...);
request validation errors name the field pydantic found; anything else is a 500 that names only the exception's
type (its message may hold file paths). Text a client sent can come back inside a message, so messages are made
encodable first: a lone surrogate is written as its escape instead of failing the response.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError

log = logging.getLogger("lmforge.serve")


class ApiError(LmforgeError):
    """An error the client sees as OpenAI's JSON, with an HTTP status and optional headers (Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message, param)
        self.status, self.message, self.type, self.code, self.headers = status, message, type, code, headers

    @classmethod
    def of(cls, e: Exception, param: str | None = None) -> ApiError:
        """A 400 for an lmforge input error (named by its own param, else `param`), a 500 for anything else."""
        if isinstance(e, ApiError):
            return e
        if isinstance(e, LmforgeError):
            return cls(400, str(e), e.param or param)
        return cls(
            500,
            f"internal error while serving this request: {type(e).__name__}; other requests are unaffected",
            type="server_error",
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": encodable(self.message),
                "type": self.type,
                "param": None if self.param is None else encodable(self.param),
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def encodable(text: str) -> str:
    """`text` with anything UTF-8 cannot hold (lone surrogates) replaced by its backslash escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def install(app: FastAPI) -> None:
    """Register the handlers that turn every exception a route can raise into OpenAI's error JSON."""

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return e.response()

    @app.exception_handler(LmforgeError)
    async def _input_error(_, e: LmforgeError):
        return ApiError.of(e).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
        return ApiError(400, f"{param or 'body'}: {err.get('msg', 'invalid request')}", param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _server_error(_, e: Exception):
        log.exception("unhandled error")
        return ApiError.of(e).response()
