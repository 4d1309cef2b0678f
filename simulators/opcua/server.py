"""OPC UA simulator of a production line (asyncua server) over the shared ``LineModel``.

Design:

* One asyncua ``Server`` exposes the line model as typed variables with string node ids in
  the namespace ``urn:edge-agent:simulator`` (index 2: index 1 is the server's application
  URI). A background task advances the model by ``speed`` x elapsed time at ~10 Hz and writes
  only the variables whose value changed, with the write time as SourceTimestamp, so
  monitored items see real data changes. ``Bulk.0000`` .. ``Bulk.4999`` (``BulkBlock``) are
  the load-test variables.
* Writes by clients to model-backed variables (start, product code, recipe, ...) go through
  a value setter into ``LineModel.write``; an invalid value is refused with BadOutOfRange.
  asyncua itself refuses a value whose variant type differs from the node's (BadTypeMismatch),
  like most PLCs: clients must convert to the node's data type.
* Security: the endpoints offered are a list of (policy, mode) pairs; ``secure=True`` offers
  only Basic256Sha256 / SignAndEncrypt with user name and password. The server certificate
  and key are generated on first start into ``pki_dir`` (and reused afterwards).
* Fault injection without a proxy: the listening server is asyncua's ``BinaryServer`` with a
  protocol subclass that drops incoming and outgoing bytes while stalled (connections stay
  open, nothing is executed or answered); ``restart`` closes the listener, every connection
  and every session (a restarted PLC forgets its sessions) and listens again on the same port;
  status codes, values (NaN/Inf too) and a variable's data type can be changed at runtime.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, cast

from asyncua import ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.common.node import Node
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import NodeData
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.server.server import Server
from asyncua.server.user_managers import UserManager
from asyncua.ua.attribute_ids import AttributeIds
from asyncua.ua.status_codes import StatusCodes
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from simulators.line import BulkBlock, LineModel, PointValue

__all__ = [
    "ALL_ENDPOINTS",
    "APPLICATION_URI",
    "BULK_COUNT",
    "DEFAULT_PORT",
    "NAMESPACE_URI",
    "NODE_TABLE",
    "NodeSpec",
    "OpcUaSimulator",
    "WriteRecord",
    "main",
    "node_table",
    "send_control",
    "serve",
]

log = logging.getLogger("edge_agent.simulator.opcua")

DEFAULT_PORT: Final = 4840
NAMESPACE_URI: Final = "urn:edge-agent:simulator"
# Namespace 1 is always the server's application URI: it must differ from NAMESPACE_URI or
# register_namespace() would hand back index 1 instead of 2.
APPLICATION_URI: Final = "urn:edge-agent:simulator:server"
NAMESPACE_INDEX: Final = 2
BULK_COUNT: Final = 5000
_BULK_GROUP: Final = 100  # variables per bulk sub-folder (asyncua adds references in O(n))
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

_POLICY_TYPES: Final[dict[Endpoint, ua.SecurityPolicyType]] = {
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

_VT = ua.VariantType
TYPES: Final[dict[str, ua.VariantType]] = {
    "Boolean": _VT.Boolean,
    "SByte": _VT.SByte,
    "Byte": _VT.Byte,
    "Int16": _VT.Int16,
    "UInt16": _VT.UInt16,
    "Int32": _VT.Int32,
    "UInt32": _VT.UInt32,
    "Int64": _VT.Int64,
    "UInt64": _VT.UInt64,
    "Float": _VT.Float,
    "Double": _VT.Double,
    "String": _VT.String,
    "DateTime": _VT.DateTime,
    "ByteString": _VT.ByteString,
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

CONST_DATETIME: Final = datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
CONST_BYTES: Final = b"\x01\x02\xff"


# ---------------------------------------------------------------------- node table


@dataclass(frozen=True)
class NodeSpec:
    """One variable of the simulator's address space (string node id in namespace 2)."""

    name: str  # the string identifier, e.g. "Filler.State"
    type: str  # OPC UA built-in data type name, e.g. "UInt16"
    access: Literal["r", "rw"]
    description: str
    array: bool = False
    point: str | None = None  # LineModel point behind a writable variable
    initial: Any = None  # constants and plain-memory setpoints

    @property
    def node_id(self) -> str:
        """The node id as written in the agent's config."""
        return f"ns={NAMESPACE_INDEX};s={self.name}"

    @property
    def type_label(self) -> str:
        """``Double`` or ``Int32[]``."""
        return self.type + ("[]" if self.array else "")


