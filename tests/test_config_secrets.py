"""Secrets in the config (issue #18, item 7): cleartext passwords are warned about by `edge-agent
check`, credentials in a URL are refused and never echoed, whatever the URL and the message; and a
secret file is needed only by the commands that use it (issue #21, item 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.central.settings import load_central_settings
from agent.cli import main
from agent.settings.loader import ConfigError, device_secrets, load_agent_settings
from drivers.config import redact_url, redact_urls
from tests.fixtures.ports import free_port
from tests.test_config import BASE

SECRET = "s3cret"

CENTRAL = """\
[mqtt]
url = "mqtt://broker.plant.local:1883"
username = "ingest"
password_file = "ingest.password"

[postgres]
dsn = "postgresql://ingest@db.plant.local:5432/plant"
"""


def check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    (tmp_path / "mqtt.password").write_text(SECRET)
    (tmp_path / "ingest.password").write_text(SECRET)
    path = tmp_path / "agent.toml"
    path.write_text(text)
    code = main(["check", "-c", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def line_of(text: str, line: str) -> int:
    return text.splitlines().index(line) + 1


MQTT_PASSWORD = 'url = "mqtt://127.0.0.1:1883"\nusername = "line3"\npassword_file = "mqtt.password"'
OPCUA_PASSWORD = 'url = "opc.tcp://127.0.0.1:4840"\nusername = "edge"\npassword = "opc"'


def test_check_warns_of_every_cleartext_password_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = BASE.replace('url = "mqtt://127.0.0.1:1883"', MQTT_PASSWORD).replace(
        'url = "opc.tcp://127.0.0.1:4840"', OPCUA_PASSWORD
    )
    code, out, err = check(tmp_path, text, capsys)
    assert code == 0, err
    assert "OK" in out
    url_line = line_of(text, 'url = "mqtt://127.0.0.1:1883"')
    # security_mode is not written: the line is the device's table.
    device_line = line_of(text, 'name = "filler"') - 1
    assert err.splitlines() == [
        "warning: mqtt.url: the password goes to the broker in cleartext over mqtt://; use "
        f"mqtts:// (line {url_line})",
        "warning: devices[1].security_mode: with security_mode None the password can cross the "
        f"network in cleartext; use SignAndEncrypt (line {device_line})",
    ]
    assert SECRET not in out + err


def test_no_warning_over_tls_or_a_secured_channel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "server.der").write_bytes(b"")
    text = BASE.replace(
        'url = "mqtt://127.0.0.1:1883"', MQTT_PASSWORD.replace("mqtt://", "mqtts://")
    ).replace(
        'url = "opc.tcp://127.0.0.1:4840"',
        OPCUA_PASSWORD + '\nsecurity_policy = "Basic256Sha256"\nsecurity_mode = "Sign"\n'
        'server_certificate = "server.der"',
    )
    assert check(tmp_path, text, capsys)[::2] == (0, "")
    # Anonymous over mqtt:// sends no password: nothing to warn about either.
    assert check(tmp_path, BASE, capsys)[::2] == (0, "")


def test_check_warns_of_the_ingest_cleartext_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = check(tmp_path, CENTRAL, capsys)
    assert (code, "OK (ingest)" in out) == (0, True)
    assert err.splitlines() == [
        "warning: mqtt.url: the password goes to the broker in cleartext over mqtt://; use "
        "mqtts:// (line 2)"
    ]
    tls = CENTRAL.replace("mqtt://broker.plant.local:1883", "mqtts://broker.plant.local:8883")
    assert check(tmp_path, tls, capsys)[::2] == (0, "")


# (where the URL goes, the URL, part of the one problem line) for URLs that carry credentials.
AGENT_MQTT = 'url = "mqtt://127.0.0.1:1883"'
MODBUS = 'url = "tcp://127.0.0.1:5020"'
OPCUA = 'url = "opc.tcp://127.0.0.1:4840"'
CREDENTIAL_URLS = [
    (AGENT_MQTT, f"mqtt://line3:{SECRET}@broker:1883", "mqtt.url: 'mqtt://line3:***@broker:1883'"),
    (AGENT_MQTT, f"mqtts://line3:{SECRET}@broker", "credentials do not belong in the URL"),
    (AGENT_MQTT, f"mqtt://line3:{SECRET}@broker:port", "mqtt.url: 'mqtt://line3:***@broker:port'"),
    (AGENT_MQTT, f"line3:{SECRET}@broker:1883", "'line3:***@broker:1883': scheme must be"),
    (AGENT_MQTT, f"mqtt://line3:{SECRET}@", "mqtt.url: 'mqtt://line3:***@'"),
    (AGENT_MQTT, f"mqtt://line3:my {SECRET}@broker", "mqtt.url: 'mqtt://line3:***@broker'"),
    (
        AGENT_MQTT,
        f"mqtt://line3:a'{SECRET}@broker",
        "mqtt.url: 'mqtt://line3:***@broker': credentials",
    ),
    (AGENT_MQTT, f"line3:my {SECRET}@broker", "'line3:***@broker': scheme must be"),
    (AGENT_MQTT, f"mqtt://line3:{SECRET}/x@broker", "mqtt.url: 'mqtt://line3:***@broker'"),
    (OPCUA, f"opc.tcp://edge:{SECRET}@plc:4840", "devices[1].url: 'opc.tcp://edge:***@plc:4840'"),
    (OPCUA, f"opc.tcp://edge:{SECRET}@plc:x", "'opc.tcp://edge:***@plc:x'"),
    (OPCUA, f"opc.tcp://edge:{SECRET}@", "'opc.tcp://edge:***@'"),
    (MODBUS, f"tcp://u:{SECRET}@plc:502", "devices[0].url: 'tcp://u:***@plc:502': Modbus has no"),
    (MODBUS, f"rtu://u:{SECRET}@/dev/ttyUSB0", "'rtu://u:***@/dev/ttyUSB0': Modbus has no login"),
    (MODBUS, f"udp://u:{SECRET}@plc:502", "'udp://u:***@plc:502'"),
    (MODBUS, f"tcp://u:my {SECRET}@plc", "'tcp://u:***@plc': Modbus has no login"),
    (OPCUA, f"opc.tcp://edge:my {SECRET}@plc:4840", "'opc.tcp://edge:***@plc:4840'"),
]


@pytest.mark.parametrize(("where", "url", "expected"), CREDENTIAL_URLS)
def test_credentials_in_a_url_are_refused_and_never_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, url: str, expected: str
) -> None:
    text = BASE.replace(where, where.split('"')[0] + f'"{url}"', 1)
    assert text != BASE
    code, out, err = check(tmp_path, text, capsys)
    assert code == 2
    assert SECRET not in out + err
    assert expected in err, err


def test_a_url_from_the_environment_is_redacted_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT__MQTT__URL", f"mqtt://line3:{SECRET}@broker:1883")
    code, out, err = check(tmp_path, BASE, capsys)
    assert code == 2
    assert SECRET not in out + err
    assert "mqtt.url: 'mqtt://line3:***@broker:1883': credentials do not belong" in err
    assert "(from EDGE_AGENT__MQTT__URL)" in err


def test_the_ingest_broker_url_is_refused_and_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = CENTRAL.replace("mqtt://broker", f"mqtt://ingest:{SECRET}@broker")
    code, out, err = check(tmp_path, text, capsys)
    assert code == 2
    assert SECRET not in out + err
    assert "mqtt.url: 'mqtt://ingest:***@broker.plant.local:1883': credentials" in err


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("'mqtt://u:pw@host:x': invalid port", "'mqtt://u:***@host:x': invalid port"),
        ("a mqtt://u:p@h, mqtt://v:q@i", "a mqtt://u:***@h, mqtt://v:***@i"),
        (
            "failed: postgresql://ingest:pw@db:5432/plant",
            "failed: postgresql://ingest:***@db:5432/plant",
        ),
        ("x opc.tcp://a:b@c@d:4840/x y", "x opc.tcp://a:***@d:4840/x y"),
        ("user:pw@host", "user:***@host"),
        # Nothing to hide: a user without a password, no userinfo, a node id.
        ("see mqtt://u@host", "see mqtt://u@host"),
        ("devices[0].url: 'tcp://h:502': x", "devices[0].url: 'tcp://h:502': x"),
        ("ns=2;s=A:B", "ns=2;s=A:B"),
    ],
)
def test_redact_urls_in_a_message(text: str, redacted: str) -> None:
    assert redact_urls(text) == redacted


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("mqtt://u:pw@host:1883", "mqtt://u:***@host:1883"),
        ("mqtt://u:my pass@host", "mqtt://u:***@host"),
        ("mqtt://u:a'b\"c@host", "mqtt://u:***@host"),
        ("mqtt://u:p/ss@host", "mqtt://u:***@host"),
        ("opc.tcp://a:b@c@d:4840/x", "opc.tcp://a:***@d:4840/x"),
        ("rtu://u:pw@/dev/ttyUSB0", "rtu://u:***@/dev/ttyUSB0"),
        ("user:my pw@host", "user:***@host"),
        ("mqtt://:pw@host", "mqtt://:***@host"),
        ("mqtt://u@host", "mqtt://u@host"),
        ("mqtt://host:1883", "mqtt://host:1883"),
    ],
)
def test_redact_one_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


# ---------------------------------------------------------------------------------------------
# Secrets are needed only by the commands that use them (issue #21, item 1)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "agent.example.toml"


def test_readme_check_of_the_example_passes_without_its_secret_files(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The README's own command, on a fresh clone where config/*.password does not exist.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert not (REPO / "config" / "mqtt.password").exists()
    code = main(["check", "-c", str(EXAMPLE)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.startswith(f"{EXAMPLE}: OK\n")
    text = EXAMPLE.read_text()
    mqtt_line = line_of(text, 'password_file = "mqtt.password"')
    filler_line = line_of(text, 'password_file = "filler.password"')
    assert captured.err.splitlines() == [
        f"warning: mqtt.password_file: no such file: {REPO}/config/mqtt.password; the service "
        f"will not start without it (line {mqtt_line})",
        f"warning: devices[2].password_file: no such file: {REPO}/config/filler.password; the "
        f"service will not start without it (line {filler_line})",
    ]


def test_run_still_refuses_a_missing_secret_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError) as info:
        load_agent_settings(EXAMPLE)  # what `edge-agent run` loads with
    assert [problem.split(":")[0] for problem in info.value.problems] == [
        "mqtt.password_file",
        "devices[2].password_file",
    ]


def test_probe_needs_the_device_secrets_only(tmp_path: Path) -> None:
    # probe logs in to the PLCs, never to the broker.
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    with pytest.raises(ConfigError) as info:
        load_agent_settings(EXAMPLE, environ=environ, secrets_needed=device_secrets)
    assert [problem.split(":")[0] for problem in info.value.problems] == [
        "devices[2].password_file"
    ]
    (tmp_path / "filler.password").write_text("opc")
    settings = load_agent_settings(EXAMPLE, environ=environ, secrets_needed=device_secrets)
    assert settings.mqtt.password is None
    filler = settings.device("filler")
    assert filler is not None
    assert filler.password.get_secret_value() == "opc"  # type: ignore[attr-defined]


def test_status_and_replay_read_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    samples = tmp_path / "samples.csv"
    samples.write_text(
        "ts,device,tag,value\n"
        "2026-03-02T06:00:00Z,press1,state_code,1\n"
        "2026-03-02T06:00:00Z,press1,total_count,0\n"
        "2026-03-02T06:10:00Z,press1,total_count,400\n"
        "2026-03-02T06:20:00Z,press1,state_code,2\n"
    )
    assert main(["oee", "-c", str(EXAMPLE), "--replay", str(samples)]) == 0
    out = capsys.readouterr().out
    assert '"machine": "press1"' in out
    # Nothing listens on that port: "unreachable", not a config error.
    monkeypatch.setenv("EDGE_AGENT__HTTP__LISTEN", f"127.0.0.1:{free_port()}")
    code = main(["status", "-c", str(EXAMPLE)])
    captured = capsys.readouterr()
    assert code == 3  # unreachable; 2 would be a bad config
    assert "password_file" not in captured.err
    assert "unreachable" in captured.err or "cannot reach" in captured.err, captured.err


def test_check_of_a_central_config_without_its_dsn_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "central.toml"
    path.write_text('[mqtt]\nurl = "mqtts://broker:8883"\n[postgres]\ndsn_file = "dsn"\n')
    assert main(["check", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert err == (
        f"warning: postgres.dsn_file: no such file: {tmp_path}/dsn; the service will not start "
        "without it (line 4)\n"
    )
    with pytest.raises(ConfigError) as info:
        load_central_settings(path, environ={})
    assert info.value.problems == [f"postgres.dsn_file: no such file: {tmp_path}/dsn (line 4)"]
