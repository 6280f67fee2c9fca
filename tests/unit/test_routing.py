"""The router reads the adapter from a gRPC request exactly as Serve's proxy sends it."""

import pickle

from hybridserve.generation.routing import adapter_from_args
from hybridserve.v1 import generation_pb2
from ray.serve._private.common import gRPCRequest


def test_adapter_from_pickled_grpc_request():
    req = generation_pb2.GenerateRequest(prompt="hi", adapter="tone@v1")
    args = (pickle.dumps(gRPCRequest(user_request_proto=req)),)
    assert adapter_from_args(args) == "tone@v1"


def test_no_adapter_or_foreign_payloads_route_like_serve():
    base = generation_pb2.GenerateRequest(prompt="hi")
    assert adapter_from_args((pickle.dumps(gRPCRequest(user_request_proto=base)),)) == ""
    other = generation_pb2.ListAdaptersRequest()
    assert adapter_from_args((pickle.dumps(gRPCRequest(user_request_proto=other)),)) == ""
    assert adapter_from_args((b"not a pickle",)) == ""
    assert adapter_from_args(()) == ""
    assert adapter_from_args(("a plain string arg",)) == ""
