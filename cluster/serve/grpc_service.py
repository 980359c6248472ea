"""The gRPC Inference service (inference.proto): a grpc.aio server inside the ingress replica.

The ingress serves gRPC itself, not through Serve's gRPC proxy, because that proxy always listens on
every interface (`[::]`); this server binds where HTTP binds (`serve.http_host`, loopback by default).
Bytes that are not a GenerateRequest reach the ingress as `Undecodable`, answered INVALID_ARGUMENT.
Beside it the server runs gRPC's standard Health service (what Kubernetes' gRPC probes and load
balancers ask; the ingress's readiness, as /health answers it) and Reflection (grpcurl and other
clients discover the API from the server).
Below: the chat fields (tools, tool calls, reasoning) between inference.proto and the OpenAI shapes
the ingress uses.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ...proto import inference_pb2 as pb
from .metrics import GRPC_RESPONSES

log = logging.getLogger(__name__)

SERVICE = "pdcluster.inference.v1.Inference"


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes do not parse as a GenerateRequest (the proxy pickles it to the ingress)."""
    error: str


def decode_request(data: bytes) -> pb.GenerateRequest | Undecodable:
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as exc:
        return Undecodable(str(exc) or "malformed protobuf")


def add_inference_servicer(servicer: Any, server: grpc.Server | grpc.aio.Server) -> None:
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        servicer.Generate, request_deserializer=decode_request,
        response_serializer=pb.GenerateResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class _Servicer:
    """Hands each call to the ingress's `Generate`; a failure it gave a status (set_code) is sent
    with that status, anything else as UNKNOWN. Each call's final status is counted."""

    def __init__(self, ingress: Any) -> None:
        self._ingress = ingress

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        outcome = grpc.StatusCode.UNKNOWN
        try:
            async for response in self._ingress.Generate(request, context):
                yield response
            outcome = grpc.StatusCode.OK
        except (asyncio.CancelledError, GeneratorExit):   # the client cancelled, went away or ran out of time
            remaining = context.time_remaining()
            outcome = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                       else grpc.StatusCode.CANCELLED)
            raise
        except Exception:
            code = context.code()
            if code is None or code == grpc.StatusCode.OK:
                raise
            outcome = code
            await context.abort(code, context.details() or "")
        finally:
            GRPC_RESPONSES.labels("Generate", outcome.name).inc()


class Health(health.aio.HealthServicer):
    """gRPC's Health service, for the server as a whole ("") and for the Inference service:
    SERVING while `readiness()` says ready, as the ingress's periodic `refresh()` last found (a
    Check is answered from that: a flood of them costs the router nothing)."""

    def __init__(self, readiness: Callable[[], Awaitable[bool]]) -> None:
        super().__init__()
        self._readiness = readiness

    async def refresh(self, timeout_s: float = 5.0) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if await self._readiness()
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SERVICE):
            # a watcher's write holds the service's lock (upstream's Watch): a stuck one is not
            # waited on for long
            await asyncio.wait_for(self.set(service, status), timeout_s)


async def start_server(ingress: Any, health_servicer: Health, host: str, port: int,
                       max_message_bytes: int, wait_s: float = 0.0) -> grpc.aio.Server:
    """Serve `ingress.Generate`, `health_servicer` and reflection on host:port (in the running event
    loop); raises if the port is still taken after `wait_s` seconds."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    deadline = time.monotonic() + wait_s
    while True:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                          ("grpc.so_reuseport", 0)])
        add_inference_servicer(_Servicer(ingress), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            server.add_insecure_port(address)
            break
        except RuntimeError as exc:  # grpc raises when it cannot bind
            if time.monotonic() >= deadline:
                raise RuntimeError(f"gRPC cannot listen on {address}: {exc}") from None
            log.warning("gRPC port %s still taken (the replica this one replaces?); retrying", address)
            await asyncio.sleep(0.5)
    await server.start()
    return server
# The chat fields inference.proto carries as JSON text, by their OpenAI names.
_JSON_FIELDS = {"tools_json": "tools", "tool_choice_json": "tool_choice",
                "chat_template_kwargs_json": "chat_template_kwargs"}


def chat_fields(request: pb.GenerateRequest) -> dict[str, Any]:
    """A GenerateRequest's chat-only fields as OpenAI request fields; ValueError names a field
    that holds no JSON, or one set on a request without messages."""
    fields: dict[str, Any] = {}
    for name, openai_name in _JSON_FIELDS.items():
        if text := getattr(request, name):
            try:
                fields[openai_name] = json.loads(text)
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if request.HasField("parallel_tool_calls"):
        fields["parallel_tool_calls"] = request.parallel_tool_calls
    if fields and not request.messages:
        raise ValueError(f"{', '.join(sorted(fields))} apply to chats (messages) only")
    return fields


def chat_message(m: pb.ChatMessage) -> dict[str, Any]:
    """A request's ChatMessage as an OpenAI message."""
    msg: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
    if m.tool_call_id:
        msg["tool_call_id"] = m.tool_call_id
    if m.name:
        msg["name"] = m.name
    return msg


def response_parts(deltas: list[dict[str, Any]]) -> tuple[str, str, list[pb.ToolCall]]:
    """(content, reasoning, tool-call deltas) of a step's chat deltas (chat_output.ChatOutput.feed)."""
    content = "".join(d.get("content", "") for d in deltas)
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    calls = [pb.ToolCall(index=tc["index"], id=tc.get("id", ""), name=tc["function"].get("name", ""),
                         arguments=tc["function"].get("arguments", ""))
             for d in deltas for tc in d.get("tool_calls", [])]
    return content, reasoning, calls


def usage_message(use: dict[str, Any]) -> pb.Usage:
    """OpenAI's usage object (openai_protocol.usage) as inference.proto's Usage."""
    details = use.get("completion_tokens_details") or {}
    return pb.Usage(prompt_tokens=use["prompt_tokens"], completion_tokens=use["completion_tokens"],
                    cached_tokens=use["prompt_tokens_details"]["cached_tokens"],
                    reasoning_tokens=details.get("reasoning_tokens"))
