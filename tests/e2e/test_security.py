"""TLS, mTLS and bearer tokens on a real server (the transformers engine), with certificates made
in the test: who may come in does, nobody else does, and probes still reach the health service."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
import yaml
from attnserve_client.cli import app
from attnserve_client.v1 import inference_service_pb2 as pb
from attnserve_client.v1 import inference_service_pb2_grpc as pb_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from .conftest import running_server
from .helpers import QUESTION, chat_request

FILE_TOKEN = "file-token-0123456789abcdef"
ENV_TOKEN = "env-token-rotated-in-0123456789"
LIMITED_TOKEN = "limited-token-0123456789abcdef"


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, key, issuer_name: x509.Name, issuer_key, *, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attnserve test CA")])
    ca = _certificate("attnserve test CA", ca_key, ca_name, ca_key, ca=True)
    files = {"ca.crt": _pem(ca)}
    for name, server in (("server", True), ("client", False)):
        key = _key()
        files[f"{name}.crt"] = _pem(_certificate(name, key, ca_name, ca_key, ca=False, server=server))
        files[f"{name}.key"] = _key_pem(key)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: folder / name for name in files}


@pytest.fixture(scope="module")
def client_credentials(pki) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca.crt"].read_bytes(),
        private_key=pki["client.key"].read_bytes(),
        certificate_chain=pki["client.crt"].read_bytes(),
    )


@pytest.fixture(scope="module")
def secure_server(pki, smollm2_path, tmp_path_factory, client_credentials):
    folder = tmp_path_factory.mktemp("secure")
    (folder / "tokens").write_text(
        f"# rotated tokens: both valid\n{FILE_TOKEN}\n{LIMITED_TOKEN}  some-other-model  # limited\n"
    )
    config = {
        "security": {
            "tls": {
                "cert_file": str(pki["server.crt"]),
                "key_file": str(pki["server.key"]),
                "client_ca_file": str(pki["ca.crt"]),
            },
            "tokens_file": str(folder / "tokens"),
            "tokens_env": "TEST_ATTNSERVE_TOKENS",
        },
        "models": [{"name": "smollm2", "kind": "llm", "engine": "transformers", "path": str(smollm2_path)}],
    }
    path = folder / "attnserve.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"TEST_ATTNSERVE_TOKENS": ENV_TOKEN}
    with running_server(path, folder / "server.log", credentials=client_credentials, env=env) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_channel(secure_server, client_credentials):
    with grpc.secure_channel(secure_server["target"], client_credentials) as channel:
        yield channel


def _bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


@pytest.mark.parametrize("token", [FILE_TOKEN, ENV_TOKEN], ids=["from the file", "from the environment"])
def test_a_known_token_over_mtls_generates(mtls_channel, token):
    stub = pb_grpc.InferenceServiceStub(mtls_channel)
    tokens, complete = [], None
    for response in stub.Generate(
        chat_request(QUESTION, max_tokens=12), metadata=_bearer(token), timeout=120
    ):
        tokens.append(response)
        complete = response.complete if response.HasField("complete") else complete
    assert "Paris" in complete.text


@pytest.mark.parametrize(
    "metadata",
    [(), _bearer("not-a-token-0123456789"), (("authorization", FILE_TOKEN),)],
    ids=["no token", "unknown token", "no Bearer scheme"],
)
def test_without_a_known_token_is_unauthenticated(mtls_channel, metadata):
    stub = pb_grpc.InferenceServiceStub(mtls_channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(chat_request(max_tokens=2), metadata=metadata, timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_model_outside_the_tokens_list_is_permission_denied(mtls_channel):
    stub = pb_grpc.InferenceServiceStub(mtls_channel)
    for call in (
        lambda: stub.GetModel(
            pb.GetModelRequest(name="smollm2"), metadata=_bearer(LIMITED_TOKEN), timeout=30
        ),
        lambda: list(stub.Generate(chat_request(max_tokens=2), metadata=_bearer(LIMITED_TOKEN), timeout=30)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "smollm2" in info.value.details()


def test_health_needs_no_token(mtls_channel):
    health = health_pb2_grpc.HealthStub(mtls_channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="attnserve.v1.InferenceService"), timeout=30)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_tls_without_a_client_certificate_is_refused(secure_server, pki):
    server_only = grpc.ssl_channel_credentials(root_certificates=pki["ca.crt"].read_bytes())
    with (
        grpc.secure_channel(secure_server["target"], server_only) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_is_refused(secure_server):
    with grpc.insecure_channel(secure_server["target"]) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_cli_takes_tls_and_a_token(secure_server, pki):
    runner = CliRunner()
    tls = [
        "--tls-ca",
        str(pki["ca.crt"]),
        "--tls-cert",
        str(pki["client.crt"]),
        "--tls-key",
        str(pki["client.key"]),
    ]
    target = ["--target", secure_server["target"]]
    result = runner.invoke(app, [*tls, "--token", FILE_TOKEN, "model", "smollm2", *target])
    assert result.exit_code == 0, result.output
    assert "rpcs:        Generate, Score" in result.stdout
    refused = runner.invoke(app, [*tls, "model", "smollm2", *target])
    assert refused.exit_code != 0
    assert "UNAUTHENTICATED" in refused.output