_n = NodeSpec
NODE_TABLE: Final[tuple[NodeSpec, ...]] = (
    _n("Filler.State", "UInt16", "r", "0 off 1 run 2 unplanned 3 planned 4 starved"),
    _n("Filler.FaultCode", "UInt16", "r", "1..9 while state 2, else 0"),
    _n("Filler.StopReason", "String", "r", "why the machine stands ('' while running)"),
    _n("Filler.Running", "Boolean", "r", "state == 1"),
    _n("Filler.OrderDone", "Boolean", "r", "order count reached TargetQty"),
    _n("Filler.Counters.Total", "UInt32", "r", "bottles filled, rolls over"),
    _n("Filler.Counters.Rejected", "UInt32", "r", "bottles rejected, rolls over"),
    _n("Filler.Counters.Good", "UInt32", "r", "good bottles, rolls over"),
    _n("Filler.Counters.Order", "UInt32", "r", "bottles since TargetQty was written"),
    _n("Filler.Temperature", "Double", "r", "°C"),
    _n("Filler.FillLevel", "Float", "r", "ml in the last bottle (498..502)"),
    _n("Filler.ZoneTemperatures", "Double", "r", "4 zones, °C", array=True),
    _n("Filler.LastCycleMs", "UInt16", "r", "last cycle time in ms"),
    _n("Filler.CycleCounter", "UInt16", "r", "PLC scan counter 100 Hz, wraps"),
    _n("Filler.EnergyKwh", "Double", "r", "kWh"),
    _n("Filler.RuntimeS", "Double", "r", "seconds running"),
    _n("Filler.Start", "Boolean", "rw", "run command (ignored while locked)", point="start"),
    _n("Filler.Stop", "Boolean", "rw", "stop command; true stops, clears Start", point="stop"),
    _n("Filler.QualityHold", "Boolean", "rw", "while true: state 3", point="quality_hold"),
    _n(
        "Filler.MaintenanceLock",
        "Boolean",
        "rw",
        "while true: state 3, Start ignored",
        point="maintenance_lock",
    ),
    _n("Filler.ProductCode", "UInt16", "rw", "0..9999 (else BadOutOfRange)", point="product_code"),
    _n("Filler.TargetQty", "UInt32", "rw", "writing starts an order", point="target_qty"),
    _n("Filler.Recipe", "String", "rw", "product name, ASCII, <= 16 chars", point="product_name"),
    _n("Filler.Setpoints.SpeedBpm", "Double", "rw", "plain memory", initial=120.0),
    _n("Filler.Setpoints.FillTarget", "Float", "rw", "plain memory", initial=500.0),
    _n("Filler.Setpoints.Offset", "Int16", "rw", "plain memory", initial=0),
    _n("Filler.Setpoints.BatchSize", "Int32", "rw", "plain memory", initial=24),
    _n("Filler.Setpoints.Operator", "String", "rw", "plain memory", initial=""),
    _n(
        "Filler.Setpoints.Zones",
        "Int32",
        "rw",
        "plain memory",
        array=True,
        initial=[60, 62, 64, 66],
    ),
    _n("Filler.Const.Boolean", "Boolean", "r", "constant true", initial=True),
    _n("Filler.Const.SByte", "SByte", "r", "constant -100", initial=-100),
    _n("Filler.Const.Byte", "Byte", "r", "constant 200", initial=200),
    _n("Filler.Const.Int16", "Int16", "r", "constant -1234", initial=-1234),
    _n("Filler.Const.UInt16", "UInt16", "r", "constant 65535", initial=65535),
    _n("Filler.Const.Int32", "Int32", "r", "constant -123456", initial=-123456),
    _n("Filler.Const.UInt32", "UInt32", "r", "constant 0xDEADBEEF", initial=0xDEADBEEF),
    _n("Filler.Const.Int64", "Int64", "r", "constant -1234567890123", initial=-1234567890123),
    _n("Filler.Const.UInt64", "UInt64", "r", "constant 2**64-1", initial=2**64 - 1),
    _n("Filler.Const.Float", "Float", "r", "constant 1.5", initial=1.5),
    _n("Filler.Const.Double", "Double", "r", "constant pi", initial=math.pi),
    _n("Filler.Const.String", "String", "r", "constant 'edge-agent'", initial="edge-agent"),
    _n(
        "Filler.Const.DateTime",
        "DateTime",
        "r",
        "constant 2024-01-02T03:04:05.678Z",
        initial=CONST_DATETIME,
    ),
    _n("Filler.Const.ByteString", "ByteString", "r", "constant 01 02 FF", initial=CONST_BYTES),
)
_BY_NAME: Final[dict[str, NodeSpec]] = {spec.name: spec for spec in NODE_TABLE}


def bulk_name(index: int) -> str:
    """``Bulk.0042``."""
    return f"Bulk.{index:04d}"


def _model_values(snapshot: Mapping[str, PointValue]) -> dict[str, Any]:
    """Values of the model-backed variables from a ``LineModel.snapshot()``."""
    temp = float(snapshot["temperature"])
    total = int(snapshot["total_count"])
    return {
        "Filler.State": snapshot["state"],
        "Filler.FaultCode": snapshot["fault_code"],
        "Filler.StopReason": snapshot["stop_reason"],
        "Filler.Running": snapshot["running"],
        "Filler.OrderDone": snapshot["order_done"],
        "Filler.Counters.Total": total,
        "Filler.Counters.Rejected": snapshot["reject_count"],
        "Filler.Counters.Good": snapshot["good_count"],
        "Filler.Counters.Order": min(int(snapshot["order_count"]), 0xFFFF_FFFF),
        "Filler.Temperature": temp,
        # A deterministic per-bottle wobble of the fill level (not part of the line model).
        "Filler.FillLevel": 500.0 + ((total * 7919) % 41 - 20) / 10.0,
        "Filler.ZoneTemperatures": [round(temp + d, 3) for d in (0.0, 1.5, -0.8, 0.3)],
        "Filler.LastCycleMs": snapshot["last_cycle_ms"],
        "Filler.CycleCounter": snapshot["cycle_counter16"],
        "Filler.EnergyKwh": snapshot["energy_kwh"],
        "Filler.RuntimeS": snapshot["runtime_s"],
        "Filler.Start": snapshot["start"],
        "Filler.Stop": snapshot["stop"],
        "Filler.QualityHold": snapshot["quality_hold"],
        "Filler.MaintenanceLock": snapshot["maintenance_lock"],
        "Filler.ProductCode": snapshot["product_code"],
        "Filler.TargetQty": snapshot["target_qty"],
        "Filler.Recipe": snapshot["product_name"],
    }


