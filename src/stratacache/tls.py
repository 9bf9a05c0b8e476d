"""TLS and mutual TLS for the gRPC server and the clients: PEM files read, checked and turned
into gRPC credentials.

Server: ``--tls-cert`` (the certificate chain, leaf first) and ``--tls-key`` serve TLS;
``--tls-client-ca`` also requires every client to present a certificate signed by one of its
CAs (mutual TLS). Client: :func:`channel_credentials` (``Client(..., tls=True, ...)``).

Every file is parsed with ``cryptography`` before gRPC sees it, so a missing file, a swapped
argument, an encrypted key or a key that does not belong to its certificate fails at start with
the flag and path named, instead of as a failed handshake on every call later.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path
from typing import TypeAlias

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .config import Settings

__all__ = ["PemSource", "add_port", "channel_credentials", "server_credentials"]

log = logging.getLogger(__name__)

#: PEM data as bytes, or the path of a PEM file as a str or Path.
PemSource: TypeAlias = bytes | str | os.PathLike[str]


def _read(source: PemSource, label: str) -> bytes:
    """The PEM bytes of ``source`` (bytes as they are, a str or Path read from that file)."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, str) and "-----BEGIN" in source:
        raise ValueError(f"{label}: got PEM text as a str, which is read as a file path; pass "
                         "the PEM contents as bytes (text.encode()) or the file's path")
    path = Path(source)
    try:
        return path.read_bytes()
    except OSError as exc:
        # The same OSError subclass (FileNotFoundError, PermissionError, ...), with a message
        # that names the flag as well as the path.
        raise type(exc)(f"{label} {path}: cannot read it ({exc.strerror or exc}); give the "
                        "path of a PEM file this process may read") from exc


def _certificates(data: bytes, label: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{label}: not a PEM certificate (expected '-----BEGIN CERTIFICATE-----' "
                         "blocks); was a key or a DER file given instead?") from None


def _check_key(data: bytes, label: str, chain: list[x509.Certificate], chain_label: str) -> None:
    """Raises ValueError unless ``data`` is an unencrypted PEM private key of ``chain[0]``."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        raise ValueError(f"{label}: the private key is encrypted with a passphrase, which gRPC "
                         "cannot use; write an unencrypted copy readable only by the server "
                         "(openssl pkey -in KEY -out KEY.plain)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{label}: not a PEM private key (expected '-----BEGIN ... PRIVATE "
                         "KEY-----'); was a certificate given instead?") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != chain[0].public_key().public_bytes(*raw):
        raise ValueError(f"{label}: this private key does not belong to the first certificate "
                         f"of {chain_label} ({chain[0].subject.rfc4514_string()}); give the key "
                         "the certificate was issued for")


def _warn_if_outside_validity(cert: x509.Certificate, label: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        log.warning("%s: the certificate %s is valid only from %s to %s; clients will refuse it",
                    label, cert.subject.rfc4514_string(), cert.not_valid_before_utc,
                    cert.not_valid_after_utc)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The server's TLS credentials from ``settings.tls_cert``/``tls_key`` (and
    ``tls_client_ca``: clients must then present a certificate one of its CAs signed).

    Args:
        settings: the server's settings (Settings already checks the three paths go together).

    Returns:
        The credentials, or None when ``tls_cert`` is not set (plaintext).

    Raises:
        OSError: a file is missing or unreadable (the message names the flag and path).
        ValueError: a file is not what its flag needs (not PEM, an encrypted key, a key that
            does not match the certificate).
    """
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert_label, key_label = f"--tls-cert {settings.tls_cert}", f"--tls-key {settings.tls_key}"
    chain_pem = _read(settings.tls_cert, "--tls-cert")
    chain = _certificates(chain_pem, cert_label)
    _warn_if_outside_validity(chain[0], cert_label)
    key_pem = _read(settings.tls_key, "--tls-key")
    _check_key(key_pem, key_label, chain, cert_label)
    client_ca = None
    if settings.tls_client_ca is not None:
        client_ca = _read(settings.tls_client_ca, "--tls-client-ca")
        _certificates(client_ca, f"--tls-client-ca {settings.tls_client_ca}")
    return grpc.ssl_server_credentials([(key_pem, chain_pem)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def add_port(server: grpc.aio.Server, address: str, settings: Settings) -> int:
    """Makes ``server`` listen on ``address``: TLS when ``settings.tls_cert`` is set (see
    :func:`server_credentials`), plaintext otherwise.

    Args:
        server: the gRPC server, not started yet.
        address: "host:port" (port 0 picks a free one).
        settings: the server's settings.

    Returns:
        The bound port; 0 when the address could not be bound.

    Raises:
        OSError, ValueError: as :func:`server_credentials`.
    """
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def channel_credentials(*, root_certificates: PemSource | None = None,
                        certificate_chain: PemSource | None = None,
                        private_key: PemSource | None = None) -> grpc.ChannelCredentials:
    """A client's TLS credentials; each argument is PEM data as bytes, or a PEM file's path as
    a str or Path.

    Args:
        root_certificates: the CA certificate(s) the server's certificate must chain to; None:
            the system's (gRPC's) trusted roots.
        certificate_chain: the client's own certificate chain, for a server that requires
            client certificates (mutual TLS); goes with ``private_key``.
        private_key: the unencrypted private key of ``certificate_chain``.

    Returns:
        Credentials for ``grpc.secure_channel`` / ``grpc.aio.secure_channel``.

    Raises:
        OSError: a file is missing or unreadable.
        ValueError: ``certificate_chain`` without ``private_key`` or the reverse, or data that
            is not what its argument needs (not PEM, an encrypted or mismatched key).
    """
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (the client's own "
                         "certificate for mutual TLS): give both, or neither")
    roots = chain_pem = key_pem = None
    if root_certificates is not None:
        roots = _read(root_certificates, "root_certificates")
        _certificates(roots, "root_certificates")
    if certificate_chain is not None and private_key is not None:
        chain_pem = _read(certificate_chain, "certificate_chain")
        chain = _certificates(chain_pem, "certificate_chain")
        key_pem = _read(private_key, "private_key")
        _check_key(key_pem, "private_key", chain, "certificate_chain")
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=key_pem,
                                        certificate_chain=chain_pem)
