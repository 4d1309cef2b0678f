"""OPC UA driver (asyncua client): monitored items, batched polling, verified writes, security.

Protocol and library quirks this module is written around:

* A driver instance is one connection: a fresh asyncua ``Client`` per connect, with
  asyncua's own auto-reconnect off. A client that lost its connection is never reused (its
  session, publish loop and subscription state are gone or stale); the poller closes the
  driver and builds a new one, which re-creates the subscription.
* Subscriptions use asyncua's low-level service call with a plain callback instead of its
  ``Subscription`` class: the handler class creates a task per notification, the iterator
  class a queue item per notification (a queue of 1,000 that silently drops the oldest). The
  callback here turns one PublishResponse into one ``list[Reading]`` and puts it on a small
  bounded queue; when the consumer lags, the callback waits, asyncua's publish loop stops
  asking for more and the server's per-item queues (``queue_size``, discard oldest) absorb it.
  Nothing is dropped on the client side.
* Stall detection: the subscription asks for a keep-alive at least every second or so; the
  iterator raises ``DriverUnavailable`` when neither data nor a keep-alive arrived within
  ``max(3 x keep-alive period, timeout) + 1 s`` (counted while the consumer waits, so that
  a busy agent does not mistake its own delay for a silent server). asyncua's session
  watchdog reports a lost connection at once, and a hung one (a ServerStatus read every
  ``max(10 s, 5 x timeout)`` with that deadline: generous, because under load the agent's
  event loop and a busy server each add seconds) as a BadShutdown status change, which ends
  the iterator. Reads and writes run under a deadline.
* asyncua's ``disconnect()`` waits for CloseSession, which a hung server never answers, and
  leaves its background tasks running when interrupted: closing is bounded and finishes by
  cancelling those tasks and dropping the socket.
* Security: asyncua's ``set_security`` without a server certificate fetches one over an
  unsecured channel and trusts it. Here the configured ``server_certificate`` is always used,
  and before connecting the endpoint list is fetched (GetEndpoints needs no security) only to
  compare the server's certificate with the configured one, so that a mismatch gives one
  clear error instead of an undecipherable handshake failure.
* NaN and ±Infinity have no JSON representation: such a value (or an array holding one) is
  published as ``null`` with quality ``bad`` and the reason in the reading's error.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import logging
import math
import os
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Final, cast

from asyncua import ua
from asyncua.client.client import Client
from asyncua.common.node import Node
from asyncua.common.ua_utils import data_type_to_variant_type
from asyncua.crypto import security_policies
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from asyncua.ua.uaerrors import UaError, UaStatusCodeError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from drivers.base import (
    Driver,
    DriverContext,
    DriverError,
    DriverFault,
    DriverUnavailable,
    JsonValue,
    Reading,
    WriteUnverified,
)
from drivers.config import DeviceConfigBase, TagConfigBase
from drivers.opcua.config import OpcUaDeviceConfig, OpcUaTagConfig

log = logging.getLogger("edge_agent.opcua")

_VT = ua.VariantType
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
_INT_RANGES: Final[dict[ua.VariantType, tuple[int, int]]] = {
    _VT.SByte: (-(2**7), 2**7 - 1),
    _VT.Byte: (0, 2**8 - 1),
    _VT.Int16: (-(2**15), 2**15 - 1),
    _VT.UInt16: (0, 2**16 - 1),
    _VT.Int32: (-(2**31), 2**31 - 1),
    _VT.UInt32: (0, 2**32 - 1),
    _VT.Int64: (-(2**63), 2**63 - 1),
    _VT.UInt64: (0, 2**64 - 1),
}
_FLOAT_TYPES: Final = frozenset({_VT.Float, _VT.Double})
_NUMERIC_TYPES: Final = frozenset(_INT_RANGES) | _FLOAT_TYPES
_FLOAT32_MAX: Final = 3.4028234663852886e38
_LOGIN_REFUSED: Final = frozenset(
    {
        StatusCodes.BadUserAccessDenied,
        StatusCodes.BadIdentityTokenRejected,
        StatusCodes.BadIdentityTokenInvalid,
    }
)
_SECURITY_REFUSED: Final = frozenset(
    {
        StatusCodes.BadSecurityChecksFailed,
        StatusCodes.BadCertificateUntrusted,
        StatusCodes.BadCertificateInvalid,
        StatusCodes.BadCertificateUriInvalid,
        StatusCodes.BadCertificateTimeInvalid,
        StatusCodes.BadCertificateRevoked,
        StatusCodes.BadSecurityPolicyRejected,
        StatusCodes.BadSecurityModeRejected,
        StatusCodes.BadApplicationSignatureInvalid,
    }
)
_CERT_LOCK_KEY: Final = "opcua:pki-lock"
_BATCH: Final = 1000  # monitored items per CreateMonitoredItems call (PLCs limit it)
_QUEUE_BATCHES: Final = 8  # PublishResponses buffered before the publish loop waits
_CERT_DAYS: Final = 3650
_EPOCH_2000: Final = 946_684_800.0


# ---------------------------------------------------------------------- values


class NotFinite(ValueError):
    """A float that JSON cannot carry (NaN, ±Infinity)."""


def json_value(value: Any) -> JsonValue:
    """An OPC UA value as JSON data: numbers, booleans, strings, arrays as lists.

    DateTime becomes RFC 3339 UTC text, ByteString base64, LocalizedText its text, NodeId and
    QualifiedName their string form, structures an object of their fields. NaN/Inf raise
    NotFinite (see the module notes).
    """
    kind = type(value)
    if kind is int or kind is str or kind is bool or value is None:
        return cast(JsonValue, value)
    if kind is float:
        if math.isfinite(value):
            return cast(float, value)
        raise NotFinite(f"not a finite number ({value})")
    if kind is list or kind is tuple:
        return [json_value(item) for item in value]
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        text = stamp.astimezone(dt.UTC).isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z")
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, ua.Variant):  # elements of a BaseDataType array
        return json_value(value.Value)
    if isinstance(value, ua.LocalizedText):
        return value.Text
    if isinstance(value, ua.NodeId | ua.QualifiedName):
        return value.to_string()
    if isinstance(value, ua.StatusCode):
        return status_name(value.value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Enum):
        return json_value(value.value)
    if isinstance(value, bool):  # subclasses of the JSON types (enums are handled above)
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return json_value(float(value))
    if isinstance(value, str):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {  # type: ignore[return-value]  # JSON object: a structure's fields
            field.name: json_value(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    return str(value)


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(cast(ua.UInt32, code))


def _node_id(identifier: Any, namespace: int, kind: ua.NodeIdType) -> ua.NodeId:
    return ua.NodeId(identifier, cast(ua.Int16, namespace), kind)


def status_name(code: int) -> str:
    """``BadSensorFailure`` for a status code, ignoring the info bits (overflow etc.)."""
    for candidate in (code, code & 0xFFFF0000):
        name = _status(candidate).name
        if name not in ("Good", "Uncertain", "Bad") or candidate in (0, 0x40000000, 0x80000000):
            return name
    return f"0x{code:08X}"


def _epoch(stamp: dt.datetime | None) -> float | None:
    if stamp is None:
        return None
    seconds = stamp.timestamp()
    # A server without a clock may send the minimum FILETIME (1601): treat as absent.
    return seconds if seconds > _EPOCH_2000 else None


def make_reading(tag: str, value: ua.DataValue | None, received: float) -> Reading:
    """One DataValue as a Reading: quality from the status code's severity, event time from
    SourceTimestamp, else ServerTimestamp, else the time of receipt."""
    if value is None:
        return Reading(tag, None, "bad", received, "no value")
    ts = _epoch(value.SourceTimestamp) or _epoch(value.ServerTimestamp) or received
    code = value.StatusCode.value if value.StatusCode is not None else 0
    severity = code >> 30
    if severity >= 2:
        # Bad: the value must not be used (Part 4 7.34); publish null with the status name.
        return Reading(tag, None, "bad", ts, status_name(code))
    variant = value.Value
    try:
        data = json_value(variant.Value if variant is not None else None)
    except NotFinite as exc:
        return Reading(tag, None, "bad", ts, str(exc))
    if severity == 1:
        return Reading(tag, data, "uncertain", ts, status_name(code))
    return Reading(tag, data, "good", ts)


def _is_array(rank: Any) -> bool | None:
    """From a ValueRank: -1 scalar, >= 0 array (0: one or more dimensions), -2 any and -3
    scalar or one dimension: either (decided by the value written)."""
    if not isinstance(rank, int) or rank in (-2, -3):
        return None
    return rank >= 0


def _to_float32(number: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", number))[0])


def to_variant(
    value: JsonValue, vtype: ua.VariantType, array: bool | None
) -> tuple[ua.Variant, Any]:
    """Convert a JSON value to the node's type; returns the variant and the value a read-back
    must show. ``array``: the node holds an array (True), a scalar (False), either (None).
    Raises ValueError with a readable reason when it cannot be converted."""
    if array is None:
        array = isinstance(value, list)
    if array or isinstance(value, list):
        if not array:
            raise ValueError(f"expected a single {vtype.name}, got a list")
        if not isinstance(value, list):
            raise ValueError(f"expected a list of {vtype.name}, got {value!r}")
        items = [_to_scalar(item, vtype) for item in value]
        return ua.Variant(items, vtype, is_array=True), [_expected(item, vtype) for item in items]
    scalar = _to_scalar(value, vtype)
    return ua.Variant(scalar, vtype), _expected(scalar, vtype)


def _expected(value: Any, vtype: ua.VariantType) -> Any:
    if vtype == _VT.Float:
        return _to_float32(value)
    try:
        return json_value(value)
    except NotFinite:
        return value


def _to_scalar(value: Any, vtype: ua.VariantType) -> Any:
    if value is None:
        raise ValueError("cannot write null")
    if vtype == _VT.Boolean:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"expected a boolean, got {value!r}")
    if vtype in _INT_RANGES:
        number: int
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            number = int(value.strip())
        else:
            raise ValueError(f"expected an integer, got {value!r}")
        low, high = _INT_RANGES[vtype]
        if not low <= number <= high:
            raise ValueError(f"{number} is out of range for {vtype.name} ({low}..{high})")
        return number
    if vtype in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        number_f = float(value)
        if not math.isfinite(number_f):
            raise ValueError(f"cannot write {number_f}")
        if vtype == _VT.Float and abs(number_f) > _FLOAT32_MAX:
            raise ValueError(f"{number_f} does not fit a Float")
        return number_f
    if vtype == _VT.String:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if vtype == _VT.LocalizedText:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return ua.LocalizedText(value)
    if vtype == _VT.DateTime:
        if not isinstance(value, str):
            raise ValueError(f"expected an RFC 3339 time, got {value!r}")
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)
    if vtype == _VT.ByteString:
        if not isinstance(value, str):
            raise ValueError(f"expected base64 text, got {value!r}")
        return base64.b64decode(value, validate=True)
    raise ValueError(f"writing {vtype.name} values is not supported")


# ---------------------------------------------------------------------- certificates


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
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_new(key_path, key_pem, 0o600)
    _write_new(cert_path, cert_der, 0o644)
    return fingerprint(cert_der)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet (O_EXCL: never overwrite an existing one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass(frozen=True, slots=True)
class _Security:
    policy: type[security_policies.SecurityPolicy]
    mode: ua.MessageSecurityMode
    certificate: bytes  # DER
    private_key: bytes  # PKCS#8 DER
    server_certificate: bytes  # DER
    application_uri: str


# ---------------------------------------------------------------------- subscription


class _ReadingStream:
    """What ``subscriptions()`` returns: one ``list[Reading]`` per PublishResponse.

    A class rather than an async generator, so that a consumer cancelled mid-iteration leaves
    nothing for asyncio to finalise in a background task.
    """

    def __init__(self, url: str, handles: dict[int, str], stall_after: float) -> None:
        self.url = url
        self.handles = handles
        self.stall_after = stall_after
        self.last_activity = time.monotonic()
        self.publishes = 0
        self.notifications = 0
        self._queue: asyncio.Queue[list[Reading] | None] = asyncio.Queue(_QUEUE_BATCHES)
        self._failure: str | None = None

    async def on_publish(self, result: ua.PublishResult) -> None:
        """asyncua's publish-loop callback (data, keep-alives and status changes)."""
        self.last_activity = time.monotonic()
        self.publishes += 1
        data = result.NotificationMessage.NotificationData
        if not data:
            return  # keep-alive
        received = time.time()
        handles = self.handles
        readings: list[Reading] = []
        for notification in data:
            if isinstance(notification, ua.DataChangeNotification):
                for item in notification.MonitoredItems:
                    tag = handles.get(item.ClientHandle)
                    if tag is not None:
                        readings.append(make_reading(tag, item.Value, received))
            elif isinstance(notification, ua.StatusChangeNotification):
                # The subscription is gone: asyncua's session watchdog saw the connection die
                # or the server stop answering (it reports BadShutdown), or the server ended it.
                code = notification.Status.value
                if code == StatusCodes.BadShutdown:
                    self.fail("connection lost or the server stopped answering")
                else:
                    self.fail(f"subscription ended by the server ({status_name(code)})")
        if readings:
            self.notifications += len(readings)
            # Backpressure: while the queue is full the publish loop waits here and stops
            # asking the server for more; the server's monitored-item queues hold the rest.
            await self._queue.put(readings)
            self.last_activity = time.monotonic()

    def put_nowait(self, readings: list[Reading]) -> None:
        """Queue readings produced locally (items the server refused)."""
        if readings:
            self._queue.put_nowait(readings)

    def fail(self, reason: str) -> None:
        """End the iteration with DriverUnavailable(reason) after what is queued."""
        if self._failure is None:
            self._failure = reason
            # If the queue is full the consumer is busy and finds the failure after it.
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    def __aiter__(self) -> _ReadingStream:
        return self

    async def __anext__(self) -> list[Reading]:
        # The stall clock runs only while the consumer waits: a consumer that was busy (and
        # so held the publish loop back) must not mistake its own delay for a silent server.
        waiting_since = time.monotonic()
        while True:
            if self._queue.empty():
                if self._failure is not None:
                    raise DriverUnavailable(f"{self.url}: {self._failure}")
                since = max(self.last_activity, waiting_since)
                remaining = since + self.stall_after - time.monotonic()
                if remaining <= 0:
                    raise DriverUnavailable(
                        f"{self.url}: no publish response or keep-alive for "
                        f"{self.stall_after:.1f} s (server stalled?)"
                    )
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._queue.get()
                except TimeoutError:
                    continue  # re-check: a keep-alive may have arrived meanwhile
            else:
                item = self._queue.get_nowait()
            if item is None:
                raise DriverUnavailable(f"{self.url}: {self._failure or 'subscription closed'}")
            return item


