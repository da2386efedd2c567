"""Shared pytest fixtures. Keep each fixture small and documented; append new ones below."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (tinyguest) importable


@pytest.fixture(scope="session")
def tiny_guest():
    """Kernel + initramfs of the tiny busybox/dropbear test guest (built once, cached)."""
    from tinyguest import tiny_guest as build
    return build()


@pytest.fixture
def ssh_key(tmp_path):
    """A fresh ed25519 key for this test: (private key path, public "ssh-ed25519 ..." line)."""
    from builder.machine import ssh_keypair
    return ssh_keypair(tmp_path / "ssh")


# The shared built Debian mail image (session scope), see tests/fixtures_build.py.
from fixtures_build import debian_image  # noqa: E402,F401
