"""Errors in OpenAI's shape, `{"error": {"message", "type", "code", "param"}}`: every
non-2xx answer under `/v1`, so an OpenAI SDK raises its own exception classes
(AuthenticationError, NotFoundError, BadRequestError, RateLimitError)."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import Response

from chatmeter.errors import ApiError
from chatmeter.jsonutil import json_response

INVALID_REQUEST = "invalid_request_error"


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        code: str | None = INVALID_REQUEST,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }

    def response(self) -> Response:
        response = json_response(self.body(), self.status)
        response.headers.update(self.headers)
        return response


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def invalid_api_key(message: str) -> OpenAIError:
    return OpenAIError(401, message, code="invalid_api_key")


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
        param="model",
    )


def insufficient_quota(message: str) -> OpenAIError:
    return OpenAIError(429, message, type="insufficient_quota", code="insufficient_quota")


def server_error(status: int, code: str, message: str) -> OpenAIError:
    return OpenAIError(status, message, type="server_error", code=code)


# the chat API's refusals before a stream starts, as OpenAI says them
_QUOTA = frozenset({"TOKEN_BUDGET_EXCEEDED", "SPEND_LIMIT_EXCEEDED"})


def from_api_error(exc: ApiError) -> OpenAIError:
    """An `ApiError` of the shared checks (auth, opening) in OpenAI's terms."""
    if exc.status == 401:
        return invalid_api_key(exc.message)
    if exc.code in _QUOTA:
        return insufficient_quota(exc.message)
    if exc.code == "RATE_LIMITED":
        retry_after = exc.headers.get("Retry-After")
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return OpenAIError(
            429, exc.message, type="requests", code="rate_limit_exceeded", headers=headers
        )
    if exc.code == "CONTEXT_LENGTH_EXCEEDED":
        return bad_request(exc.message, "messages")
    if exc.status == 400:
        return bad_request(exc.message)
    if exc.status == 403:
        return OpenAIError(403, exc.message, type="permission_error", code=exc.code.lower())
    return server_error(exc.status, exc.code.lower(), exc.message)


# an error event of the exchange (after it began), as an HTTP answer or a stream event
_STREAM_ERRORS = {
    "PROVIDER_ERROR": 502,
    "PROVIDER_RATE_LIMITED": 503,
    "PROVIDER_TIMEOUT": 504,
    "DATABASE_ERROR": 503,
    "INTERNAL_ERROR": 500,
}


def from_error_event(event: Mapping[str, object]) -> OpenAIError:
    code = str(event.get("code", "INTERNAL_ERROR"))
    return server_error(_STREAM_ERRORS.get(code, 500), code.lower(), str(event.get("message")))
