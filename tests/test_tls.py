"""TLS and mutual TLS: real handshakes on loopback with certificates made at run time (a CA, a
server certificate for 127.0.0.1 and localhost, client certificates from that CA and from
another one), and the clear errors for files that cannot serve."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from stratacache import AsyncClient, Client, UnavailableError
from stratacache.cli import build_parser
from stratacache.config import Settings
from stratacache.tls import channel_credentials, server_credentials

from .conftest import RunningServer

PROMPT = "How many moons does Mars have?"


@dataclass(frozen=True)
class Pki:
    """PEM files: ``ca`` signed the server's and ``client``'s certificates; ``other_ca`` signed
    ``intruder``'s."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    intruder_cert: Path
    intruder_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(common_name: str, key: ec.EllipticCurvePrivateKey,
           issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None, *,
           usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    """A certificate for ``key``: a self-signed CA when ``issuer`` is None, else a leaf for
    ``usage`` (server or client auth) signed by ``issuer``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_name, signer = (_name(common_name), key) if issuer is None else (issuer[0].subject,
                                                                           issuer[1])
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                              critical=False))
    if issuer is None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer[1].public_key()), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(signer, hashes.SHA256())


def _write(folder: Path, name: str, cert: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca, other = _issue("stratacache test CA", ca_key), _issue("another CA", other_key)
    ca_path, _ = _write(folder, "ca", ca, ca_key)
    other_path, _ = _write(folder, "other-ca", other, other_key)
    files = {}
    for name, issuer, usage in (("server", (ca, ca_key), ExtendedKeyUsageOID.SERVER_AUTH),
                                ("client", (ca, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH),
                                ("intruder", (other, other_key), ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        files[name] = _write(folder, name, _issue(name, key, issuer, usage=usage), key)
    return Pki(ca=ca_path, server_cert=files["server"][0], server_key=files["server"][1],
               client_cert=files["client"][0], client_key=files["client"][1], other_ca=other_path,
               intruder_cert=files["intruder"][0], intruder_key=files["intruder"][1])


@pytest.fixture
def tls_server(start_server: Callable[..., RunningServer], pki: Pki) -> RunningServer:
    return start_server(tls_cert=pki.server_cert, tls_key=pki.server_key)


@pytest.fixture
def mtls_server(start_server: Callable[..., RunningServer], pki: Pki) -> RunningServer:
    return start_server(tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca)


def test_store_and_lookup_over_tls(tls_server: RunningServer, pki: Pki,
                                   namespace: str) -> None:
    with Client(tls_server.target, tls=True, root_certificates=pki.ca) as client:
        entry_id = client.store(PROMPT, "Two: Phobos and Deimos.", namespace=namespace)
        hit = client.lookup(PROMPT, namespace=namespace)
    assert hit.hit and hit.entry_id == entry_id and hit.text == "Two: Phobos and Deimos."


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_server: RunningServer) -> None:
    with Client(tls_server.target) as client, pytest.raises(UnavailableError):
        client.stats()


def test_client_refuses_a_server_certificate_its_roots_did_not_sign(
        tls_server: RunningServer, pki: Pki) -> None:
    with Client(tls_server.target, tls=True, root_certificates=pki.other_ca) as client, \
            pytest.raises(UnavailableError):
        client.stats()


def test_mutual_tls_needs_a_certificate_from_the_client_ca(
        mtls_server: RunningServer, pki: Pki, namespace: str) -> None:
    with Client(mtls_server.target, tls=True, root_certificates=pki.ca) as anonymous, \
            pytest.raises(UnavailableError):
        anonymous.stats()
    with Client(mtls_server.target, tls=True, root_certificates=pki.ca,
                certificate_chain=pki.intruder_cert, private_key=pki.intruder_key) as intruder, \
            pytest.raises(UnavailableError):
        intruder.stats()
    with Client(mtls_server.target, tls=True, root_certificates=str(pki.ca),
                certificate_chain=str(pki.client_cert), private_key=str(pki.client_key)) as client:
        client.store(PROMPT, "Two.", namespace=namespace)
        assert client.lookup(PROMPT, namespace=namespace).hit


def test_async_client_over_mutual_tls_with_pem_bytes(mtls_server: RunningServer, pki: Pki,
                                                      namespace: str) -> None:
    async def scenario() -> bool:
        async with AsyncClient(mtls_server.target, tls=True,
                               root_certificates=pki.ca.read_bytes(),
                               certificate_chain=pki.client_cert.read_bytes(),
                               private_key=pki.client_key.read_bytes()) as client:
            await client.store(PROMPT, "Two.", namespace=namespace)
            return (await client.lookup(PROMPT, namespace=namespace)).hit

    assert asyncio.run(scenario())


def test_health_and_reflection_over_mutual_tls(mtls_server: RunningServer,
                                               pki: Pki) -> None:
    credentials = channel_credentials(root_certificates=pki.ca, certificate_chain=pki.client_cert,
                                      private_key=pki.client_key)
    with grpc.secure_channel(mtls_server.target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "stratacache.v1.SemanticCache", "stratacache.v1.CacheAdmin"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        schema = ProtoReflectionDescriptorDatabase(channel)
        assert {"stratacache.v1.SemanticCache", "stratacache.v1.CacheAdmin",
                "grpc.health.v1.Health"} <= set(schema.get_services())
        lookup = schema.FindFileContainingSymbol("stratacache.v1.SemanticCache")
        assert "stratacache.v1.LookupRequest" in {f"{lookup.package}.{m.name}"
                                                  for m in lookup.message_type}


def test_admin_cli_over_mutual_tls(mtls_server: RunningServer, pki: Pki,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
           "--tls-key", str(pki.client_key)]

    def admin(*argv: str) -> int:  # as `stratacache admin ARGV` runs it, less the log setup
        args = build_parser().parse_args(["admin", *argv, "--target", mtls_server.target])
        return int(args.run(args))

    assert admin("health", *tls) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert admin("stats", "--json", *tls) == 0
    assert '"lookups"' in capsys.readouterr().out
    # Without a client certificate the handshake is refused: one line, exit 1.
    assert admin("stats", "--tls-ca", str(pki.ca)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("UNAVAILABLE") and "\n" not in err


# --- files that cannot serve: each error names the flag (or argument) and the path ---


def _settings(tmp_path: Path, *, tls_cert: Path | None = None, tls_key: Path | None = None,
              tls_client_ca: Path | None = None) -> Settings:
    return Settings(data_dir=tmp_path / "data", port=0, metrics_port=0, tls_cert=tls_cert,
                    tls_key=tls_key, tls_client_ca=tls_client_ca)


def test_server_credentials_need_readable_files(tmp_path: Path, pki: Pki) -> None:
    assert server_credentials(_settings(tmp_path)) is None
    missing = tmp_path / "nope.pem"
    with pytest.raises(FileNotFoundError, match=re.escape(f"--tls-cert {missing}")):
        server_credentials(_settings(tmp_path, tls_cert=missing, tls_key=pki.server_key))
    with pytest.raises(FileNotFoundError, match=re.escape(f"--tls-client-ca {missing}")):
        server_credentials(_settings(tmp_path, tls_cert=pki.server_cert, tls_key=pki.server_key,
                                     tls_client_ca=missing))
    with pytest.raises(IsADirectoryError, match=re.escape(f"--tls-key {tmp_path}")):
        server_credentials(_settings(tmp_path, tls_cert=pki.server_cert, tls_key=tmp_path))


def test_server_credentials_reject_what_is_not_pem_of_its_kind(tmp_path: Path,
                                                               pki: Pki) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"\x30\x82 not PEM at all")
    with pytest.raises(ValueError, match=re.escape(f"--tls-cert {garbage}: not a PEM certificate")):
        server_credentials(_settings(tmp_path, tls_cert=garbage, tls_key=pki.server_key))
    # Swapped flags.
    with pytest.raises(ValueError, match="--tls-cert .*: not a PEM certificate"):
        server_credentials(_settings(tmp_path, tls_cert=pki.server_key, tls_key=pki.server_cert))
    with pytest.raises(ValueError, match=re.escape(f"--tls-key {pki.client_key}: this private "
                                                   "key does not belong to the first certificate")):
        server_credentials(_settings(tmp_path, tls_cert=pki.server_cert, tls_key=pki.client_key))
    with pytest.raises(ValueError,
                       match=re.escape(f"--tls-client-ca {garbage}: not a PEM certificate")):
        server_credentials(_settings(tmp_path, tls_cert=pki.server_cert, tls_key=pki.server_key,
                                     tls_client_ca=garbage))


def test_an_encrypted_key_is_refused_with_the_fix(tmp_path: Path, pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ValueError, match="encrypted with a passphrase.*openssl pkey"):
        server_credentials(_settings(tmp_path, tls_cert=pki.server_cert, tls_key=locked))


def test_client_tls_arguments_are_checked(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValueError, match="root_certificates given without tls=True"):
        Client("127.0.0.1:1", root_certificates=pki.ca)
    with pytest.raises(ValueError, match="certificate_chain and private_key go together"):
        Client("127.0.0.1:1", tls=True, certificate_chain=pki.client_cert)
    with pytest.raises(ValueError, match="PEM text as a str"):
        Client("127.0.0.1:1", tls=True, root_certificates=pki.ca.read_text())
    with pytest.raises(FileNotFoundError,
                       match=re.escape(f"root_certificates {tmp_path / 'ca.pem'}")):
        Client("127.0.0.1:1", tls=True, root_certificates=tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="private_key: this private key does not belong"):
        Client("127.0.0.1:1", tls=True, certificate_chain=pki.client_cert,
               private_key=pki.intruder_key)
