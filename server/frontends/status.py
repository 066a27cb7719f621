"""The one table ErrorCode -> (HTTP status, gRPC status code)."""

from __future__ import annotations

import grpc

from server.core.errors import ErrorCode

STATUS: dict[ErrorCode, tuple[int, grpc.StatusCode]] = {
    ErrorCode.INVALID_ARGUMENT: (400, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorCode.NOT_FOUND: (404, grpc.StatusCode.NOT_FOUND),
    ErrorCode.UNAVAILABLE: (503, grpc.StatusCode.UNAVAILABLE),
    ErrorCode.DEADLINE_EXCEEDED: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    ErrorCode.FAILED_PRECONDITION: (400, grpc.StatusCode.FAILED_PRECONDITION),
    ErrorCode.UNIMPLEMENTED: (501, grpc.StatusCode.UNIMPLEMENTED),
    ErrorCode.CANCELLED: (400, grpc.StatusCode.CANCELLED),
    ErrorCode.INTERNAL: (500, grpc.StatusCode.INTERNAL),
}


def http_status(code: ErrorCode) -> int:
    return STATUS[code][0]


def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    return STATUS[code][1]
