"""`mkmailimage build debian` run by an ordinary user: the base layer is made by mmdebstrap
without root, the tree is extracted and the disk assembled as root of a user namespace
(builder.userns), and the image is bit for bit the one root builds from the same site.

The test needs root only to create the unprivileged users it builds as (and removes them)."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from builder import cache, paths
from builder.userns import mapped_ids

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creates the unprivileged users it builds as")


# -- fast ------------------------------------------------------------------------------------

def test_mapped_ids_counts_the_block_from_zero():
    assert mapped_ids("         0       1001          1\n         1     100000      65535\n") == 65536
    assert mapped_ids("0 1001 1\n") == 1
    # a gap at 1 leaves only id 0 usable from the bottom
    assert mapped_ids("0 1001 1\n2 100000 65534\n") == 1
    assert mapped_ids("") == 0


# -- helpers ---------------------------------------------------------------------------------

class BuildUser:
    """A throw-away login user, with or without subordinate ids, and a Python it can run:
    /usr/bin/python3 with a readable copy of this checkout and of the venv's packages (the
    venv's own interpreter may live under root's home, which other users cannot enter)."""

    def __init__(self, name: str, subids: tuple[int, int] | None):
        self.name = name
        subprocess.run(["userdel", "-r", name], capture_output=True)
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True)
        # useradd gives new users subordinate ids or not depending on login.defs: set them exactly
        self._subids(subids)
        self.pw = pwd.getpwnam(name)
        self.home = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        os.chmod(self.home, 0o755)
        self.code = self.home / "code"
        for part in ("builder", "overlays", "autoinstall"):
            shutil.copytree(paths.ROOT / part, self.code / part,
                            ignore=shutil.ignore_patterns("__pycache__"))
        site_packages = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
        shutil.copytree(site_packages, self.home / "site-packages", symlinks=True)
        self.chown(self.home)

    def _subids(self, subids) -> None:
        for db in ("/etc/subuid", "/etc/subgid"):
            path = Path(db)
            lines = path.read_text().splitlines() if path.exists() else []
            lines = [x for x in lines if not x.startswith(self.name + ":")]
            if subids:
                lines.append(f"{self.name}:{subids[0]}:{subids[1]}")
            path.write_text("".join(x + "\n" for x in lines))

    def chown(self, path: Path) -> None:
        subprocess.run(["chown", "-R", f"{self.pw.pw_uid}:{self.pw.pw_gid}", str(path)], check=True)

    def mkmailimage(self, *args, cache_dir: Path, timeout: float = 1800,
                    env: dict | None = None) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(self.home),
               "MKMAILIMAGE_CACHE": str(cache_dir), **(env or {}),
               "PYTHONPATH": f"{self.code}:{self.home / 'site-packages'}"}
        return subprocess.run(["runuser", "-u", self.name, "--", "env", "-i",
                               *(f"{k}={v}" for k, v in env.items()),
                               "/usr/bin/python3", "-m", "builder.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, cwd=self.home)

    def processes(self) -> str:
        return subprocess.run(["pgrep", "-a", "-u", self.name], capture_output=True, text=True).stdout

    def remove(self) -> None:
        subprocess.run(["pkill", "-KILL", "-u", self.name], capture_output=True)
        self._subids(None)
        subprocess.run(["userdel", "-r", self.name], capture_output=True)
        shutil.rmtree(self.home, ignore_errors=True)


def _python_matches_venv() -> None:
    out = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])"],
                         capture_output=True, text=True).stdout.split()
    assert out == [str(v) for v in sys.version_info[:2]], (
        f"/usr/bin/python3 is {'.'.join(out)}, the venv {sys.version_info[0]}.{sys.version_info[1]}: "
        "the copied packages would not load")


# -- slow ------------------------------------------------------------------------------------

@needs_root
def test_without_subordinate_ids_the_build_says_how_to_fix_it_and_writes_nothing():
    from builder.machine import ssh_keypair
    from fixtures_build import make_test_site
    _python_matches_venv()
    user = BuildUser("mkmi-nosubid", subids=None)
    try:
        _, public = ssh_keypair(user.home / "ssh")
        site = make_test_site(user.home, public).parent
        user.chown(user.home)
        out = user.home / "images"
        p = user.mkmailimage("build", "debian", site / "site.yaml", "--out", out,
                             cache_dir=user.home / "cache", timeout=120)
        assert p.returncode == 3, p.stdout + p.stderr
        assert "subordinate ids" in p.stderr and "usermod --add-subuids" in p.stderr, p.stderr
        assert not out.exists() and not (user.home / "cache").exists()
    finally:
        user.remove()


@needs_root
@pytest.mark.build
def test_an_ordinary_user_builds_the_same_image_as_root(debian_image):
    _python_matches_venv()
    user = BuildUser("mkmi-build", subids=(300000, 65536))
    try:
        site = user.home / "site"
        shutil.copytree(debian_image.site.parent, site)
        # the user's own cache, with root's verified downloads so the test does not fetch again;
        # the base layer itself is built from scratch, by mmdebstrap without root
        user_cache = user.home / "cache"
        shutil.copytree(cache.debs_dir(), user_cache / "debs")
        user.chown(user.home)
        out = user.home / "images"
        # with the tree on disk (root's is in /dev/shm): its place must not change the image either
        p = user.mkmailimage("build", "debian", site / "site.yaml", "--out", out,
                             "--name", "a.test", "--raw", cache_dir=user_cache,
                             env={"MKMAILIMAGE_TREE_IN_MEMORY": "0"})
        assert p.returncode == 0, p.stdout + p.stderr
        assert "base layer: built" in p.stderr, p.stderr
        assert f"image tree in {user.home}" in p.stderr, p.stderr
        assert user.processes() == "", "the build left processes behind"
        raw = out / "a.test.raw"
        for f in out.iterdir():
            assert f.stat().st_uid == user.pw.pw_uid, f"{f} is not owned by the user who built it"
        manifest = json.loads((out / "a.test.manifest.json").read_text())
        assert manifest["inputs"]["base_layer"]["reused"] is False
        # root's image was booted and tested (test_build_debian); equal bytes mean every owner,
        # mode and file came out the same without root, from a fresh base layer, tree on disk
        if cache.sha256_file(raw) != cache.sha256_file(debian_image.outputs["raw"]):
            diff = subprocess.run([sys.executable, "-m", "builder.cli", "diff", str(raw),
                                   str(debian_image.outputs["raw"])], capture_output=True, text=True)
            pytest.fail("the unprivileged build differs from root's:\n" + diff.stdout[-4000:] + diff.stderr)
    finally:
        user.remove()
