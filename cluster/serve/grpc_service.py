"""How Serve's gRPC proxy registers inference.proto's Inference service (`grpc_servicer_functions`).

It is the generated `add_InferenceServicer_to_server` but for one thing: bytes that are not a
GenerateRequest reach the ingress as `Undecodable`, which it answers INVALID_ARGUMENT; with the
generated deserializer grpc fails such a call in the proxy with UNKNOWN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ...proto import inference_pb2 as pb

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


def add_inference_servicer(servicer: Any, server: grpc.Server) -> None:
    handlers = {"Generate": grpc.unary_stream_rpc_method_handler(
        servicer.Generate, request_deserializer=decode_request,
        response_serializer=pb.GenerateResponse.SerializeToString)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