def node_table() -> str:
    """Render the node table as Markdown (printed on start, copied in the README)."""
    lines = [
        "| node id | type | access | notes |",
        "| --- | --- | --- | --- |",
    ]
    for spec in NODE_TABLE:
        lines.append(f"| {spec.node_id} | {spec.type_label} | {spec.access} | {spec.description} |")
    lines.append(
        f"| ns={NAMESPACE_INDEX};s=Bulk.0000 .. Bulk.4999 | UInt16 | r | "
        "load test; see bulk_change_fraction |"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------- value helpers


def coerce(value: Any, vtype: ua.VariantType, array: bool = False) -> Any:
    """Convert ``value`` to the Python value asyncua encodes as ``vtype``; ValueError if not."""
    if array:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return [coerce(item, vtype) for item in value]
    if vtype == _VT.Boolean:
        if isinstance(value, str):
            return value.strip().lower() in ("1", "true", "on")
        return bool(value)
    if vtype in _INT_RANGES:
        low, high = _INT_RANGES[vtype]
        if isinstance(value, str):
            value = float(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value} is not an integer")
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"{number} out of range for {vtype.name}")
        return number
    if vtype in (_VT.Float, _VT.Double):
        return float(value)  # float("NaN"), float("-Infinity") work too
    if vtype == _VT.String:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)
    if vtype == _VT.DateTime:
        if isinstance(value, datetime):
            return value
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if vtype == _VT.ByteString:
        if isinstance(value, bytes):
            return value
        return str(value).encode()
    raise ValueError(f"unsupported type {vtype.name}")


def _json_value(value: Any) -> Any:
    """A value as JSON-friendly data for the write log and the status command."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _same(a: Any, b: Any) -> bool:
    """Equality where NaN equals NaN (so an unchanged NaN is not rewritten every tick)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and bool(a == b)


def _node_id(identifier: int | str, namespace: int = NAMESPACE_INDEX) -> ua.NodeId:
    return ua.NodeId(cast(ua.String, identifier), cast(ua.Int16, namespace))


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(cast(ua.UInt32, code))


def status_code(text: str | int) -> ua.StatusCode:
    """``BadSensorFailure``, ``Uncertain``, ``Good`` or a number (``0x80320000``)."""
    if isinstance(text, int):
        return _status(text)
    stripped = text.strip()
    if stripped[:1].isdigit():
        return _status(int(stripped, 0))
    value = getattr(StatusCodes, stripped, None)
    if not isinstance(value, int):
        raise ValueError(f"unknown status code {text!r}")
    return _status(value)


def _utc_now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class WriteRecord:
    """One client write request for one variable, as the server answered it."""

    ts: str
    node: str
    value: Any
    result: str  # status name, e.g. "Good", "BadTypeMismatch", "BadOutOfRange"

    def to_json(self) -> str:
        """One JSON line (without the newline)."""
        return json.dumps(
            {"ts": self.ts, "node": self.node, "value": self.value, "result": self.result},
            separators=(",", ":"),
        )


# ---------------------------------------------------------------------- users and stall


class _Users(UserManager):
    """User name / password table, plus anonymous when allowed."""

    def __init__(self, users: Mapping[str, str], allow_anonymous: bool) -> None:
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


class _Faults:
    """Switchable transport faults."""

    def __init__(self) -> None:
        self.stall_until: float | None = None

    def stalled(self) -> bool:
        """True while the server must neither read nor answer."""
        if self.stall_until is None:
            return False
        if time.monotonic() < self.stall_until:
            return True
        self.stall_until = None
        return False


class _StallableTransport:
    """Wraps a connection's transport: writes are dropped while the simulator is stalled."""

    def __init__(self, transport: asyncio.Transport, faults: _Faults) -> None:
        self._transport = transport
        self._faults = faults

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send, unless stalled (then the bytes vanish, as from a hung PLC)."""
        if not self._faults.stalled():
            self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _SimProtocol(OPCUAProtocol):
    """asyncua's per-connection protocol, deaf and mute while stalled."""

    faults: _Faults

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Hand asyncua a transport whose writes can be dropped."""
        wrapped = _StallableTransport(cast(asyncio.Transport, transport), self.faults)
        super().connection_made(cast(asyncio.BaseTransport, wrapped))

    def data_received(self, data: bytes) -> None:
        """Drop requests while stalled: not executed, never answered."""
        if self.faults.stalled():
            return
        super().data_received(data)


class _SimBinaryServer(BinaryServer):
    """asyncua's listener with the stallable protocol."""

    faults: _Faults

    def _make_protocol(self) -> OPCUAProtocol:
        protocol = _SimProtocol(
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )
        protocol.faults = self.faults
        return protocol


class _SimServer(Server):
    """asyncua's Server whose start() uses the stallable listener (otherwise identical)."""

    faults: _Faults

    async def start(self) -> None:
        """Set up endpoints, start the internal server and listen."""
        # Mirrors Server.start(), which hard-codes BinaryServer.
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            host, port = self._get_bind_socket_info()
            bserver = _SimBinaryServer(self.iserver, cast(str, host), cast(int, port), self.limits)
            bserver.faults = self.faults
            bserver.set_policies(self._policies)
            await bserver.start()
        except BaseException:
            await self.iserver.stop()
            raise
        self.bserver = bserver


# Set while the simulator itself writes a variable (model ticks, set_value): the value setter
# must then store the value instead of treating it as a client's command to the model.
_INTERNAL_WRITE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "opcua_sim_internal_write", default=False
)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _generate_server_pki(directory: Path) -> tuple[Path, Path]:
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


# ---------------------------------------------------------------------- simulator


