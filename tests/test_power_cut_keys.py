"""Power cuts during the first start's OPC UA key generation (issue #25): after each cut the
generated pair is complete or absent (or key named and certificate staged, which the next start
completes), never half-written, and the next start on the surviving files yields a matching
pair instead of a device refused until a person intervenes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from drivers.opcua import security
from tests.fixtures.powercut import Forked, PowerCutDisk, fuse_available

pytestmark = pytest.mark.skipif(not fuse_available(), reason="no usable /dev/fuse and fuse3")

CUTS = 12
URI = "urn:edge-agent:test"


def pair_matches(cert_path: Path, key_path: Path) -> bool:
    cert = x509.load_der_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return bool(cert.public_key().public_numbers() == key.public_key().public_numbers())  # type: ignore[union-attr]


def first_start(pki: Path) -> None:
    """What the driver does at start: complete a cut pair or create one."""
    uvloop.run(
        security._ensure_client_certificate(pki / "agent-cert.der", pki / "agent-key.pem", URI)
    )


def test_key_generation_cut_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random(25)
    states: dict[str, int] = {}
    with PowerCutDisk(tmp_path / "backing", tmp_path / "mnt", tmp_path / "fs.log") as disk:
        for number in range(CUTS):
            pki = disk.mountpoint / "data" / "pki"
            child = Forked(lambda pki=pki: first_start(pki))  # type: ignore[misc]
            # RSA-2048 generation takes tens to hundreds of milliseconds here.
            disk.wait_a_moment(rng.uniform(0.0, 0.3))
            disk.cut(child, writeback=rng.choice((0.0, 0.5)), seed=number)
            out = tmp_path / f"out-{number}"
            disk.export(out)
            names = (
                sorted(p.name for p in (out / "data" / "pki").iterdir())
                if (out / "data" / "pki").is_dir()
                else []
            )
            named = [name for name in names if not name.startswith(".")]
            if named == ["agent-cert.der", "agent-key.pem"]:
                assert pair_matches(out / "data/pki/agent-cert.der", out / "data/pki/agent-key.pem")
                state = "complete"
            elif named == ["agent-key.pem"]:
                assert ".agent-cert.der.new" in names, f"cut {number}: a key alone: {names}"
                state = "key named, certificate staged"
            else:
                assert named == [], f"cut {number}: {names}"
                state = "absent"
            states[state] = states.get(state, 0) + 1
            disk.mount()
            first_start(pki)  # the restart on the surviving files
            assert pair_matches(pki / "agent-cert.der", pki / "agent-key.pem")
            for path in sorted(pki.iterdir()):  # the next round generates again
                path.unlink()
            security._fsync_dirs(pki / "x")
    assert sum(states.values()) == CUTS
    assert states.get("absent", 0) > 0, states  # the cuts did fall during the generation
