"""TLS beyond verification (issue #19): ALPN offered in the handshake (AWS IoT Core on port 443),
and a client key with a passphrase, read from `key_password_file`, never asked for on a
terminal. Verification itself is proven in tests/test_mqtt_client.py."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from agent.service.mqtt import mqtt_client
from agent.settings.gateway import MqttConfig
from agent.settings.loader import load_agent_settings
from sync.mqtt.client import MqttClient, TlsOptions, Will
from tests.fixtures.fake_broker import CONNACK_V5
from tests.fixtures.pool import MosquittoFactory
from tests.fixtures.tls import generate_tls_files


def encrypted_copy(key: Path, passphrase: bytes) -> Path:
    """The same private key, PEM-encrypted with `passphrase`."""
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    path = key.with_name("encrypted.key")
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
    )
    return path


async def test_alpn_is_offered_in_the_handshake(tmp_path: Path) -> None:
    files = generate_tls_files(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(files.server_cert, files.server_key)
    server_context.set_alpn_protocols(["x-amzn-mqtt-ca"])
    chosen: list[str | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        chosen.append(ssl_object.selected_alpn_protocol())
        await reader.read(1024)
        writer.write(CONNACK_V5)
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    tls = TlsOptions(ca_file=str(files.ca_cert), alpn=("x-amzn-mqtt-ca",))
    async with server, MqttClient(host="127.0.0.1", port=port, client_id="a", tls=tls) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
    assert chosen == ["x-amzn-mqtt-ca"]


async def test_an_encrypted_key_with_its_password_file_connects(
    mosquitto_factory: MosquittoFactory, tmp_path: Path
) -> None:
    broker = mosquitto_factory(tls=True, require_certificate=True)
    files = broker.tls_files
    assert files is not None
    assert broker.tls_port is not None
    key = encrypted_copy(files.client_key, b"s3cret pass")
    (tmp_path / "key.password").write_text("s3cret pass\n")
    config_path = tmp_path / "agent.toml"
    config_path.write_text(
        f"""[gateway]
id = "gw"
site = "s"
area = "a"
line = "l"
data_dir = "{tmp_path / "data"}"

[mqtt]
url = "mqtts://127.0.0.1:{broker.tls_port}"
ca_file = "{files.ca_cert}"
cert_file = "{files.client_cert}"
key_file = "{key}"
key_password_file = "key.password"
"""
    )
    settings = load_agent_settings(config_path, environ={}).mqtt
    assert settings.key_password is not None  # read from the file next to the config
    will = Will("tls/status", lambda: b"offline")
    async with mqtt_client(settings, client_id="enc", name="mqtt", will=will) as client:
        async with asyncio.timeout(10):
            await client.wait_connected()
        await asyncio.wait_for(client.publish_acked("tls/x", b"1"), 5)


@pytest.mark.parametrize(
    ("password", "error"),
    [
        (None, "encrypted.key: the key is encrypted; set key_password_file"),
        ("wrong", "encrypted.key: the key's password is wrong"),
    ],
)
def test_an_encrypted_key_without_its_password_is_a_clear_error(
    tmp_path: Path, password: str | None, error: str
) -> None:
    files = generate_tls_files(tmp_path)
    key = encrypted_copy(files.client_key, b"right")
    options = TlsOptions(
        ca_file=str(files.ca_cert),
        cert_file=str(files.client_cert),
        key_file=str(key),
        key_password=password,
    )
    # Never a prompt on the terminal: OpenSSL would read the passphrase from the TTY.
    with pytest.raises(ValueError, match=error):
        MqttClient(host="127.0.0.1", port=8883, client_id="k", tls=options)


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"url": "mqtt://h", "alpn": ["x"]}, "ALPN is part of TLS: it needs an mqtts:// url"),
        ({"url": "mqtts://h", "key_password": "p"}, "a key passphrase needs key_file"),
        ({"url": "mqtts://h", "alpn": [""]}, "an ALPN protocol name is 1..255 bytes"),
    ],
)
def test_tls_keys_that_cannot_work_are_refused(keys: dict[str, object], problem: str) -> None:
    config = MqttConfig.model_validate(keys)
    assert problem in [reason for _, reason in config.problems()]