class OpcUaSimulator:
    """An OPC UA server in front of one LineModel, with security options and fault injection."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        seed: int = 1,
        speed: float = 1.0,
        secure: bool = False,
        endpoints: Sequence[Endpoint] | None = None,
        users: Mapping[str, str] | None = None,
        allow_anonymous: bool | None = None,
        password: str = DEFAULT_PASSWORD,
        pki_dir: str | os.PathLike[str] | None = None,
        bulk_count: int = BULK_COUNT,
        bulk_change_fraction: float = 0.1,
        control_port: int | None = None,
        write_log: str | os.PathLike[str] | None = None,
        tick_interval: float = 0.1,
        model: LineModel | None = None,
    ) -> None:
        """Configure; nothing is opened before ``start()`` / ``async with``.

        ``port=0`` picks a free port (kept across ``restart()``). ``secure=True`` offers only
        Basic256Sha256/SignAndEncrypt with user ``edge`` and ``password``; ``endpoints`` lists
        the (policy, mode) pairs to offer instead, e.g. ``ALL_ENDPOINTS``. ``users`` maps user
        names to passwords; anonymous logins are allowed unless ``secure`` or
        ``allow_anonymous=False``.
        """
        if speed < 0 or not math.isfinite(speed):
            raise ValueError("speed must be finite and >= 0")
        if tick_interval <= 0:
            raise ValueError("tick_interval must be > 0")
        if not 0 <= bulk_count <= 10_000:
            raise ValueError("bulk_count must be within 0..10000")
        chosen = tuple(endpoints) if endpoints is not None else None
        if chosen is None:
            chosen = SECURE_ENDPOINTS if secure else (("None", "None"),)
        for endpoint in chosen:
            if endpoint not in _POLICY_TYPES:
                raise ValueError(f"unknown endpoint {endpoint!r}; use e.g. {ALL_ENDPOINTS[2]!r}")
        if not chosen:
            raise ValueError("offer at least one endpoint")
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.seed = seed
        self.speed = speed
        self.endpoints: tuple[Endpoint, ...] = chosen
        self.users: dict[str, str] = dict(users) if users is not None else {}
        if secure and not self.users:
            self.users = {DEFAULT_USER: password}
        self.allow_anonymous = (not secure) if allow_anonymous is None else allow_anonymous
        self._pki_dir = Path(pki_dir) if pki_dir is not None else None
        self._own_pki_dir: Path | None = None
        self.certificate_path: Path | None = None
        self.certificate_der: bytes | None = None
        self.bulk_count = bulk_count
        self.bulk = BulkBlock(
            seed=seed, size=max(bulk_count, 1), change_fraction=bulk_change_fraction
        )
        self.model = model if model is not None else LineModel(seed=seed)
        self.tick_interval = tick_interval
        self._requested_control_port = control_port
        self.control_port: int | None = None
        self.write_log_path = Path(write_log) if write_log is not None else None
        self._faults = _Faults()
        self._server: _SimServer | None = None
        self._nodes: dict[str, ua.NodeId] = {}
        self._vtypes: dict[str, ua.VariantType] = {}
        self._cache: dict[str, Any] = {}  # last value the simulator wrote per variable
        self._status: dict[str, ua.StatusCode] = {}  # injected status per variable
        self._pinned: set[str] = set()  # variables whose value set_value() fixed
        self._bulk_values: list[int] = []
        self._bulk_pending: OrderedDict[int, int] = OrderedDict()
        self._bulk_second = -1
        self._model_revision = -1
        self._writes: deque[WriteRecord] = deque(maxlen=100_000)
        self._log_fd: int | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._control: asyncio.Server | None = None
        self._control_tasks: set[asyncio.Task[None]] = set()
        self._started = False

    # ------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        """The endpoint URL, e.g. ``opc.tcp://127.0.0.1:4840``."""
        return f"opc.tcp://{self.host}:{self.port}"

    @property
    def certificate_fingerprint(self) -> str | None:
        """SHA-256 of the server certificate (DER), ``AA:BB:..``; None without security."""
        if self.certificate_der is None:
            return None
        return ":".join(f"{b:02X}" for b in hashlib.sha256(self.certificate_der).digest())

    @property
    def server(self) -> Server:
        """The running asyncua server (for tests that need more than the methods here)."""
        if self._server is None:
            raise RuntimeError("simulator not started")
        return self._server

    @property
    def connections(self) -> int:
        """Open client connections."""
        if self._server is None:
            return 0
        return len(self._server.iserver.asyncio_transports)

    @property
    def writes(self) -> list[WriteRecord]:
        """Client write requests so far, oldest first."""
        return list(self._writes)

    @staticmethod
    def node_name(node: str) -> str:
        """``Filler.State`` from ``Filler.State`` or ``ns=2;s=Filler.State``."""
        prefix = f"ns={NAMESPACE_INDEX};s="
        return node[len(prefix) :] if node.startswith(prefix) else node

    def node_id(self, node: str) -> ua.NodeId:
        """The NodeId of a variable; KeyError if there is none."""
        name = self.node_name(node)
        if name not in self._nodes:
            raise KeyError(f"no variable {name!r}")
        return self._nodes[name]

    def value(self, node: str) -> ua.DataValue:
        """The variable's current DataValue as the server holds it."""
        return self.server.read_attribute_value(self.node_id(node))

    async def start(self) -> None:
        """Create the server and its variables, listen, start the model and control channel."""
        if self._started:
            raise RuntimeError("simulator already started")
        self._started = True
        try:
            if self.write_log_path is not None:
                self._log_fd = os.open(
                    self.write_log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
                )
            await self._create_server()
            self._ticker = asyncio.create_task(self._tick_loop(), name="opcua-sim-ticker")
            if self._requested_control_port is not None:
                self._control = await asyncio.start_server(
                    self._control_client, "127.0.0.1", self._requested_control_port
                )
                self.control_port = int(self._control.sockets[0].getsockname()[1])
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop everything started by ``start()``; idempotent."""
        if self._control is not None:
            self._control.close()
            self._control = None
        tasks = [t for t in (self._ticker, *self._control_tasks) if t is not None]
        self._ticker = None
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.wait(tasks)
        finally:
            server, self._server = self._server, None
            if server is not None:
                await self._stop_server(server)
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
            if self._own_pki_dir is not None:
                shutil.rmtree(self._own_pki_dir, ignore_errors=True)
                self._own_pki_dir = None
            self._started = False

    async def __aenter__(self) -> OpcUaSimulator:
        """Start the simulator."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the simulator."""
        await self.close()

    # ------------------------------------------------------------ faults

    def stall(self, seconds: float | None = None) -> None:
        """Neither read nor answer (connections stay open); None = until ``unstall()``."""
        if seconds is not None and seconds <= 0:
            self.unstall()
            return
        self._faults.stall_until = time.monotonic() + (math.inf if seconds is None else seconds)

    def unstall(self) -> None:
        """Answer requests again."""
        self._faults.stall_until = None

    @property
    def stalled(self) -> bool:
        """True while stalled."""
        return self._faults.stalled()

    def close_connections(self) -> int:
        """Drop every client connection now (sessions survive, as on a network cut)."""
        if self._server is None:
            return 0
        transports = list(self._server.iserver.asyncio_transports)
        for transport in transports:
            transport.close()
        return len(transports)

    async def restart(self) -> None:
        """Like a PLC restart: listener, connections and sessions go; listen again."""
        server = self.server
        bserver = server.bserver
        if bserver is None:
            raise RuntimeError("simulator not listening")
        await bserver.stop()
        await self._close_sessions(server)
        self.unstall()
        await bserver.start()

    async def set_status(self, node: str, code: str | int) -> None:
        """Give a variable a status code (Bad*: the server then holds no value); Good clears."""
        name = self.node_name(node)
        self.node_id(name)
        status = status_code(code)
        if status.value == StatusCodes.Good:
            self._status.pop(name, None)
        else:
            self._status[name] = status
        await self._write(name, self._cache.get(name))

    async def set_value(self, node: str, value: Any) -> None:
        """Fix a variable's value (converted to its current type; NaN/Inf allowed for floats)
        until ``release()`` or ``clear_faults()``: the model no longer updates it."""
        name = self.node_name(node)
        self.node_id(name)
        self._pinned.add(name)
        await self._write(name, value)

    async def change_type(self, node: str, type_name: str) -> None:
        """Change a variable's DataType at runtime (a PLC program change); the current value
        is converted (0 / '' where it cannot be)."""
        name = self.node_name(node)
        nodeid = self.node_id(name)
        if type_name not in TYPES:
            raise ValueError(f"unknown type {type_name!r}; one of {', '.join(TYPES)}")
        vtype = TYPES[type_name]
        # asyncua refuses a value of another variant type than the stored one; a node whose
        # value is None accepts anything, so the DataType and the value are replaced directly.
        data = self.server.iserver.aspace[nodeid]
        data.attributes[AttributeIds.DataType].value = ua.DataValue(
            ua.Variant(_node_id(vtype.value, 0), _VT.NodeId)
        )
        data.attributes[AttributeIds.Value].value = None
        self._vtypes[name] = vtype
        await self._write(name, self._cache.get(name))

    async def release(self, node: str) -> None:
        """Undo set_value/set_status/change_type for one variable."""
        name = self.node_name(node)
        self.node_id(name)
        self._pinned.discard(name)
        self._status.pop(name, None)
        original = self._original_type(name)
        if self._vtypes.get(name) != original:
            await self.change_type(name, original.name)
        await self._write(name, self._model_or_initial(name))

    async def clear_faults(self) -> None:
        """Stall off, every variable back to its own type, value and Good status."""
        self.unstall()
        for name in sorted(set(self._pinned) | set(self._status) | self._changed_types()):
            await self.release(name)

    # ------------------------------------------------------------ internals

    def _original_type(self, name: str) -> ua.VariantType:
        spec = _BY_NAME.get(name)
        return TYPES[spec.type] if spec is not None else _VT.UInt16

    def _changed_types(self) -> set[str]:
        return {name for name, vt in self._vtypes.items() if vt != self._original_type(name)}

    def _model_or_initial(self, name: str) -> Any:
        if name.startswith("Bulk."):
            index = int(name.split(".", 1)[1])
            return self.bulk.value(index, self.model.sim_time_s)
        values = _model_values(self.model.snapshot())
        if name in values:
            return values[name]
        return self._cache.get(name, _BY_NAME[name].initial)

    async def _create_server(self) -> None:
        """Build the address space, security and users; start listening."""
        port = self._requested_port or _free_port(self.host)
        self.port = port
        server = _SimServer(user_manager=_Users(self.users, self.allow_anonymous))
        server.faults = self._faults
        await server.init()
        server.disable_clock()  # its 1 s loop would delay every stop() by up to a second
        await server.set_application_uri(APPLICATION_URI)
        server.set_server_name("edge-agent line simulator")
        server.set_endpoint(f"opc.tcp://{self.host}:{port}/")
        index = await server.register_namespace(NAMESPACE_URI)
        if index != NAMESPACE_INDEX:
            raise RuntimeError(f"namespace {NAMESPACE_URI} got index {index}, expected 2")
        server.set_security_policy([_POLICY_TYPES[e] for e in self.endpoints])
        tokens: list[type] = [ua.UserNameIdentityToken] if self.users else []
        if self.allow_anonymous:
            tokens.insert(0, ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        if any(policy != "None" for policy, _ in self.endpoints):
            directory = self._pki_dir
            if directory is None:
                directory = self._own_pki_dir = Path(tempfile.mkdtemp(prefix="opcua-sim-pki-"))
            cert_path, key_path = await asyncio.to_thread(_generate_server_pki, directory)
            self.certificate_path = cert_path
            self.certificate_der = await asyncio.to_thread(cert_path.read_bytes)
            await server.load_certificate(self.certificate_der, "der")
            await server.load_private_key(
                await asyncio.to_thread(key_path.read_bytes), format="pem"
            )
        await self._build_nodes(server)
        server.subscribe_server_callback(CallbackType.PostWrite, self._on_post_write)
        self._server = server
        try:
            await server.start()
        except OSError as exc:
            await self._stop_server(server)
            self._server = None
            raise OSError(f"cannot listen on {self.host}:{port}: {exc.strerror or exc}") from exc

    async def _build_nodes(self, server: Server) -> None:
        """Objects/Filler/... and Objects/Bulk/Gnn/Bulk.nnnn, with initial values."""
        ns = NAMESPACE_INDEX
        objects = server.nodes.objects
        parents: dict[str, Node] = {}

        async def parent_of(name: str) -> Node:
            path = name.rsplit(".", 1)[0]
            if path in parents:
                return parents[path]
            above = objects if "." not in path else await parent_of(path)
            node = await above.add_object(
                _node_id(path), ua.QualifiedName(path.rsplit(".", 1)[-1], ns)
            )
            parents[path] = node
            return node

        values = _model_values(self.model.snapshot())
        for spec in NODE_TABLE:
            vtype = TYPES[spec.type]
            value = values.get(spec.name, spec.initial)
            parent = await parent_of(spec.name)
            var = await parent.add_variable(
                _node_id(spec.name),
                ua.QualifiedName(spec.name.rsplit(".", 1)[-1], ns),
                ua.Variant(coerce(value, vtype, spec.array), vtype, is_array=spec.array),
                varianttype=vtype,
            )
            if spec.array:
                await var.write_value_rank(1)
            if spec.access == "rw":
                await var.set_writable()
                if spec.point is not None:
                    server.set_attribute_value_setter(var.nodeid, self._make_setter(spec))
            self._nodes[spec.name] = var.nodeid
            self._vtypes[spec.name] = vtype
            self._cache[spec.name] = value
        if self.bulk_count:
            folder = await objects.add_folder(_node_id("Bulk"), ua.QualifiedName("Bulk", ns))
            self._bulk_second = int(self.model.sim_time_s)
            self._bulk_values = self.bulk.values(0, self.bulk_count, self.model.sim_time_s)
            group: Node | None = None
            for index, value in enumerate(self._bulk_values):
                if index % _BULK_GROUP == 0:
                    label = f"G{index // _BULK_GROUP:02d}"
                    group = await folder.add_folder(
                        _node_id(f"Bulk.{label}"), ua.QualifiedName(label, ns)
                    )
                assert group is not None
                name = bulk_name(index)
                var = await group.add_variable(
                    _node_id(name),
                    ua.QualifiedName(name, ns),
                    ua.Variant(value, _VT.UInt16),
                    varianttype=_VT.UInt16,
                )
                self._nodes[name] = var.nodeid
                self._vtypes[name] = _VT.UInt16
        self._model_revision = self.model.revision

    def _make_setter(
        self, spec: NodeSpec
    ) -> Callable[[NodeData, AttributeIds, ua.DataValue], None]:
        """Value setter of a model-backed writable variable: a client write is a command."""
        point = cast(str, spec.point)

        def setter(node: NodeData, attr: AttributeIds, value: ua.DataValue) -> None:
            stored = value
            if not _INTERNAL_WRITE.get():
                raw = value.Value.Value if value.Value is not None else None
                try:
                    checked = self.model.validate(point, raw)
                except (ValueError, KeyError):
                    # Raised from here asyncua answers the Write with a ServiceFault, and its
                    # PostWrite callback never runs: record the refusal now.
                    self._record_write(spec.node_id, raw, "BadOutOfRange")
                    raise ServiceError(StatusCodes.BadOutOfRange) from None
                self.model.write(point, checked)
                actual = _model_values(self.model.snapshot())[spec.name]
                if not _same(actual, checked):
                    # The PLC logic overrides the command at once (Start while maintenance-
                    # locked): the node holds the model's value, monitored items see the
                    # written one now and the correction on the next tick.
                    vtype = self._vtypes[spec.name]
                    stored = dataclasses.replace(
                        value, Value=ua.Variant(coerce(actual, vtype), vtype)
                    )
                self._cache[spec.name] = checked
            node.attributes[attr].value = stored
            node.attributes[attr].value_callback = None

        return setter

    async def _on_post_write(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        """Record every client write with the server's answer."""
        if not event.is_external:
            return
        params = cast(ua.WriteParameters, event.request_params)
        results = cast(list[ua.StatusCode], event.response_params or [])
        for index, item in enumerate(params.NodesToWrite):
            node = item.NodeId.to_string() if item.NodeId is not None else "?"
            raw = item.Value.Value.Value if item.Value and item.Value.Value else None
            result = results[index].name if index < len(results) else "?"
            self._record_write(node, raw, result)

    def _record_write(self, node: str, raw: Any, result: str) -> None:
        """Append a client write to the in-memory and file write log."""
        record = WriteRecord(_utc_now_text(), node, _json_value(raw), result)
        self._writes.append(record)
        if self._log_fd is not None:
            # One O_APPEND write per record: a SIGKILL loses nothing that was answered.
            os.write(self._log_fd, (record.to_json() + "\n").encode())

    async def _write(self, name: str, value: Any, *, now: datetime | None = None) -> None:
        """Write one variable as the PLC itself: current type, injected status, timestamps."""
        vtype = self._vtypes[name]
        spec = _BY_NAME.get(name)
        array = spec.array if spec is not None else False
        try:
            converted = coerce(value, vtype, array) if value is not None else None
        except (ValueError, TypeError, OverflowError):
            converted = coerce([] if array else "" if vtype == _VT.String else 0, vtype, array)
        status = self._status.get(name, _status(StatusCodes.Good))
        stamp = now or datetime.now(UTC)
        variant = (
            ua.Variant(converted, vtype, is_array=array)
            if converted is not None
            else ua.Variant(None, _VT.Null)
        )
        datavalue = ua.DataValue(
            variant,
            StatusCode=status,
            SourceTimestamp=cast(ua.DateTime, stamp),
            ServerTimestamp=cast(ua.DateTime, stamp),
        )
        token = _INTERNAL_WRITE.set(True)
        try:
            await self.server.write_attribute_value(self._nodes[name], datavalue)
        finally:
            _INTERNAL_WRITE.reset(token)
        self._cache[name] = value

    async def _tick(self, dt: float) -> None:
        """Advance the model and write what changed."""
        model = self.model
        if dt > 0:
            model.advance(dt)
        now = datetime.now(UTC)
        if model.revision != self._model_revision:
            self._model_revision = model.revision
            for name, value in _model_values(model.snapshot()).items():
                if name in self._pinned or _same(self._cache.get(name), value):
                    continue
                await self._write(name, value, now=now)
        if not self.bulk_count:
            return
        second = int(model.sim_time_s)
        if second != self._bulk_second:
            self._bulk_second = second
            values = self.bulk.values(0, self.bulk_count, model.sim_time_s)
            old = self._bulk_values
            self._bulk_values = values
            pending = self._bulk_pending
            for index, value in enumerate(values):
                if value != old[index]:
                    pending[index] = value
                    pending.move_to_end(index)
        # Spread one simulated second's changes over the ticks of that second, as a PLC whose
        # values change at their own moments (and so that no tick blocks the server for the
        # whole batch): each tick writes its share of what is still pending.
        pending = self._bulk_pending
        if not pending:
            return
        per_tick = self.speed * self.tick_interval  # simulated seconds per tick
        left = 1.0 - (model.sim_time_s - second)
        ticks_left = max(1.0, left / per_tick) if per_tick > 0 else 1.0
        for _ in range(math.ceil(len(pending) / ticks_left)):
            index, value = pending.popitem(last=False)
            name = bulk_name(index)
            if name not in self._pinned:
                await self._write(name, value, now=now)

    async def _tick_loop(self) -> None:
        """Advance the model by speed x elapsed monotonic time, ~10 times a second."""
        last = next_tick = time.monotonic()
        jitter = random.Random(f"ticks-{self.seed}")
        while True:
            # A fixed average cadence (the time a tick takes is not added to it), jittered so
            # that value changes do not phase-lock with the server's publishing timer.
            step = self.tick_interval * jitter.uniform(0.5, 1.5)
            next_tick = max(next_tick + step, time.monotonic())
            await asyncio.sleep(next_tick - time.monotonic())
            now = time.monotonic()
            dt = (now - last) * self.speed
            last = now
            try:
                await self._tick(dt)
            except Exception:
                # A bad injected value must not stop the line: log it and keep ticking.
                log.exception("opcua simulator: tick failed")

    @staticmethod
    async def _close_sessions(server: Server) -> None:
        # Sessions with subscriptions outlive their connection (spec Part 4 6.7) so that a
        # client can re-activate them; a restarted PLC has forgotten them.
        registry = cast(dict[ua.NodeId, Any], server.iserver._external_sessions)
        for session in list(registry.values()):
            with contextlib.suppress(Exception):
                await session.close_session(True)

    async def _stop_server(self, server: Server) -> None:
        await self._close_sessions(server)
        with contextlib.suppress(Exception):
            await server.stop()

    # ------------------------------------------------------------ control channel

    async def _control_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one control connection: one command per line, one reply line each."""
        task = asyncio.current_task()
        if task is not None:
            self._control_tasks.add(cast("asyncio.Task[None]", task))
        try:
            while line := await reader.readline():
                try:
                    reply = await self._control_command(line.decode("utf-8", "replace"))
                except (ValueError, KeyError, IndexError, OSError, RuntimeError) as exc:
                    reply = f"error {type(exc).__name__}: {exc}"
                writer.write(reply.encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            if task is not None:
                self._control_tasks.discard(cast("asyncio.Task[None]", task))

    async def _control_command(self, line: str) -> str:
        """Execute one control command and return the reply line."""
        words = line.split()
        if not words:
            raise ValueError("empty command")
        cmd, args = words[0].lower(), words[1:]
        if cmd == "ping":
            return "ok"
        if cmd == "status":
            return "ok " + json.dumps(self._status_report(), separators=(",", ":"))
        if cmd == "close":
            return f"ok {self.close_connections()}"
        if cmd == "stall":
            self.stall(float(args[0]) if args else None)
            return "ok"
        if cmd == "unstall":
            self.unstall()
            return "ok"
        if cmd == "restart":
            await self.restart()
            return "ok"
        if cmd == "status_code":
            await self.set_status(args[0], args[1])
            return "ok"
        if cmd == "set_value":
            await self.set_value(args[0], json.loads(" ".join(args[1:])))
            return "ok"
        if cmd == "change_type":
            await self.change_type(args[0], args[1])
            return "ok"
        if cmd == "release":
            await self.release(args[0])
            return "ok"
        if cmd == "clear":
            await self.clear_faults()
            return "ok"
        if cmd == "speed":
            speed = float(args[0])
            if speed < 0 or not math.isfinite(speed):
                raise ValueError("speed must be finite and >= 0")
            self.speed = speed
            return "ok"
        if cmd == "force_state":
            self.model.force_state(int(args[0]), int(args[1]) if len(args) > 1 else 0)
            return "ok"
        if cmd == "write":
            self.model.write(args[0], json.loads(" ".join(args[1:])))
            return "ok"
        if cmd == "read":
            datavalue = self.value(args[0])
            raw = datavalue.Value.Value if datavalue.Value is not None else None
            status = datavalue.StatusCode.name if datavalue.StatusCode is not None else "Good"
            return "ok " + json.dumps({"value": _json_value(raw), "status": status})
        raise ValueError(f"unknown command {cmd!r}")

    def _status_report(self) -> dict[str, object]:
        """Simulator status for the control channel."""
        return {
            "url": self.url,
            "endpoints": [f"{policy}/{mode}" for policy, mode in self.endpoints],
            "certificate": str(self.certificate_path) if self.certificate_path else None,
            "speed": self.speed,
            "stalled": self.stalled,
            "connections": self.connections,
            "writes": len(self._writes),
            "pinned": sorted(self._pinned),
            "status_codes": {name: code.name for name, code in sorted(self._status.items())},
            "types": {name: self._vtypes[name].name for name in sorted(self._changed_types())},
            "snapshot": {k: _json_value(v) for k, v in self.model.snapshot().items()},
        }


async def send_control(port: int, command: str, *, host: str = "127.0.0.1") -> str:
    """Send one command to a simulator's control port; return the text after ``ok``.

    Wrap it in ``asyncio.timeout()`` to bound it (``restart`` can take a moment).
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(command.strip().encode() + b"\n")
        await writer.drain()
        reply = (await reader.readline()).decode().rstrip("\n")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    if reply == "ok" or reply.startswith("ok "):
        return reply[3:]
    raise RuntimeError(f"simulator control: {reply or 'connection closed'}")


# ---------------------------------------------------------------------- CLI


async def serve(
    simulator: OpcUaSimulator, stop: asyncio.Event, *, out: Callable[[str], None] = print
) -> None:
    """Run ``simulator`` until ``stop`` is set, printing the node table and the endpoints."""
    async with simulator:
        out(node_table())
        out(f"opcua simulator listening on {simulator.url}")
        out(
            "opcua simulator endpoints "
            + ", ".join(f"{policy}/{mode}" for policy, mode in simulator.endpoints)
            + (f"; users {', '.join(sorted(simulator.users))}" if simulator.users else "")
            + ("; anonymous allowed" if simulator.allow_anonymous else "")
        )
        if simulator.certificate_path is not None:
            out(
                f"opcua simulator certificate {simulator.certificate_path} "
                f"(SHA-256 {simulator.certificate_fingerprint})"
            )
        if simulator.control_port is not None:
            out(f"opcua simulator control on 127.0.0.1:{simulator.control_port}")
        out(f"seed {simulator.seed}, speed {simulator.speed:g}, bulk {simulator.bulk_count}")
        await stop.wait()


def _parser() -> argparse.ArgumentParser:
    """Command-line options of ``edge-agent simulate opcua``."""
    p = argparse.ArgumentParser(
        prog="edge-agent simulate opcua",
        description="OPC UA simulator of a production line (node table in the README).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port, 0 = any free ({DEFAULT_PORT})"
    )
    p.add_argument("--seed", type=int, default=1, help="line model seed")
    p.add_argument("--speed", type=float, default=1.0, help="simulated seconds per second")
    p.add_argument(
        "--secure",
        action="store_true",
        help="offer only Basic256Sha256/SignAndEncrypt with user 'edge' and --password",
    )
    p.add_argument("--password", default=DEFAULT_PASSWORD, help="password of user 'edge'")
    p.add_argument(
        "--pki", metavar="DIR", default=None, help="server certificate directory (reused)"
    )
    p.add_argument(
        "--bulk", type=int, default=BULK_COUNT, help=f"bulk variables (default {BULK_COUNT})"
    )
    p.add_argument(
        "--bulk-change-fraction",
        type=float,
        default=0.1,
        help="share of the bulk variables changing per simulated second (default 0.1)",
    )
    p.add_argument("--write-log", metavar="FILE", help="append every client write as JSON lines")
    p.add_argument(
        "--control-port",
        type=int,
        default=None,
        help="fault-injection control port on 127.0.0.1 (0 = any free; see the README)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the OPC UA simulator until SIGINT/SIGTERM; 0 ok, 1 runtime error, 2 usage."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        simulator = OpcUaSimulator(
            host=args.host,
            port=args.port,
            seed=args.seed,
            speed=args.speed,
            secure=args.secure,
            password=args.password,
            pki_dir=args.pki,
            bulk_count=args.bulk,
            bulk_change_fraction=args.bulk_change_fraction,
            control_port=args.control_port,
            write_log=args.write_log,
        )
    except ValueError as exc:
        print(f"edge-agent simulate opcua: {exc}", file=sys.stderr)
        return 2

    def out(text: str) -> None:
        print(text, flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(simulator, stop, out=out)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"edge-agent simulate opcua: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # asyncua logs every refused login and dropped connection at WARNING and above; the CLI
    # (`edge-agent simulate opcua`) does the same unless --log-level debug.
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    sys.exit(main())
