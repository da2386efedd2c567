"""`mkmailimage manifest` / `diff` on small real ext4 and FAT images made with mke2fs -d, mkfs.vfat,
mtools and sfdisk, changed afterwards with `debugfs -w` (no mounts, no root)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from builder import manifest as mf
from builder.cli import main
from builder.errors import BuildError

UUID_A = "0a0a0a0a-1111-4222-8333-444444444444"
UUID_B = "0b0b0b0b-1111-4222-8333-444444444444"
KEY = b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"

pytestmark = pytest.mark.skipif(not shutil.which("debugfs", path="/usr/sbin:/sbin:" + os.environ["PATH"]),
                                reason="e2fsprogs missing")


def make_tree(root: Path) -> Path:
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nvmail:x:5000:5000::/var/vmail:/usr/sbin/nologin\n")
    (root / "etc/group").write_text("root:x:0:\nvmail:x:5000:\n")
    (root / "etc/hostname").write_text("mx\n")
    (root / "etc/ssh/sshd_config").write_text("PermitRootLogin no\n")
    (root / "usr/bin").mkdir(parents=True)
    big = root / "usr/bin/big"
    big.write_bytes(os.urandom(3 * 1024 * 1024 + 17))       # several extents, read in chunks
    big.chmod(0o4755)
    os.link(big, root / "usr/bin/big-again")
    (root / "usr/bin/sh").symlink_to("dash")
    (root / "usr/lib").mkdir()
    (root / "usr/lib/long").symlink_to("x" * 100)             # a slow symlink: target in a block
    os.mkfifo(root / "usr/lib/fifo")
    (root / "var/lib/rspamd/dkim").mkdir(parents=True)
    (root / "srv").mkdir()
    (root / "srv/secret").write_text("no\n")
    (root / "srv/secret").chmod(0)
    os.setxattr(root / "usr/bin/big", "user.mkmailimage", b"cap")
    for p in [root, *root.rglob("*")]:
        os.utime(p, (1700000000, 1700000000), follow_symlinks=False)
    return root


def mkext4(image: Path, tree: Path, uuid: str = UUID_A, size: str = "32M", offset: int = 0) -> Path:
    if not image.exists():
        subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), "-U", uuid, "-E",
                    f"hash_seed={uuid},offset={offset}", str(image), "24M" if offset else size],
                   check=True, env=dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000"))
    return image


def debugfs_w(image: Path, *commands: str) -> None:
    out = subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(commands) + "\n",
                         capture_output=True, text=True, check=True)
    assert "rror" not in out.stderr, out.stderr


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().out


def by_path(m: dict) -> dict:
    return {e["path"]: e for e in m["files"]}


def test_manifest_lists_every_file_with_its_metadata(tmp_path, capsys):
    img = mkext4(tmp_path / "a.raw", make_tree(tmp_path / "tree"))
    rc, out = run_cli(capsys, "manifest", str(img))
    assert rc == 0
    m = json.loads(out)
    files = by_path(m)
    tree = tmp_path / "tree"
    expected = {"/" + str(p.relative_to(tree)) for p in tree.rglob("*")} | {"/", "/lost+found"}
    assert set(files) == expected
    big = files["/usr/bin/big"]
    assert big["type"] == "file" and big["mode"] == "4755" and big["size"] == 3 * 1024 * 1024 + 17
    assert big["sha256"] == mf.diskread.sha256_file(tree / "usr/bin/big")
    assert big["xattrs"] == {"user.mkmailimage": '"cap"'} or "user.mkmailimage" in big["xattrs"]
    assert big["mtime"] == 1700000000
    assert files["/usr/bin/big-again"]["hardlink"] == "/usr/bin/big"
    assert files["/usr/bin/sh"] == {**files["/usr/bin/sh"], "type": "symlink", "target": "dash"}
    assert files["/usr/lib/long"]["target"] == "x" * 100
    assert files["/usr/lib/fifo"]["type"] == "fifo"
    assert files["/srv/secret"]["mode"] == "0000"
    assert files["/srv/secret"]["sha256"] == mf.diskread.sha256_file(tree / "srv/secret")
    assert files["/etc"]["type"] == "dir" and files["/etc"]["owner"] == "root:root"
    # the output is stable: the same image gives the same bytes; paths are sorted
    assert mf.dumps(mf.make_manifest(img)) == out
    assert [e["path"] for e in m["files"]] == sorted(files)
    assert m["disk"]["partitions"][0]["filesystem"]["UUID"] == UUID_A
    assert m["disk"]["partitions"][0]["superblock"]["Directory Hash Seed"] == UUID_A


def test_qcow2_gives_the_manifest_of_its_raw(tmp_path):
    img = mkext4(tmp_path / "a.raw", make_tree(tmp_path / "tree"))
    qcow = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(img), str(qcow)], check=True)
    a, b = mf.make_manifest(img), mf.make_manifest(qcow)
    assert a["files"] == b["files"] and a["disk"] == b["disk"]
    assert b["image"]["format"] == "qcow2" and b["image"]["raw_sha256"] == a["image"]["sha256"]
    assert mf.diff(a, b) == []


def test_diff_prints_files_then_metadata_sorted(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    a = mkext4(tmp_path / "a.raw", tree)
    (tree / "etc/hostname").write_text("other\n")
    (tree / "etc/new").write_text("added\n")
    (tree / "etc/ssh/sshd_config").unlink()
    for p in (tree / "etc", tree / "etc/ssh", tree / "etc/hostname", tree / "etc/new"):
        os.utime(p, (1700000000, 1700000000))
    b = mkext4(tmp_path / "b.raw", tree)
    debugfs_w(b, "sif /srv/secret mode 0100600", "sif /srv/secret uid 5000", "sif /srv/secret gid 5000",
              "sif /etc/passwd mtime 1800000000")
    rc, out = run_cli(capsys, "diff", str(a), str(b))
    assert rc == 1
    lines = out.splitlines()
    assert lines[0] == "files:"
    files = lines[1:lines.index("metadata:")]
    assert [l.split()[:2] for l in files] == [["~", "/etc/hostname"], ["+", "/etc/new"],
                                                ["-", "/etc/ssh/sshd_config"]]
    assert "size 3 -> 6" in files[0]
    meta = lines[lines.index("metadata:") + 1:lines.index("timestamps:")]
    assert "  ~ /srv/secret  mode 0000 -> 0600" in meta
    assert "  ~ /srv/secret  owner root:root -> vmail:vmail" in meta
    assert lines[lines.index("timestamps:") + 1] == "  ~ /etc/passwd (1700000000 -> 1800000000)  mtime"
    assert lines[-1].startswith("summary: 1 added, 1 removed, 1 changed, ")


def test_diff_explains_disk_level_differences_and_reads_manifest_files(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    a = mkext4(tmp_path / "a.raw", tree, UUID_A)
    b = mkext4(tmp_path / "b.raw", tree, UUID_B)
    ma, mb = tmp_path / "a.json", tmp_path / "b.json"
    ma.write_text(mf.dumps(mf.make_manifest(a)))
    mb.write_text(mf.dumps(mf.make_manifest(b)))
    rc, out = run_cli(capsys, "diff", str(ma), str(mb))
    assert rc == 1
    assert "files:" not in out and "metadata:" not in out      # no file differs ...
    assert "disk:" in out                                       # ... the filesystem ids do
    assert f"  ~ partitions[0].filesystem.UUID: {UUID_A} -> {UUID_B}" in out.splitlines()
    assert f"  ~ partitions[0].superblock.Directory Hash Seed: {UUID_A} -> {UUID_B}" in out.splitlines()
    rc, out = run_cli(capsys, "diff", str(a), str(ma))
    assert rc == 0 and out.startswith("no differences")


def test_esp_files_appear_under_their_fstab_mount_point(tmp_path):
    if not shutil.which("mkfs.vfat", path="/usr/sbin:/sbin:" + os.environ["PATH"]) or not shutil.which("mcopy"):
        pytest.skip("dosfstools/mtools missing")
    disk = tmp_path / "disk.raw"
    subprocess.run(["truncate", "-s", "40M", str(disk)], check=True)
    subprocess.run(["sfdisk", "-q", str(disk)], input="label: gpt\nstart=2048, size=16384, type=uefi\n"
                   "start=18432, type=linux\n", text=True, check=True)
    esp = tmp_path / "esp.img"
    subprocess.run(["mkfs.vfat", "-i", "12345678", "-C", str(esp), "8192"], check=True, capture_output=True)
    efi = tmp_path / "BOOTX64.EFI"
    efi.write_bytes(b"MZ" + bytes(100))
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    subprocess.run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"], check=True, env=env)
    subprocess.run(["mcopy", "-i", str(esp), str(efi), "::/EFI/BOOT/BOOTX64.EFI"], check=True, env=env)
    subprocess.run(["dd", f"if={esp}", f"of={disk}", "bs=512", "seek=2048", "conv=notrunc", "status=none"], check=True)
    tree = make_tree(tmp_path / "tree")
    (tree / "boot/efi").mkdir(parents=True)
    (tree / "etc/fstab").write_text("UUID=1234-5678 /boot/efi vfat umask=0077 0 1\n")
    mkext4(disk, tree, offset=18432 * 512)
    m = mf.make_manifest(disk)
    files = by_path(m)
    assert files["/boot/efi/EFI/BOOT/BOOTX64.EFI"]["sha256"] == mf.diskread.sha256_file(efi)
    assert files["/boot/efi"]["mode"] == "0755"                 # the mount point dir of the root fs
    assert [p["mount"] for p in m["disk"]["partitions"]] == ["/boot/efi", "/"]
    assert m["disk"]["table"]["label"] == "gpt"


def test_private_keys_in_the_image_are_stated(tmp_path):
    tree = make_tree(tmp_path / "tree")
    (tree / "var/lib/rspamd/dkim/mail.key").write_bytes(KEY)
    (tree / "etc/ssh/ssh_host_ed25519_key").write_bytes(b"x" * 70000 + KEY)  # marker past the first chunk
    (tree / "usr/bin/ssh").write_bytes(b"\x7fELF\x00-----BEGIN OPENSSH PRIVATE KEY-----\n\x00%s\x00")  # a constant
    (tree / "srv/ed25519.key").write_bytes(b"key in another format, not under dkim/")
    (tree / "var/lib/rspamd/dkim/other.key").write_bytes(b"c2VjcmV0IGtleSBub3QgUEVN\n")   # rspamd's own format
    m = mf.make_manifest(mkext4(tmp_path / "a.raw", tree))
    assert m["secrets"]["private_keys"] == [{"kind": "ssh-host", "path": "/etc/ssh/ssh_host_ed25519_key"},
                                            {"kind": "dkim", "path": "/var/lib/rspamd/dkim/mail.key"},
                                            {"kind": "dkim", "path": "/var/lib/rspamd/dkim/other.key"}]
    assert m["secrets"]["dkim_private_key"] and m["secrets"]["ssh_host_keys"]
    assert not m["secrets"]["tls_private_key"]


def test_bad_inputs_are_named(tmp_path, capsys):
    rc = main(["diff", str(tmp_path / "missing.qcow2"), str(tmp_path / "x")])
    assert rc != 0 and "missing.qcow2: no such image or manifest" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(BuildError, match="bad.json: not a file manifest"):
        mf.load(bad)
    bad.write_text('{"format": \n')
    with pytest.raises(BuildError, match=r"bad.json:2:1: not a valid manifest"):
        mf.load(bad)


@pytest.mark.vm
def test_guest_manifest_lists_a_booted_guests_files_over_ssh(tiny_guest, tmp_path, ssh_key):
    """The path for file systems the host cannot read (OpenBSD FFS): the guest's own tar over SSH.
    Checked on the tiny busybox guest against files made in it, and against an image manifest."""
    from builder.machine import Machine
    from builder.qemu import Qemu
    key, public = ssh_key
    spec = tiny_guest.ssh_spec(public, "manifest")
    with Qemu(spec, tmp_path) as vm, Machine(vm, key=key) as m:
        m.wait_for_ssh(timeout=180)
        m.succeed("mkdir -p /srv/t/sub && cd /srv/t && printf 'hello\\n' > a && chmod 4751 a && ln a hard "
                  "&& ln -s sub/../a link && printf '%s' '" + KEY.decode() + "' > sub/host.pem "
                  "&& chown 5000:5000 sub && touch -d '2020-01-02 03:04:05' a")
        g = mf.guest_manifest(m, ["/srv/t"])
    files = by_path(g)
    assert set(files) == {"/srv/t", "/srv/t/a", "/srv/t/hard", "/srv/t/link", "/srv/t/sub", "/srv/t/sub/host.pem"}
    a = files["/srv/t/a"]
    assert (a["type"], a["mode"], a["size"], a["uid"]) == ("file", "4751", 6, 0)
    assert a["sha256"] == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"   # "hello\n"
    assert a["mtime"] == 1577934245
    assert files["/srv/t/hard"]["sha256"] == a["sha256"]      # busybox tar stores hard links in full
    assert files["/srv/t/link"]["target"] == "sub/../a"
    assert (files["/srv/t/sub"]["uid"], files["/srv/t/sub"]["gid"]) == (5000, 5000)
    assert g["secrets"]["private_keys"] == [{"kind": "tls", "path": "/srv/t/sub/host.pem"}]
    # the same tree as an ext4 image: diff compares only what tar records, so nothing differs
    tree = tmp_path / "tree" / "srv" / "t"
    (tree / "sub").mkdir(parents=True)
    (tmp_path / "tree/etc").mkdir()
    (tmp_path / "tree/etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")   # owners get names
    (tmp_path / "tree/etc/group").write_text("root:x:0:\n")
    (tree / "a").write_text("hello\n")
    (tree / "a").chmod(0o4751)
    os.link(tree / "a", tree / "hard")
    (tree / "link").symlink_to("sub/../a")
    (tree / "sub/host.pem").write_bytes(KEY)
    os.chown(tree / "sub", 5000, 5000) if os.geteuid() == 0 else pytest.skip("chown needs root")
    for p in [*tree.rglob("*"), tree]:
        os.utime(p, (files["/" + str(p.relative_to(tmp_path / "tree"))]["mtime"],) * 2, follow_symlinks=False)
    image = mf.make_manifest(mkext4(tmp_path / "t.raw", tmp_path / "tree"))
    image["files"] = [e for e in image["files"] if e["path"].startswith("/srv/t")]
    assert mf.diff(image, g) == [], "\n".join(mf.diff(image, g))


def test_unexplained_differences_of_installer_builds(tmp_path):
    """OpenBSD/preseed builds differ in documented places only; anything else is reported."""
    tree = make_tree(tmp_path / "tree")
    (tree / "etc/random.seed").write_bytes(b"1")
    a = mf.make_manifest(mkext4(tmp_path / "a.raw", tree))
    (tree / "etc/random.seed").write_bytes(b"2")               # documented: differs per install
    (tree / "etc/ssh/ssh_host_ed25519_key").write_bytes(KEY)   # documented: made at first boot
    b_same = mf.make_manifest(mkext4(tmp_path / "b.raw", tree, UUID_B))
    assert mf.unexplained(a, b_same, "openbsd") == []          # ids, timestamps and documented files only
    (tree / "etc/hostname").write_text("elsewhere\n")          # not documented: must be reported
    b = mf.make_manifest(mkext4(tmp_path / "c.raw", tree, UUID_B))
    assert [l.split()[:2] for l in mf.unexplained(a, b, "openbsd")] == [["~", "/etc/hostname"]]
    assert [l.split()[1] for l in mf.unexplained(a, b, "preseed")] == ["/etc/hostname", "/etc/random.seed"]


def test_diff_locates_bytes_no_manifest_field_shows(tmp_path, capsys):
    """An inode's generation number is in no manifest field: diff finds the block and names it."""
    tree = make_tree(tmp_path / "tree")
    a = mkext4(tmp_path / "a.raw", tree)
    b = tmp_path / "b.raw"
    shutil.copyfile(a, b)
    debugfs_w(b, "sif /etc/hostname generation 7")
    rc, out = run_cli(capsys, "diff", str(a), str(b))
    assert rc == 1
    lines = out.splitlines()
    assert "files:" not in lines and "metadata:" not in lines and "bytes:" in lines
    located = lines[lines.index("bytes:") + 1]
    assert "partition 0: ext4 blocks" in located and "inode table of group 0" in located
    assert "/etc/hostname" in located
