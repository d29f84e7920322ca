"""Server interceptors: what every call passes through before the servicer sees it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from stepstream_service.api.errors import InvalidArgument


class _Undecodable:
    """Stands in for a request whose bytes are no message of its type."""


class DecodeGuard(grpc.ServerInterceptor):
    """Bytes that are no valid request: INVALID_ARGUMENT, where grpcio would answer INTERNAL
    from its own decoding before any code of ours runs. On the way out, a response that is
    already bytes is sent as it is: a watchers' message is serialized once, not per watcher."""

    def __init__(self):
        self.guarded: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, details):
        # The servicer's handlers never change: each method is wrapped once, not per call
        # (unknown methods are not kept, so made-up names cannot grow the table).
        guarded = self.guarded.get(details.method)
        if guarded is None:
            guarded = self._guard(continuation(details), details.method)
            if guarded is not None:
                self.guarded[details.method] = guarded
        return guarded

    def _guard(self, handler, method: str):
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        message = f"the request is not a valid {method.rsplit('/', 1)[-1]} request message"

        def guarded(data: bytes):
            try:
                return decode(data)
            except Exception:
                return _Undecodable()

        def checked(behavior):
            def unary_request(request, context):
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                return behavior(request, context)

            return unary_request

        def stream_request(behavior):
            def call(requests, context):
                def each():
                    for request in requests:
                        if isinstance(request, _Undecodable):
                            raise InvalidArgument("request", message)
                        yield request

                return behavior(each(), context)

            return call

        kinds = {
            (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler, checked),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler, checked),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler, stream_request),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler, stream_request),
        }
        name, make, wrap = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(
            wrap(getattr(handler, name)),
            request_deserializer=guarded,
            response_serializer=_sent_as_is(handler.response_serializer),
        )


def _sent_as_is(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serialize is None:
        return None

    def serialized(message: Any) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return serialized
