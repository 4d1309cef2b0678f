"""`edge-agent browse` against the OPC UA simulator (its own process, on free ports), plain and
Basic256Sha256/SignAndEncrypt with a user: the tree, the `--toml` blocks that `check` accepts
and `probe` reads all good, a configured device (`-c --device`), the node bound, and one line
with a documented exit code for every failure."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cli import main
from drivers.opcua.security import create_client_certificate
from simulators.opcua.nodes import NODE_TABLE
from tests.fixtures.ports import free_port, port_accepts, wait_until

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "browse-secret"
SECURE_FLAGS = ["--security-policy", "Basic256Sha256", "--security-mode", "SignAndEncrypt"]
HEADER = """
[gateway]
id = "plant1-line3"
site = "plant1"
area = "assembly"
line = "line3"
data_dir = "{data_dir}"

[mqtt]
url = "mqtt://127.0.0.1:1"

[[devices]]
name = "filler"
driver = "opcua"
url = "{url}"
timeout = "2s"
"""


@dataclass(frozen=True)
class Simulator:
    url: str
    pki: Path | None = None

    @property
    def server_certificate(self) -> Path:
        assert self.pki is not None
        return self.pki / "server-cert.der"


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def rows(self) -> dict[str, list[str]]:
        """Tree rows by browse path: the other columns, split on blanks."""
        found = {}
        lines = self.out.splitlines()
        table = lines[lines.index(next(ln for ln in lines if ln.startswith("path "))) + 1 :]
        for line in table:
            cells = line.split()
            if len(cells) >= 3 and cells[1].startswith(("i=", "ns=")):
                found[cells[0]] = cells[1:]
        return found


def start_simulator(tmp: Path, *extra: str) -> Iterator[Simulator]:
    port = free_port()
    pki = tmp / "server-pki" if "--secure" in extra else None
    argv = [sys.executable, "-m", "simulators.opcua", "--port", str(port), "--speed", "0"]
    argv += [*extra, *(["--pki", str(pki)] if pki is not None else [])]
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: port_accepts("127.0.0.1", port), timeout=30, message="simulator up")
        yield Simulator(f"opc.tcp://127.0.0.1:{port}", pki)
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    yield from start_simulator(tmp_path_factory.mktemp("plain"), "--bulk", "0")


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    extra = ("--bulk", "0", "--secure", "--password", PASSWORD)
    yield from start_simulator(tmp_path_factory.mktemp("secure"), *extra)


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client pair's directory: created by the first secured browse, then reused."""
    return tmp_path_factory.mktemp("client") / "pki"


