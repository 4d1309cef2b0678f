"""The OPC UA client key pair the agent generates is complete or absent after a cut (issue #25,
"generated OPC UA client keys and certificates are either complete or absent"): both files are
written and fsynced under staging names before either gets its name, and a pair cut between the
two renames is completed at the next start instead of refusing the device for a person to fix.
The cut is simulated at each rename (a kill -9 at that instant leaves exactly these files)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import drivers.opcua.security as security
from drivers.opcua.security import create_client_certificate, finish_interrupted_pair


class Cut(Exception):
    """The power went at this instant."""


def cut_at_rename(monkeypatch: pytest.MonkeyPatch, number: int) -> None:
    """Make the `number`-th os.replace of the security module the instant of the cut."""
    real = security.os.replace
    calls = [0]

    def replace(source: object, target: object) -> None:
        calls[0] += 1
        if calls[0] == number:
            raise Cut
        real(source, target)  # type: ignore[arg-type]

    monkeypatch.setattr(security.os, "replace", replace)


def assert_matching_pair(cert_path: Path, key_path: Path) -> None:
    cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


@pytest.mark.parametrize("rename", [1, 2])
def test_a_cut_during_creation_leaves_no_half_pair(
    rename: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert_path, key_path = tmp_path / "pki" / "cert.der", tmp_path / "pki" / "key.pem"
    cut_at_rename(monkeypatch, rename)
    with pytest.raises(Cut):
        create_client_certificate(cert_path, key_path, "urn:edge-agent:test")
    monkeypatch.undo()
    finished = finish_interrupted_pair(cert_path, key_path)
    if rename == 1:  # nothing renamed: absent, and a new pair is created over the staging files
        assert not finished
        assert not cert_path.exists()
        assert not key_path.exists()
        create_client_certificate(cert_path, key_path, "urn:edge-agent:test")
    else:  # the key renamed, the certificate staged: completed
        assert finished
    assert_matching_pair(cert_path, key_path)
    assert sorted(p.name for p in cert_path.parent.iterdir()) == ["cert.der", "key.pem"]


async def test_the_driver_completes_a_cut_pair_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    cert_path, key_path = tmp_path / "cert.der", tmp_path / "key.pem"
    cut_at_rename(monkeypatch, 2)
    with pytest.raises(Cut):
        create_client_certificate(cert_path, key_path, "urn:edge-agent:test")
    monkeypatch.undo()
    # Before: "key.pem exists but cert.der does not: restore the missing file, ..." forever.
    await security._ensure_client_certificate(cert_path, key_path, "urn:edge-agent:test")
    assert_matching_pair(cert_path, key_path)
    assert f"OPC UA client certificate {cert_path} completed (its creation was cut)" in caplog.text
