"""The SDK over TLS (as through a TLS-terminating ingress): a real grpc.aio server with a
self-signed certificate serves the real AdminServicer, and both clients reach it with
`tls=True` and the CA; without the CA the handshake fails."""

from __future__ import annotations

import asyncio
import datetime
import threading

import grpc
import pytest
from hybridserve.client import AsyncHybridServeClient, HybridServeClient
from hybridserve.config import HybridServeConfig
from hybridserve.exceptions import AuthenticationError
from hybridserve.tenancy.servicer import AdminServicer
from hybridserve.v1 import admin_pb2_grpc

from .fakes import tenancy_for


def _self_signed() -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


@pytest.fixture
def tls_server(tmp_path):
    cert, key = _self_signed()
    cfg = HybridServeConfig(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    tenancy, admin_key = tenancy_for(cfg, service="admin")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state = {}

    async def serve():
        server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(cfg, tenancy=tenancy), server)
        state["port"] = server.add_secure_port(
            "localhost:0", grpc.ssl_server_credentials([(key, cert)]))
        await server.start()
        state["server"] = server
        ready.set()
        await server.wait_for_termination()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30)
    yield f"localhost:{state['port']}", cert, admin_key
    # The server's thread is a daemon; ask it to stop without waiting on it.
    asyncio.run_coroutine_threadsafe(state["server"].stop(0), loop)


def test_both_clients_reach_the_platform_through_tls(tls_server):
    address, cert, admin_key = tls_server
    with HybridServeClient(address, api_key=admin_key, tls=True, root_certificates=cert) as c:
        assert c.whoami().kind == "admin"
        with pytest.raises(AuthenticationError):
            HybridServeClient(address, api_key="hst_bad", tls=True, root_certificates=cert).whoami()

    async def run():
        async with AsyncHybridServeClient(address, api_key=admin_key, tls=True,
                                          root_certificates=cert) as c:
            return (await c.whoami()).kind

    assert asyncio.run(run()) == "admin"
    # Without the CA the certificate is not trusted: the call never reaches the server.
    with HybridServeClient(address, api_key=admin_key, tls=True) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.whoami(timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