def browse(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    capsys.readouterr()
    code = main(["browse", *argv])
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def secure_flags(sim: Simulator, pki: Path, password_file: Path) -> list[str]:
    return [
        *SECURE_FLAGS,
        "--server-certificate",
        str(sim.server_certificate),
        "--certificate",
        str(pki / "cert.der"),
        "--private-key",
        str(pki / "key.pem"),
        "--username",
        "edge",
        "--password-file",
        str(password_file),
    ]


def check_and_probe(capsys: pytest.CaptureFixture[str], config: Path, tags: int) -> str:
    capsys.readouterr()
    assert main(["check", "-c", str(config)]) == 0, capsys.readouterr()
    checked = capsys.readouterr().out
    assert f"tags: {tags} (" in checked
    assert main(["probe", "-c", str(config)]) == 0, capsys.readouterr()
    probed = capsys.readouterr().out
    assert f"{tags} of {tags} tags good" in probed
    return checked


def simulator_writable() -> set[str]:
    return {spec.name for spec in NODE_TABLE if spec.access == "rw"}


# ---------------------------------------------------------------------- plain


def test_browse_prints_the_tree(plain: Simulator, capsys: pytest.CaptureFixture[str]) -> None:
    run = browse(capsys, plain.url)
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert lines[0] == f"{plain.url} (security None), below Objects (i=85), depth 3"
    assert (
        lines[1]
        == "namespaces: ns=1 urn:edge-agent:simulator:server, ns=2 urn:edge-agent:simulator"
    )
    rows = run.rows()
    assert rows["Objects"] == ["i=85", "Object"]
    assert rows["Filler"] == ["ns=2;s=Filler", "Object"]
    assert rows["Filler/Counters/Total"] == [
        "ns=2;s=Filler.Counters.Total",
        "Variable",
        "UInt32",
        "r",
        "0",
    ]
    assert rows["Filler/Setpoints/SpeedBpm"][1:] == ["Variable", "Double", "rw", "120.0"]
    assert rows["Filler/Setpoints/Zones"][2:] == ["Int32[]", "rw", "[60,", "62,", "64,", "66]"]
    assert rows["Filler/Const/DateTime"][2:] == ["DateTime", "r", '"2024-01-02T03:04:05.678Z"']
    assert rows["Server"][2:] == [
        "(not",
        "browsed:",
        "the",
        "server's",
        "own",
        "object;",
        "--node",
        "i=2253)",
    ]
    # Indented by depth.
    assert "    Filler/Counters/Total " in run.out
    for spec in NODE_TABLE:
        assert rows["Filler/" + spec.name.removeprefix("Filler.").replace(".", "/")]
    assert re.search(r"^\d+ nodes below the start node, \d+ of them variables$", lines[-1])


def test_toml_blocks_pass_check_and_probe_reads_every_value_good(
    plain: Simulator, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = browse(capsys, plain.url, "--toml")
    assert run.code == 0, run.err
    tags = len(NODE_TABLE)
    assert run.out.startswith(
        f"# edge-agent browse {plain.url} --node i=85 --depth 3: {tags} tags\n"
    )
    assert '  name = "Filler.Counters.Total"\n' in run.out
    assert '  node_id = "nsu=urn:edge-agent:simulator;s=Filler.Counters.Total"\n' in run.out
    config = tmp_path / "agent.toml"
    config.write_text(HEADER.format(data_dir=tmp_path / "data", url=plain.url) + run.out)
    checked = check_and_probe(capsys, config, tags)
    assert f"tags: {tags} ({len(simulator_writable())} writable)" in checked
    written = re.findall(r'name = "([^"]+)"\n  node_id = "[^"]+"\n  writable = true', run.out)
    assert set(written) == simulator_writable()


def test_a_variable_as_start_node_and_depth_zero(
    plain: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    run = browse(
        capsys,
        plain.url,
        "--node",
        "nsu=urn:edge-agent:simulator;s=Filler.Recipe",
        "--depth",
        "0",
        "--toml",
    )
    assert run.code == 0, run.err
    assert (
        '  name = "Recipe"\n  node_id = "nsu=urn:edge-agent:simulator;s=Filler.Recipe"\n  writable = true'
        in run.out
    )
    tree = browse(capsys, plain.url, "--node", "ns=2;s=Filler.Setpoints", "--depth", "1")
    assert tree.code == 0
    assert tree.rows()["Setpoints"] == ["ns=2;s=Filler.Setpoints", "Object"]
    assert tree.rows()["Zones"][:3] == ["ns=2;s=Filler.Setpoints.Zones", "Variable", "Int32[]"]


def test_the_node_bound_stops_with_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for sim in start_simulator(tmp_path, "--bulk", "300"):
        run = browse(capsys, sim.url, "--max-nodes", "100")
        assert run.code == 3
        assert run.err.strip().splitlines() == [
            "edge-agent browse: stopped after 100 nodes; use --node/--depth (or --max-nodes) to "
            "see the rest"
        ]
        assert len(run.rows()) == 1 + 100
        toml = browse(capsys, sim.url, "--max-nodes", "100", "--toml")
        assert toml.code == 3
        assert toml.out.rstrip().endswith("to see the rest: this list is incomplete")
        whole = browse(capsys, sim.url, "--node", "ns=2;s=Bulk", "--max-nodes", "1000")
        assert whole.code == 0
        assert sum(1 for path in whole.rows() if path.startswith("G")) == 3 + 300


# ---------------------------------------------------------------------- secured


def test_secured_browse_toml_check_and_probe(
    secure: Simulator, client_pki: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    password_file = tmp_path / "filler.password"
    password_file.write_text(PASSWORD + "\n")
    flags = secure_flags(secure, client_pki, password_file)
    tree = browse(capsys, secure.url, *flags)
    assert tree.code == 0, tree.err
    assert tree.out.startswith(f"{secure.url} (Basic256Sha256/SignAndEncrypt), below Objects")
    assert tree.rows()["Filler/Recipe"][1:4] == ["Variable", "String", "rw"]
    assert (client_pki / "cert.der").is_file()  # created, to be trusted by the server
    run = browse(capsys, secure.url, *flags, "--toml")
    assert run.code == 0, run.err
    device = "\n".join(
        [
            'security_policy = "Basic256Sha256"',
            'security_mode = "SignAndEncrypt"',
            f'server_certificate = "{secure.server_certificate}"',
            f'certificate = "{client_pki / "cert.der"}"',
            f'private_key = "{client_pki / "key.pem"}"',
            'username = "edge"',
            f'password_file = "{password_file}"',
        ]
    )
    config = tmp_path / "agent.toml"
    header = HEADER.format(data_dir=tmp_path / "data", url=secure.url)
    config.write_text(header + device + "\n" + run.out)
    check_and_probe(capsys, config, len(NODE_TABLE))
    # The configured device: its own connection settings, its tags offered again as comments.
    again = browse(capsys, "-c", str(config), "--device", "filler", "--toml")
    assert again.code == 0, again.err
    assert f"0 tags; {len(NODE_TABLE)} left out, as comments saying why" in again.out
    assert "# left out: already configured as tag 'Filler.State'" in again.out
    missing = browse(capsys, "-c", str(config), "--device", "nope")
    assert (missing.code, missing.err) == (
        2,
        f"edge-agent browse: --device: {config} has no OPC UA device 'nope' (filler)\n",
    )


def test_the_password_may_come_from_the_environment(
    secure: Simulator,
    client_pki: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flags = secure_flags(secure, client_pki, tmp_path / "unused")
    flags = flags[: flags.index("--password-file")]
    monkeypatch.setenv("EDGE_AGENT_OPCUA_PASSWORD", PASSWORD)
    run = browse(capsys, secure.url, *flags, "--node", "ns=2;s=Filler.State", "--depth", "0")
    assert run.code == 0, run.err
    monkeypatch.setenv("EDGE_AGENT_OPCUA_PASSWORD", "wrong")
    refused = browse(capsys, secure.url, *flags)
    assert (refused.code, refused.err) == (
        1,
        "edge-agent browse: server refused user 'edge': BadUserAccessDenied\n",
    )


def test_refusals_are_one_line_with_exit_1(
    secure: Simulator, client_pki: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD)
    flags = secure_flags(secure, client_pki, password_file)
    plain_to_secure = browse(capsys, secure.url)
    assert plain_to_secure.code == 1
    assert plain_to_secure.err.startswith("edge-agent browse: ")
    assert len(plain_to_secure.err.splitlines()) == 1
    other = tmp_path / "other"
    create_client_certificate(other / "cert.der", other / "key.pem", "urn:other")
    pinned = flags.copy()
    pinned[pinned.index("--server-certificate") + 1] = str(other / "cert.der")
    mismatch = browse(capsys, secure.url, *pinned)
    assert mismatch.code == 1
    assert mismatch.err.startswith(
        "edge-agent browse: server certificate does not match server_certificate (expected"
    )
    assert len(mismatch.err.splitlines()) == 1
    sign_only = flags.copy()
    sign_only[sign_only.index("SignAndEncrypt")] = "Sign"
    offered = browse(capsys, secure.url, *sign_only)
    assert (offered.code, offered.err) == (
        1,
        "edge-agent browse: server offers no Basic256Sha256/Sign endpoint (it offers "
        "Basic256Sha256/SignAndEncrypt)\n",
    )


def test_an_unreachable_server_is_one_line_with_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"opc.tcp://127.0.0.1:{free_port()}"
    run = browse(capsys, url)
    assert run.code == 1
    assert run.out == ""
    assert re.fullmatch(rf"edge-agent browse: cannot connect to {url}: .+\n", run.err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--node", "Filler.State"], "invalid node id 'Filler.State'"),
        (["--node", "ns=2;s=Filler.Nope"], "the server has no node ns=2;s=Filler.Nope"),
        (["--node", "nsu=urn:nope;s=X"], "the server has no namespace urn:nope"),
    ],
)
def test_a_wrong_start_node_is_exit_2(
    plain: Simulator, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    run = browse(capsys, plain.url, *argv)
    assert run.code == 2
    assert run.err.startswith("edge-agent browse: ")
    assert message in run.err
    assert len(run.err.splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "lines"),
    [
        ([], ["give the server's URL, or -c FILE [--device NAME]"]),
        (["http://x"], ["URL: 'http://x': write an endpoint as 'opc.tcp://HOST:PORT'"]),
        (
            ["opc.tcp://h:1", "--security-mode", "SignAndEncrypt"],
            [
                "--security-policy: security_mode SignAndEncrypt needs a policy other than None",
                "--server-certificate: required with security_mode SignAndEncrypt: the agent "
                "never trusts a certificate it was not given",
            ],
        ),
        (
            ["opc.tcp://h:1", *SECURE_FLAGS, "--server-certificate", "s.der"],
            [
                "--security-mode SignAndEncrypt: give --certificate and --private-key (created "
                "when both files are absent; the server must trust that certificate)"
            ],
        ),
        (
            ["opc.tcp://h:1", "--timeout", "5"],
            [
                "--timeout: invalid duration '5'; write a number and a unit (ms, s, m, h, d, w), "
                "e.g. '500ms', '2s', '5m', '30d'"
            ],
        ),
        (["opc.tcp://h:1", "--device", "x"], ["--device needs -c FILE"]),
        (
            ["opc.tcp://h:1", "-c", "agent.toml", "--username", "u"],
            ["with -c the connection comes from the config; leave out URL, --username"],
        ),
    ],
)
def test_bad_flags_are_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], lines: list[str]
) -> None:
    run = browse(capsys, *argv)
    assert run.code == 2
    assert run.err.splitlines() == [f"edge-agent browse: {line}" for line in lines]


def test_help_shows_defaults_an_example_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["browse", "--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    for expected in (
        "(default: i=85, Objects)",
        "(default: 3)",
        "(default: 2000)",
        "edge-agent browse opc.tcp://192.168.10.12:4840 --node",
        "$EDGE_AGENT_OPCUA_PASSWORD",
        "exit codes: 0 done, 1 unreachable or refused",
    ):
        assert expected in text
