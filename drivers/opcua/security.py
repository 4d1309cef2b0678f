"""OPC UA security: the agent's client certificate (created on first start), the pinned server
certificate, and what a secured connection needs (docs/opcua.md, "Security").

asyncua's ``set_security`` without a server certificate fetches one over an unsecured channel
and trusts it. Here the configured ``server_certificate`` is always used, and before
connecting the endpoint list is fetched (GetEndpoints needs no security) only to compare the
server's certificate with the configured one, so that a mismatch gives one clear error
instead of an undecipherable handshake failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Final

from asyncua import ua
from asyncua.client.client import Client
from asyncua.crypto import security_policies
from asyncua.ua.uaerrors import UaError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from drivers.base import DriverContext, DriverFault
from drivers.opcua.client import connect_error
from drivers.opcua.config import OpcUaDeviceConfig

log = logging.getLogger("edge_agent.opcua")

_POLICIES: Final[dict[str, type[security_policies.SecurityPolicy]]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
_MODES: Final[dict[str, ua.MessageSecurityMode]] = {
    "None": ua.MessageSecurityMode.None_,
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}
_CERT_LOCK_KEY: Final = "opcua:pki-lock"
_CERT_DAYS: Final = 3650
# The pki directory and the pair in it are the agent's alone, whatever the umask (as the data
# directory's files, docs/install.md "File modes"; drivers cannot import sync/files.py).
_PRIVATE_DIR: Final = 0o700
_PRIVATE_FILE: Final = 0o600


@dataclasses.dataclass(frozen=True, slots=True)
class Security:
    """What a secured connection uses: policy, mode, the agent's pair, the pinned server cert."""

    policy: type[security_policies.SecurityPolicy]
    mode: ua.MessageSecurityMode
    certificate: bytes  # DER
    private_key: bytes  # PKCS#8 DER
    server_certificate: bytes  # DER
    application_uri: str

    async def apply(self, client: Client) -> None:
        """Secure ``client``'s channel with the configured (never a fetched) server cert."""
        await client.set_security(
            self.policy,
            self.certificate,
            self.private_key,
            server_certificate=self.server_certificate,
            mode=self.mode,
        )


# ---------------------------------------------------------------------- certificate files


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as ``AA:BB:...``."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def _first_certificate(der: bytes) -> bytes:
    # Servers may send their certificate followed by its chain: keep the first DER SEQUENCE.
    if len(der) > 4 and der[0] == 0x30 and der[1] == 0x82:
        return der[: int.from_bytes(der[2:4], "big") + 4]
    return der


def _load_certificate_der(data: bytes) -> bytes:
    """DER bytes of a certificate file that is DER or PEM."""
    try:
        cert = x509.load_der_x509_certificate(data)
    except ValueError:
        cert = x509.load_pem_x509_certificate(data)
    return cert.public_bytes(serialization.Encoding.DER)