# ---------------------------------------------------------------------- driver


class OpcUaDriver(Driver):
    """An OPC UA server: one subscription for subscribe-mode tags, one batched Read per poll
    for poll-mode tags, verified writes converted to each node's data type."""

    config: OpcUaDeviceConfig

    def __init__(self, config: DeviceConfigBase, context: DriverContext | None = None) -> None:
        if not isinstance(config, OpcUaDeviceConfig):
            raise TypeError("OpcUaDriver needs an OpcUaDeviceConfig")
        super().__init__(config, context)
        self._application_uri = (
            self.context.application_uri or f"urn:edge-agent:{socket.gethostname()}"
        )
        self._poll = tuple(tag for tag in config.tags if tag.mode == "poll")
        self._subscribed = tuple(tag for tag in config.tags if tag.mode == "subscribe")
        self._client: Client | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._types: dict[str, tuple[ua.VariantType, bool | None]] = {}
        self._poll_request: ua.ReadParameters | None = None
        self._stream: _ReadingStream | None = None
        self._subscription_id: int | None = None
        self.reads = 0
        self.writes = 0

    # -- connection ------------------------------------------------------------------------

    @property
    def security_label(self) -> str:
        """``None`` or ``Basic256Sha256/SignAndEncrypt``."""
        if self.config.security_mode == "None":
            return "None"
        return f"{self.config.security_policy}/{self.config.security_mode}"

    async def connect(self) -> None:
        """Connect, open a session, resolve node ids and create the subscription."""
        config = self.config
        security = await self._prepare_security() if config.security_mode != "None" else None
        if security is not None:
            await self._check_server_certificate(security)
        client = Client(
            config.url,
            timeout=config.timeout,
            # asyncua probes the server this often with this deadline (see the module notes).
            watchdog_intervall=max(10.0, 5 * config.timeout),
            auto_reconnect=False,
        )
        self._client = client
        client.name = client.description = "edge-agent"
        client.application_uri = (
            security.application_uri if security is not None else self._application_uri
        )
        client.product_uri = "urn:edge-agent"
        client.session_timeout = int(config.session_timeout * 1000)
        if config.username:
            client.set_user(config.username)
            if config.password is not None:
                client.set_password(config.password.get_secret_value())
        try:
            if security is not None:
                await client.set_security(
                    security.policy,
                    security.certificate,
                    security.private_key,
                    server_certificate=security.server_certificate,
                    mode=security.mode,
                )
            # socket, hello, secure channel, session, activation: each bounded by asyncua's
            # request timeout; this is the backstop.
            async with asyncio.timeout(config.timeout * 5 + 2.0):
                await client.connect()
            await self._resolve_nodes(client)
            if self._subscribed:
                await self._subscribe(client)
        except DriverError:
            raise
        except Exception as exc:
            raise self._connect_error(exc) from None

    def _connect_error(self, exc: Exception) -> DriverError:
        """A connect failure as DriverFault (will not heal by itself) or DriverUnavailable."""
        url = self.config.url
        if isinstance(exc, UaStatusCodeError):
            code = int(exc.code)
            name = status_name(code)
            if code in _LOGIN_REFUSED:
                who = (
                    f"user {self.config.username!r}" if self.config.username else "anonymous login"
                )
                return DriverFault(f"server refused {who}: {name}")
            if code in _SECURITY_REFUSED:
                return DriverFault(
                    f"server rejected the secure channel ({name}): the server must trust the "
                    "agent's client certificate"
                )
            return DriverUnavailable(f"{url}: {name}")
        if isinstance(exc, TimeoutError):
            return DriverUnavailable(f"no answer from {url} within the timeout")
        if isinstance(exc, OSError):  # ConnectionError included
            return DriverUnavailable(f"cannot connect to {url}: {exc.strerror or exc}")
        if isinstance(exc, UaError):
            text = str(exc)
            if text.startswith("No matching endpoints"):
                # asyncua's wording when CreateSession lists no endpoint for our policy/mode.
                return DriverFault(
                    f"{url}: server offers no {self.config.security_policy}/"
                    f"{self.config.security_mode} endpoint"
                )
            if "certificate" in text.lower() or "endpoint" in text.lower():
                return DriverFault(f"{url}: {text}")
            return DriverUnavailable(f"{url}: {text or type(exc).__name__}")
        return DriverUnavailable(f"{url}: {type(exc).__name__}: {exc}")

    async def close(self) -> None:
        """Bounded teardown: CloseSession if the server answers, then tasks and socket."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.fail("connection closed")
        client, self._client = self._client, None
        if client is not None:
            await _shutdown(client, self.config.timeout + 1.0)

    def _require_client(self) -> Client:
        if self._client is None:
            raise DriverUnavailable(f"{self.config.url}: not connected")
        return self._client

    # -- security --------------------------------------------------------------------------

    async def _prepare_security(self) -> _Security:
        """Client certificate (created on first start), key and the pinned server cert."""
        config = self.config
        policy = _POLICIES.get(config.security_policy)
        if policy is None:
            raise DriverFault(f"security_mode {config.security_mode} needs a security_policy")
        if config.server_certificate is None:
            raise DriverFault(
                f"server_certificate is required with security_mode {config.security_mode}"
            )
        cert_path, key_path = self._certificate_paths()
        lock = self.context.shared.get_or_create(asyncio.Lock, _CERT_LOCK_KEY, asyncio.Lock)
        async with lock:  # devices sharing a data_dir must not race to create one pair
            cert_exists, key_exists = await asyncio.to_thread(
                lambda: (cert_path.exists(), key_path.exists())
            )
            if not cert_exists and not key_exists:
                digest = await asyncio.to_thread(
                    create_client_certificate, cert_path, key_path, self._application_uri
                )
                log.warning(
                    "OPC UA client certificate created at %s, SHA-256 fingerprint %s "
                    "(application URI %s): trust it on the server",
                    cert_path,
                    digest,
                    self._application_uri,
                )
            elif cert_exists != key_exists:
                present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
                raise DriverFault(
                    f"{present} exists but {missing} does not: restore the missing file, or "
                    "remove the other so that a new pair is created"
                )
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
        return _Security(
            policy=policy,
            mode=_MODES[config.security_mode],
            certificate=cert_der,
            private_key=key_der,
            server_certificate=server_der,
            # The session must announce the URI the certificate carries, or servers refuse it.
            application_uri=_application_uri_of(cert_der) or self._application_uri,
        )

    def _certificate_paths(self) -> tuple[Path, Path]:
        config = self.config
        if config.certificate is not None and config.private_key is not None:
            return config.certificate, config.private_key
        if self.context.data_dir is None:
            raise DriverFault("certificate and private_key are not set and there is no data_dir")
        pki = self.context.data_dir / "pki"
        return pki / "agent-cert.der", pki / "agent-key.pem"

    async def _check_server_certificate(self, security: _Security) -> None:
        """Compare the endpoint's certificate with the configured one (never trust it)."""
        config = self.config
        probe = Client(config.url, timeout=config.timeout)
        try:
            async with asyncio.timeout(config.timeout * 3 + 1.0):
                endpoints = await probe.connect_and_get_server_endpoints()
        except (TimeoutError, OSError, UaError) as exc:
            raise self._connect_error(exc) from None
        finally:
            probe.disconnect_socket()
        policy_uri = security.policy.URI
        matching = [
            ep
            for ep in endpoints
            if ep.SecurityPolicyUri == policy_uri and ep.SecurityMode == security.mode
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

    # -- nodes and subscription ------------------------------------------------------------

    async def _resolve_nodes(self, client: Client) -> None:
        """NodeIds of every tag; ``nsu=`` namespace URIs looked up in the server's array."""
        parsed: dict[str, ua.NodeId] = {}
        namespaces: list[str] | None = None
        for tag in self.config.tags:
            node = ua.NodeId.from_string(tag.node_id)
            if isinstance(node, ua.ExpandedNodeId) and node.NamespaceUri:
                if namespaces is None:
                    async with asyncio.timeout(self.config.timeout + 1.0):
                        namespaces = await client.get_namespace_array()
                if node.NamespaceUri in namespaces:
                    index = namespaces.index(node.NamespaceUri)
                else:
                    log.warning(
                        "device %s tag %s: the server has no namespace %s",
                        self.config.name,
                        tag.name,
                        node.NamespaceUri,
                    )
                    index = 0xFFFF  # no such namespace: the server answers BadNodeIdUnknown
                node = _node_id(node.Identifier, index, node.NodeIdType)
            parsed[tag.name] = _node_id(node.Identifier, node.NamespaceIndex, node.NodeIdType)
        self._nodes = parsed
        self._poll_request = ua.ReadParameters(
            MaxAge=0,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[
                ua.ReadValueId(NodeId=parsed[tag.name], AttributeId=AttributeIds.Value)
                for tag in self._poll
            ],
        )

    async def _subscribe(self, client: Client) -> None:
        """One subscription for the device; monitored items with sampling interval, queue
        size and, for numeric nodes, the tag's deadband as an absolute DataChangeFilter."""
        config = self.config
        interval_ms = config.publishing_interval * 1000.0
        # A keep-alive at least every second or so (or every publishing interval if slower):
        # that is what makes a hung server visible.
        keepalive = max(1, math.ceil(1000.0 / interval_ms))
        lifetime = max(3 * keepalive, math.ceil(config.session_timeout * 1000.0 / interval_ms))
        params = ua.CreateSubscriptionParameters(
            RequestedPublishingInterval=interval_ms,
            RequestedLifetimeCount=min(lifetime, 0xFFFF_FFFF),
            RequestedMaxKeepAliveCount=keepalive,
            # Bounds the work of one PublishResponse after a backlog (the server then sets
            # MoreNotifications and answers the next Publish at once).
            MaxNotificationsPerPublish=1000,
            PublishingEnabled=True,
            Priority=0,
        )
        handles = {index: tag.name for index, tag in enumerate(self._subscribed, start=1)}
        stream = _ReadingStream(config.url, handles, stall_after=60.0)
        deadline = config.timeout * 3 + 2.0
        numeric = await self._numeric_deadband_tags(client)
        async with asyncio.timeout(deadline):
            result = await client.uaclient.create_subscription(params, stream.on_publish)
        self._subscription_id = int(result.SubscriptionId)
        # The server sends something (data or a keep-alive) at least every keep-alive period.
        keepalive_s = (
            result.RevisedPublishingInterval / 1000.0 * max(1, int(result.RevisedMaxKeepAliveCount))
        )
        stream.stall_after = max(3 * keepalive_s, config.timeout) + 1.0
        stream.last_activity = time.monotonic()
        self._stream = stream
        refused: list[Reading] = []
        items = list(enumerate(self._subscribed, start=1))
        for start in range(0, len(items), _BATCH):
            chunk = items[start : start + _BATCH]
            request = ua.CreateMonitoredItemsParameters(
                SubscriptionId=result.SubscriptionId,
                TimestampsToReturn=ua.TimestampsToReturn.Both,
                ItemsToCreate=[self._item_request(handle, tag, numeric) for handle, tag in chunk],
            )
            async with asyncio.timeout(deadline):
                results = await client.uaclient.create_monitored_items(request)
            now = time.time()
            for (_, tag), item_result in zip(chunk, results, strict=True):
                if not item_result.StatusCode.is_good():
                    refused.append(
                        Reading(
                            tag.name, None, "bad", now, status_name(item_result.StatusCode.value)
                        )
                    )
        if refused:
            log.warning(
                "device %s: %d monitored item(s) refused (%s: %s)",
                config.name,
                len(refused),
                refused[0].tag,
                refused[0].error,
            )
            stream.put_nowait(refused)

    async def _numeric_deadband_tags(self, client: Client) -> set[str]:
        """Tags with a deadband whose node has a numeric data type (one Read for all)."""
        tags = [tag for tag in self._subscribed if tag.deadband is not None]
        if not tags:
            return set()
        await self._read_types(client, tags)
        return {
            tag.name
            for tag in tags
            if tag.name in self._types and self._types[tag.name][0] in _NUMERIC_TYPES
        }

    def _item_request(
        self, handle: int, tag: OpcUaTagConfig, numeric: set[str]
    ) -> ua.MonitoredItemCreateRequest:
        parameters = ua.MonitoringParameters(
            ClientHandle=handle,
            SamplingInterval=tag.sampling_interval * 1000.0,
            QueueSize=tag.queue_size,
            DiscardOldest=True,
        )
        if tag.deadband is not None and tag.name in numeric:
            parameters.Filter = ua.DataChangeFilter(
                Trigger=ua.DataChangeTrigger.StatusValue,
                DeadbandType=ua.DeadbandType.Absolute,
                DeadbandValue=float(tag.deadband),
            )
        return ua.MonitoredItemCreateRequest(
            ItemToMonitor=ua.ReadValueId(
                NodeId=self._nodes[tag.name], AttributeId=AttributeIds.Value
            ),
            MonitoringMode=ua.MonitoringMode.Reporting,
            RequestedParameters=parameters,
        )

    async def _read_types(self, client: Client, tags: Sequence[OpcUaTagConfig]) -> None:
        """Read DataType and ValueRank of ``tags`` in one call and cache the variant types."""
        todo = [tag for tag in tags if tag.name not in self._types]
        if not todo:
            return
        request = ua.ReadParameters(
            NodesToRead=[
                ua.ReadValueId(NodeId=self._nodes[tag.name], AttributeId=attribute)
                for tag in todo
                for attribute in (AttributeIds.DataType, AttributeIds.ValueRank)
            ]
        )
        async with asyncio.timeout(self.config.timeout + 1.0):
            results = await client.uaclient.read(request)
        for index, tag in enumerate(todo):
            dtype_value, rank_value = results[2 * index], results[2 * index + 1]
            if dtype_value.StatusCode is not None and not dtype_value.StatusCode.is_good():
                continue
            dtype = dtype_value.Value.Value if dtype_value.Value is not None else None
            if not isinstance(dtype, ua.NodeId):
                continue
            rank = rank_value.Value.Value if rank_value.Value is not None else None
            vtype = await self._variant_type(client, dtype)
            if vtype is not None:
                self._types[tag.name] = (vtype, _is_array(rank))

    async def _variant_type(self, client: Client, dtype: ua.NodeId) -> ua.VariantType | None:
        identifier = dtype.Identifier
        if dtype.NamespaceIndex == 0 and isinstance(identifier, int) and 1 <= identifier <= 21:
            return ua.VariantType(identifier)  # built-in types: DataType id = variant type
        # A derived type (UtcTime, Duration, an enumeration, ...): follow its supertypes.
        async with asyncio.timeout(self.config.timeout * 3 + 1.0):
            vtype = await data_type_to_variant_type(Node(client.uaclient.session, dtype))
        return None if vtype in (_VT.Variant, _VT.Null, _VT.ExtensionObject) else vtype

    # -- reading ---------------------------------------------------------------------------

    @property
    def polled_tags(self) -> tuple[TagConfigBase, ...]:
        """Tags with mode = "poll" (read() covers only these)."""
        return self._poll

    def subscriptions(self) -> AsyncIterator[list[Reading]] | None:
        """Readings of the subscribe-mode tags, one list per PublishResponse; raises
        DriverUnavailable when the subscription ends or the server stalls."""
        return self._stream

    async def _read(self, request: ua.ReadParameters) -> list[ua.DataValue]:
        client = self._require_client()
        url = self.config.url
        try:
            # asyncua's own request timeout (config.timeout) normally fires first.
            async with asyncio.timeout(self.config.timeout + 1.0):
                results = await client.uaclient.read(request)
        except TimeoutError:
            raise DriverUnavailable(
                f"{url}: no answer to Read within {self.config.timeout:g} s"
            ) from None
        except OSError as exc:
            raise DriverUnavailable(f"{url}: connection lost ({exc})") from None
        except UaStatusCodeError as exc:
            raise DriverUnavailable(f"{url}: Read failed: {status_name(int(exc.code))}") from None
        self.reads += 1
        return results

    async def read(self) -> list[Reading]:
        """One batched Read (one service call) of every poll-mode tag."""
        if not self._poll:
            return []
        request = self._poll_request
        if request is None:
            raise DriverUnavailable(f"{self.config.url}: not connected")
        results = await self._read(request)
        received = time.time()
        # A server that answers fewer values than asked gives the missing tags "no value".
        return [
            make_reading(tag.name, results[index] if index < len(results) else None, received)
            for index, tag in enumerate(self._poll)
        ]

    async def read_tag(self, tag: str) -> Reading:
        """Read one tag now, whatever its mode."""
        self._tag(tag)
        node = self._nodes.get(tag)
        if node is None:
            raise DriverUnavailable(f"{self.config.url}: not connected")
        request = ua.ReadParameters(
            MaxAge=0,
            TimestampsToReturn=ua.TimestampsToReturn.Both,
            NodesToRead=[ua.ReadValueId(NodeId=node, AttributeId=AttributeIds.Value)],
        )
        results = await self._read(request)
        return make_reading(tag, results[0] if results else None, time.time())

    def _tag(self, name: str) -> OpcUaTagConfig:
        tag = self.tag_config(name)
        assert isinstance(tag, OpcUaTagConfig)  # the config model holds only OpcUaTagConfigs
        return tag

    # -- writing ---------------------------------------------------------------------------

    async def _node_type(self, tag: OpcUaTagConfig) -> tuple[ua.VariantType, bool | None]:
        client = self._require_client()
        if tag.name not in self._types:
            try:
                await self._read_types(client, [tag])
            except TimeoutError:
                raise DriverUnavailable(
                    f"{self.config.name}/{tag.name}: no answer reading the data type"
                ) from None
            except OSError as exc:
                raise DriverUnavailable(f"{self.config.url}: connection lost ({exc})") from None
            except UaStatusCodeError as exc:
                raise DriverFault(
                    f"{self.config.name}/{tag.name}: cannot read the data type: "
                    f"{status_name(int(exc.code))}"
                ) from None
        if tag.name not in self._types:
            raise DriverFault(
                f"{self.config.name}/{tag.name}: cannot determine the node's data type"
            )
        return self._types[tag.name]

    async def _write(self, tag: str, value: JsonValue) -> JsonValue:
        """Convert to the node's data type, write once, read back and compare."""
        config = self._tag(tag)
        name = f"{self.config.name}/{tag}"
        vtype, array = await self._node_type(config)
        try:
            variant, expected = to_variant(value, vtype, array)
        except (ValueError, TypeError) as exc:
            raise DriverFault(f"{name}: {exc}") from None
        client = self._require_client()
        request = ua.WriteParameters(
            NodesToWrite=[
                ua.WriteValue(
                    NodeId=self._nodes[tag],
                    AttributeId=AttributeIds.Value,
                    # No status, no timestamps: many PLCs refuse writes that carry them.
                    Value=ua.DataValue(variant, StatusCode=None),
                )
            ]
        )
        outcome: str | None = None
        self.writes += 1
        try:
            async with asyncio.timeout(self.config.timeout + 1.0):
                results = await client.uaclient.write(request)
        except TimeoutError:
            outcome = "no answer to the write"  # applied or not: the read-back settles it
        except OSError as exc:
            outcome = f"connection lost during the write ({exc})"
        except UaStatusCodeError as exc:
            raise DriverFault(f"{name}: write refused: {status_name(int(exc.code))}") from None
        else:
            status = results[0] if results else _status(StatusCodes.BadUnexpectedError)
            if not status.is_good():
                if status.value == StatusCodes.BadTypeMismatch:
                    self._types.pop(tag, None)  # the node's type changed: read it again
                raise DriverFault(f"{name}: write refused: {status_name(status.value)}")
        try:
            read_back = await self.read_tag(tag)
        except DriverUnavailable as exc:
            raise WriteUnverified(f"{name}: cannot read back: {exc}") from None
        if read_back.quality != "good" or not config.same_value(read_back.value, expected):
            detail = outcome or "read-back differs"
            raise WriteUnverified(
                f"{name}: wrote {value!r}, read back {read_back.value!r} ({detail})",
                read_back=read_back.value,
            )
        return read_back.value

    @property
    def state_detail(self) -> dict[str, Any]:
        """Subscription and request counters."""
        detail: dict[str, Any] = {
            "security": self.security_label,
            "subscribed_items": len(self._subscribed),
            "polled_items": len(self._poll),
            "reads": self.reads,
            "writes": self.writes,
        }
        stream = self._stream
        if stream is not None:
            detail.update(
                publishes=stream.publishes,
                notifications=stream.notifications,
                last_publish_age_s=round(time.monotonic() - stream.last_activity, 3),
            )
        return detail


async def _shutdown(client: Client, deadline: float) -> None:
    """Close a client without ever hanging on a dead or stalled server."""
    try:
        async with asyncio.timeout(deadline):
            await client.disconnect()
    except TimeoutError:
        pass
    except Exception as exc:  # the socket is closed below whatever went wrong here
        log.debug("OPC UA disconnect: %r", exc)
    finally:
        with contextlib.suppress(Exception):
            client.disconnect_socket()
        # An interrupted disconnect() leaves asyncua's background tasks running.
        tasks = [task for task in _background_tasks(client) if task is not None and not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)


def _background_tasks(client: Client) -> Iterable[asyncio.Task[Any] | None]:
    """asyncua's per-client tasks: supervisor, stale watchdog, channel renewal, publish loop."""
    yield getattr(client, "_supervisor_task", None)
    yield getattr(client, "_stale_watchdog_task", None)
    yield getattr(client, "_renew_channel_task", None)
    yield getattr(client.uaclient.session, "_publish_task", None)
