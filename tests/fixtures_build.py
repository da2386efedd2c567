"""The shared built Debian image (session scope): one `mkmailimage build debian` of an
`init_site` site, reused by every VM test that needs a real mail image.

    def test_x(debian_image):
        image, key, site, password = debian_image    # qcow2, root's SSH key, site.yaml, user's password

Built once per pytest session into a temporary directory (the base layer is cached across
sessions under cache_dir(), so only the first session ever pays for mmdebstrap).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import pytest

TEST_PASSWORD = "alice's test password"


class BuiltImage(NamedTuple):
    image: Path          # NAME.qcow2
    key: Path            # private key root accepts (site admin_ssh_keys)
    site: Path           # site.yaml
    password: str        # alice@a.test's IMAP/SMTP password
    outputs: dict        # kind -> path (qcow2, raw, manifest, sums)


def make_test_site(directory: Path, public_key: str, domain: str = "a.test",
                   disk_size: str | None = None) -> Path:
    """An init_site site whose root accepts PUBLIC_KEY; DISK_SIZE (e.g. "2G") replaces the
    template's debian.disk_size."""
    from builder.initsite import init_site
    init_site(domain, directory / domain, user="alice", password=TEST_PASSWORD,
              out=open(os.devnull, "w"))
    site = directory / domain / "site.yaml"
    text = site.read_text().replace("admin_ssh_keys: []", f"admin_ssh_keys:\n  - {public_key}")
    if disk_size:
        text, n = re.subn(r"(?m)^(debian:\n(?:[ \t].*\n|\n)*?[ \t]+disk_size:) \S+", rf"\1 {disk_size}", text)
        assert n == 1, "the site template has no debian.disk_size line"
    site.write_text(text)
    return site


@pytest.fixture(scope="session")
def debian_image(tmp_path_factory) -> BuiltImage:
    from builder.build import BuildState, run_build
    from builder.machine import ssh_keypair
    from builder.progress import Progress
    d = tmp_path_factory.mktemp("debian-image")
    key, public = ssh_keypair(d / "ssh")
    site = make_test_site(d, public)
    st = run_build(BuildState(site_path=site, out_dir=d / "images", name="a.test", keep_raw=True,
                              progress=Progress(verbose=False)))
    return BuiltImage(Path(st.outputs["qcow2"]), key, site, TEST_PASSWORD, dict(st.outputs))