def _load_key_der(data: bytes) -> bytes:
    """PKCS#8 DER of an unencrypted private key file that is PEM or DER."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        key = serialization.load_der_private_key(data, password=None)
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _application_uri_of(cert_der: bytes) -> str | None:
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def create_client_certificate(cert_path: Path, key_path: Path, application_uri: str) -> str:
    """Create a self-signed OPC UA application certificate and key (never overwriting);
    returns the certificate's SHA-256 fingerprint."""
    hostname = socket.gethostname()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"edge-agent@{hostname}"[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-agent"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=10))  # tolerate a PLC clock behind ours
        .not_valid_after(now + dt.timedelta(days=_CERT_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(application_uri), x509.DNSName(hostname)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # OPC 10000-6 6.2.2: application instance certificates; keyCertSign because the
            # certificate signs itself.
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_der = cert.public_bytes(serialization.Encoding.DER)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for path in (cert_path, key_path):
        _private_dir(path.parent)
    # Both files complete under their staging names (data and names fsynced) before either
    # gets its real name: a power cut or kill -9 leaves the pair complete or absent, or the
    # key renamed and the certificate still staged, which `finish_interrupted_pair` completes.
    key_staged, cert_staged = _staged(key_path), _staged(cert_path)
    for staged in (key_staged, cert_staged):
        staged.unlink(missing_ok=True)  # left by a cut before anything was renamed
    _write_new(key_staged, key_pem)
    _write_new(cert_staged, cert_der)
    _fsync_dirs(key_path, cert_path)
    if key_path.exists() or cert_path.exists():
        raise FileExistsError(f"{key_path} or {cert_path} appeared meanwhile: not overwritten")
    os.replace(key_staged, key_path)
    os.replace(cert_staged, cert_path)
    _fsync_dirs(key_path, cert_path)
    return fingerprint(cert_der)


def _staged(path: Path) -> Path:
    """Where `path` is written before it gets its name."""
    return path.with_name(f".{path.name}.new")


def _fsync_dirs(*paths: Path) -> None:
    """Make the names in the directories of `paths` durable (a rename is not, until then)."""
    for directory in {path.parent for path in paths}:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def finish_interrupted_pair(cert_path: Path, key_path: Path) -> bool:
    """Complete a pair whose creation was cut after the key got its name: the certificate
    was written and fsynced under its staging name before that (create_client_certificate).
    True when it was completed."""
    cert_staged = _staged(cert_path)
    if key_path.exists() and not cert_path.exists() and cert_staged.exists():
        os.replace(cert_staged, cert_path)
        _fsync_dirs(cert_path)
        return True
    return False


def _private_dir(path: Path) -> None:
    """Create `path` (and missing parents) 0700 whatever the umask; an existing one is kept."""
    missing = []
    while not path.is_dir() and path != path.parent:
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, _PRIVATE_DIR)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue
        os.chmod(directory, _PRIVATE_DIR)  # the umask only removes bits; make it exact
        _fsync_dirs(directory)  # its name in its parent: durable before the pair is written


def _write_new(path: Path, data: bytes) -> None:
    """Write a 0600 file that must not exist yet (O_EXCL: never overwrite an existing one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE_FILE)
    try:
        os.fchmod(fd, _PRIVATE_FILE)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _tighten(path: Path) -> None:
    """Take the group's and others' bits off `path`'s mode when it has any; log when it did."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return  # loading the pair reports it
    if not mode & 0o077:
        return
    try:
        os.chmod(path, mode & 0o700)
    except OSError as exc:
        log.warning("%s has mode %04o and cannot be tightened: %s", path, mode, exc)
        return
    log.warning("%s had mode %04o; tightened to %04o", path, mode, mode & 0o700)


# ---------------------------------------------------------------------- before connecting


async def prepare_security(
    config: OpcUaDeviceConfig, context: DriverContext, application_uri: str
) -> Security:
    """Client certificate (created on first start), key and the pinned server cert."""
    policy = _POLICIES.get(config.security_policy)
    if policy is None:
        raise DriverFault(f"security_mode {config.security_mode} needs a security_policy")
    if config.server_certificate is None:
        raise DriverFault(
            f"server_certificate is required with security_mode {config.security_mode}"
        )
    cert_path, key_path = _certificate_paths(config, context)
    lock = context.shared.get_or_create(asyncio.Lock, _CERT_LOCK_KEY, asyncio.Lock)
    async with lock:  # devices sharing a data_dir must not race to create one pair
        await _ensure_client_certificate(cert_path, key_path, application_uri)
        if config.certificate is None:
            # The default pair is ours alone; a configured one may be shared on purpose
            # (docs/install.md: a key 0640 root:edge-agent), so it is left as it is.
            for path in (key_path, cert_path):
                await asyncio.to_thread(_tighten, path)
    try:
        cert_der = _load_certificate_der(await asyncio.to_thread(cert_path.read_bytes))
        key_der = _load_key_der(await asyncio.to_thread(key_path.read_bytes))
    except (OSError, ValueError, TypeError) as exc:
        raise DriverFault(f"cannot load the client certificate or key: {exc}") from None
    try:
        server_der = _load_certificate_der(
            await asyncio.to_thread(config.server_certificate.read_bytes)
        )
    except (OSError, ValueError) as exc:
        raise DriverFault(
            f"cannot read server_certificate {config.server_certificate}: {exc}"
        ) from None
    return Security(
        policy=policy,
        mode=_MODES[config.security_mode],
        certificate=cert_der,
        private_key=key_der,
        server_certificate=server_der,
        # The session must announce the URI the certificate carries, or servers refuse it.
        application_uri=_application_uri_of(cert_der) or application_uri,
    )


def _certificate_paths(config: OpcUaDeviceConfig, context: DriverContext) -> tuple[Path, Path]:
    if config.certificate is not None and config.private_key is not None:
        return config.certificate, config.private_key
    if context.data_dir is None:
        raise DriverFault("certificate and private_key are not set and there is no data_dir")
    pki = context.data_dir / "pki"
    return pki / "agent-cert.der", pki / "agent-key.pem"


async def _ensure_client_certificate(cert_path: Path, key_path: Path, application_uri: str) -> None:
    """Create the pair when both files are absent; refuse when only one of them exists."""
    if await asyncio.to_thread(finish_interrupted_pair, cert_path, key_path):
        log.warning("OPC UA client certificate %s completed (its creation was cut)", cert_path)
    cert_exists, key_exists = await asyncio.to_thread(
        lambda: (cert_path.exists(), key_path.exists())
    )
    if not cert_exists and not key_exists:
        digest = await asyncio.to_thread(
            create_client_certificate, cert_path, key_path, application_uri
        )
        log.warning(
            "OPC UA client certificate created at %s, SHA-256 fingerprint %s "
            "(application URI %s): trust it on the server",
            cert_path,
            digest,
            application_uri,
        )
    elif cert_exists != key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise DriverFault(
            f"{present} exists but {missing} does not: restore the missing file, or "
            "remove the other so that a new pair is created"
        )


async def check_server_certificate(config: OpcUaDeviceConfig, security: Security) -> None:
    """Compare the endpoint's certificate with the configured one (never trust it)."""
    probe = Client(config.url, timeout=config.timeout)
    try:
        async with asyncio.timeout(config.timeout * 3 + 1.0):
            endpoints = await probe.connect_and_get_server_endpoints()
    except (TimeoutError, OSError, UaError) as exc:
        raise connect_error(config, exc) from None
    finally:
        probe.disconnect_socket()
    matching = [
        ep
        for ep in endpoints
        if ep.SecurityPolicyUri == security.policy.URI and ep.SecurityMode == security.mode
    ]
    if not matching:
        offered = sorted(
            {
                f"{ep.SecurityPolicyUri.rsplit('#', 1)[-1]}/{ep.SecurityMode.name}"
                for ep in endpoints
            }
        )
        raise DriverFault(
            f"server offers no {config.security_policy}/{config.security_mode} endpoint "
            f"(it offers {', '.join(offered) or 'none'})"
        )
    expected = fingerprint(security.server_certificate)
    got = fingerprint(_first_certificate(matching[0].ServerCertificate or b""))
    if got != expected:
        raise DriverFault(
            "server certificate does not match server_certificate "
            f"(expected SHA-256 {expected}, got {got})"
        )
