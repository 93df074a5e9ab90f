"""The node's RPCs are authorised by one server interceptor (nodes/_service.py), for every
method of the service, before the servicer runs: checked here on the generated handlers
with a stand-in context (the mTLS end of it: tests/test_attacks.py)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from federation.proto import bulle_pb2 as pb
from federation.proto import bulle_pb2_grpc as pb_grpc
from nodes._service import ClientCertificateInterceptor


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self, common_name: bytes) -> None:
        self.names = [common_name]
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": self.names}

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted


class _Server:
    """Collects the generic handler ``add_NodeServicer_to_server`` registers."""

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        self.handler = handlers[0]

    def add_registered_method_handlers(self, *args: Any) -> None:
        pass


class _Recorder(pb_grpc.NodeServicer):
    def __init__(self) -> None:
        self.called: list[str] = []

    def __getattribute__(self, name: str) -> Any:
        if name[:1].isupper():
            def method(request: Any, context: Any) -> str:
                self.called.append(name)
                return "answer"
            return method
        return super().__getattribute__(name)


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["Node"].methods]


def _handler(servicer: _Recorder, method: str) -> grpc.RpcMethodHandler:
    server = _Server()
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    interceptor = ClientCertificateInterceptor("bulle-coordinator")
    handler = interceptor.intercept_service(server.handler.service,
                                            _Details(f"/bulle.v1.Node/{method}"))
    assert handler is not None
    return handler


def _behaviour(handler: grpc.RpcMethodHandler) -> Any:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary \
        or handler.stream_stream


@pytest.mark.parametrize("method", METHODS)
def test_every_rpc_refuses_another_certificate_before_the_servicer(method: str) -> None:
    servicer = _Recorder()
    context = _Context(b"intruder")
    with pytest.raises(_Aborted):
        _behaviour(_handler(servicer, method))(None, context)
    assert context.aborted == (grpc.StatusCode.PERMISSION_DENIED,
                               "client certificate not allowed")
    assert servicer.called == []


@pytest.mark.parametrize("method", METHODS)
def test_every_rpc_serves_the_coordinator(method: str) -> None:
    servicer = _Recorder()
    context = _Context(b"bulle-coordinator")
    assert _behaviour(_handler(servicer, method))(None, context) == "answer"
    assert servicer.called == [method] and context.aborted is None


def test_an_unknown_method_stays_unknown() -> None:
    server = _Server()
    pb_grpc.add_NodeServicer_to_server(_Recorder(), server)
    interceptor = ClientCertificateInterceptor("bulle-coordinator")
    assert interceptor.intercept_service(server.handler.service,
                                         _Details("/bulle.v1.Node/Nope")) is None
