"""The simulator's security: offered endpoints, users, the server certificate.

The endpoints offered are a list of (policy, mode) pairs; ``secure=True`` offers only
Basic256Sha256 / SignAndEncrypt with user name and password. The server certificate and key
are generated on first start into the PKI directory (and reused afterwards); without one a
temporary directory is used and removed on close. Every client certificate is trusted.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

from asyncua import ua
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from simulators.opcua.nodes import APPLICATION_URI

__all__ = [
    "ALL_ENDPOINTS",
    "CERT_FILE",
    "DEFAULT_PASSWORD",
    "DEFAULT_USER",
    "KEY_FILE",
    "SECURE_ENDPOINTS",
    "Endpoint",
    "Mode",
    "Policy",
    "ServerCertificate",
    "Users",
    "choose_endpoints",
    "configure_security",
    "generate_server_pki",
]

DEFAULT_USER: Final = "edge"
DEFAULT_PASSWORD: Final = "edge-secret"
CERT_FILE: Final = "server-cert.der"
KEY_FILE: Final = "server-key.pem"

Policy = Literal["None", "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
Mode = Literal["None", "Sign", "SignAndEncrypt"]
Endpoint = tuple[Policy, Mode]

ALL_ENDPOINTS: Final[tuple[Endpoint, ...]] = (
    ("None", "None"),
    ("Basic256Sha256", "Sign"),
    ("Basic256Sha256", "SignAndEncrypt"),
    ("Aes128_Sha256_RsaOaep", "Sign"),
    ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"),
    ("Aes256_Sha256_RsaPss", "Sign"),
    ("Aes256_Sha256_RsaPss", "SignAndEncrypt"),
)
SECURE_ENDPOINTS: Final[tuple[Endpoint, ...]] = (("Basic256Sha256", "SignAndEncrypt"),)

_POLICY_TYPES: Final[Mapping[Endpoint, ua.SecurityPolicyType]] = {
    ("None", "None"): ua.SecurityPolicyType.NoSecurity,
    ("Basic256Sha256", "Sign"): ua.SecurityPolicyType.Basic256Sha256_Sign,
    ("Basic256Sha256", "SignAndEncrypt"): ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    ("Aes128_Sha256_RsaOaep", "Sign"): ua.SecurityPolicyType.Aes128Sha256RsaOaep_Sign,
    ("Aes128_Sha256_RsaOaep", "SignAndEncrypt"): (
        ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt
    ),
    ("Aes256_Sha256_RsaPss", "Sign"): ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
    ("Aes256_Sha256_RsaPss", "SignAndEncrypt"): (
        ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt
    ),
}


def choose_endpoints(endpoints: Sequence[Endpoint] | None, secure: bool) -> tuple[Endpoint, ...]:
    """The endpoints to offer: ``endpoints`` if given, else by ``secure``; ValueError if bad."""
    chosen = tuple(endpoints) if endpoints is not None else None
    if chosen is None:
        chosen = SECURE_ENDPOINTS if secure else (("None", "None"),)
    for endpoint in chosen:
        if endpoint not in _POLICY_TYPES:
            raise ValueError(f"unknown endpoint {endpoint!r}; use e.g. {ALL_ENDPOINTS[2]!r}")
    if not chosen:
        raise ValueError("offer at least one endpoint")
    return chosen


class Users(UserManager):
    """User name / password table, plus anonymous when allowed."""

    def __init__(self, users: Mapping[str, str], allow_anonymous: bool) -> None:
        """Accept ``users`` (name -> password), and anonymous sessions if allowed."""
        self._users = dict(users)
        self._anonymous = allow_anonymous

    def get_user(
        self,
        iserver: InternalServer,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        """The session's user, or None to refuse it (BadUserAccessDenied)."""
        if username is None:
            return User(role=UserRole.User) if self._anonymous else None
        expected = self._users.get(username)
        if expected is None or password is None:
            return None
        if not hmac.compare_digest(expected.encode(), password.encode()):
            return None
        return User(role=UserRole.User, name=username)


def generate_server_pki(directory: Path) -> tuple[Path, Path]:
    """Create the server's self-signed certificate and key in ``directory`` if absent."""
    cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    key = cert_gen.generate_private_key()
    hostname = socket.gethostname()
    names: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(APPLICATION_URI),
        x509.DNSName(hostname),
        x509.DNSName("localhost"),
    ]
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        "edge-agent line simulator",
        {},
        names,
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=3650,
    )
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return cert_path, key_path


class ServerCertificate:
    """The server's certificate and key, in a given directory (kept) or a temporary one."""

    def __init__(self, *, directory: Path | None) -> None:
        """Use ``directory``; None = a temporary directory per start, removed by discard()."""
        self._directory = directory
        self._own_directory: Path | None = None
        self.path: Path | None = None
        self.der: bytes | None = None

    @property
    def fingerprint(self) -> str | None:
        """SHA-256 of the certificate (DER), ``AA:BB:..``; None before it is loaded."""
        if self.der is None:
            return None
        return ":".join(f"{b:02X}" for b in hashlib.sha256(self.der).digest())

    async def load_into(self, server: Server) -> None:
        """Create the certificate and key if absent and hand both to ``server``."""
        directory = self._directory
        if directory is None:
            directory = self._own_directory = Path(tempfile.mkdtemp(prefix="opcua-sim-pki-"))
        cert_path, key_path = await asyncio.to_thread(generate_server_pki, directory)
        self.path = cert_path
        self.der = await asyncio.to_thread(cert_path.read_bytes)
        await server.load_certificate(self.der, "der")
        await server.load_private_key(await asyncio.to_thread(key_path.read_bytes), format="pem")

    def discard(self) -> None:
        """Remove the temporary directory, if one was created."""
        if self._own_directory is not None:
            shutil.rmtree(self._own_directory, ignore_errors=True)
            self._own_directory = None


async def configure_security(
    server: Server,
    *,
    endpoints: Sequence[Endpoint],
    users: Mapping[str, str],
    allow_anonymous: bool,
    certificate: ServerCertificate,
) -> None:
    """Offer ``endpoints`` and the identity tokens; load the certificate if any is secure."""
    server.set_security_policy([_POLICY_TYPES[e] for e in endpoints])
    tokens: list[type] = [ua.UserNameIdentityToken] if users else []
    if allow_anonymous:
        tokens.insert(0, ua.AnonymousIdentityToken)
    server.set_identity_tokens(tokens)
    if any(policy != "None" for policy, _ in endpoints):
        await certificate.load_into(server)
