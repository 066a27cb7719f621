"""ErrorCode and ServingError: the one error type every layer raises; frontends map it to a status."""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class ServingError(Exception):
    """An error with a code the frontends translate (see server/frontends/status.py)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ServingError({self.code.name}, {self.message!r})"


def invalid(message: str) -> ServingError:
    return ServingError(ErrorCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> ServingError:
    return ServingError(ErrorCode.NOT_FOUND, message)


def unavailable(message: str) -> ServingError:
    return ServingError(ErrorCode.UNAVAILABLE, message)
