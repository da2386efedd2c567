"""The `mkmailimage` command line. Each subcommand's work lives in its own module, imported lazily
so that `mkmailimage dns` does not pay for QEMU or paramiko imports."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .errors import MkMailImageError


def _handler(spec: str):
    def run(args):
        module, func = spec.split(":")
        return getattr(importlib.import_module(f"builder.{module}"), func)(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mkmailimage",
        description="Build reproducible OpenSMTPD + Dovecot + Rspamd mail-server images for Debian and OpenBSD.")
    p.add_argument("-v", "--verbose", action="store_true", help="stream the serial console and tool output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a site file and DKIM keys for DOMAIN")
    s.add_argument("domain", metavar="DOMAIN")
    s.add_argument("--dir", type=Path, help="directory for site.yaml and secrets/ (default: ./DOMAIN)")
    s.add_argument("--user", default="admin", help="first mailbox user (default: admin)")
    s.add_argument("--ed25519", action="store_true", help="add an ed25519 DKIM selector beside RSA")
    s.add_argument("--password-stdin", action="store_true",
                   help="read the first user's password from stdin instead of generating one")
    s.set_defaults(func=_handler("commands:cmd_init"))

    s = sub.add_parser("passwd", help="add a mailbox user or change its password (bcrypt hash only)")
    s.add_argument("site", type=Path, metavar="SITE")
    s.add_argument("user", metavar="USER")
    s.add_argument("--stdin", action="store_true", help="read the password from stdin (one line)")
    s.set_defaults(func=_handler("commands:cmd_passwd"))

    s = sub.add_parser("render", help="render the configuration tree for an OS and check it")
    s.add_argument("site", type=Path, metavar="SITE")
    s.add_argument("--os", choices=["debian", "openbsd"], required=True)
    s.add_argument("--out", type=Path, required=True, help="output directory (must not exist or be empty)")
    s.add_argument("--check", action="store_true",
                   help="run the real daemons' config checkers on the result (needs root; builds a tools tree)")
    s.set_defaults(func=_handler("commands:cmd_render"))

    s = sub.add_parser("dns", help="print the DNS records to publish for SITE")
    s.add_argument("site", type=Path, metavar="SITE")
    s.add_argument("--check", action="store_true", help="look the records up and report ok/missing/different")
    s.add_argument("--nameserver", action="append", metavar="IP[:PORT]", help="ask this server instead of the system resolver")
    s.set_defaults(func=_handler("commands:cmd_dns"))

    s = sub.add_parser("build", help="build a bootable disk image")
    s.add_argument("os", choices=["debian", "openbsd"])
    s.add_argument("site", type=Path, metavar="SITE")
    s.add_argument("--name", help="image name (default: the site's domain)")
    s.add_argument("--out", type=Path, help="output directory (default: images/)")
    s.add_argument("--raw", action="store_true", help="also keep NAME.raw")
    s.add_argument("--installer", choices=["bootstrap", "preseed"], help="override debian.installer")
    s.add_argument("--no-cache", action="store_true", help="rebuild every cached layer and download")
    s.add_argument("--locked", action="store_true", help="use exactly the inputs in SITE's lock file")
    s.add_argument("--boot-check", action="store_true",
                   help="boot the new image once (throw-away overlay) and wait for the mail ports")
    s.set_defaults(func=_handler("build:cmd_build"))

    s = sub.add_parser("test", help="boot two images on a private network and prove they exchange signed mail")
    s.add_argument("--os", choices=["debian", "openbsd"], default="debian")
    s.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    s.set_defaults(func=_handler("testnet:cmd_test"))

    s = sub.add_parser("lock", help="write SITE's lock file: exact package versions, hashes, epoch, seeds")
    s.add_argument("site", type=Path, metavar="SITE")
    s.add_argument("--from-image", type=Path, metavar="IMAGE",
                   help="lock what IMAGE was built with (its packages and its NAME.manifest.json)")
    s.set_defaults(func=_handler("lock:cmd_lock"))

    s = sub.add_parser("manifest", help="list every file in an image (path, type, mode, owner, size, sha256)")
    s.add_argument("image", type=Path, metavar="IMAGE")
    s.set_defaults(func=_handler("manifest:cmd_manifest"))

    s = sub.add_parser("diff", help="show how two images differ, files first, then metadata")
    s.add_argument("a", type=Path, metavar="A")
    s.add_argument("b", type=Path, metavar="B")
    s.set_defaults(func=_handler("manifest:cmd_diff"))

    s = sub.add_parser("export", help="convert an image to a provider's format, with its sha256")
    s.add_argument("image", type=Path, metavar="IMAGE")
    s.add_argument("--format", required=True, choices=["qcow2", "raw", "raw.gz", "raw.zst", "raw.xz", "vmdk", "vhdx"])
    s.add_argument("--out", type=Path, help="output file (default: beside IMAGE)")
    s.set_defaults(func=_handler("export:cmd_export"))

    s = sub.add_parser("upload", help="write an image to a rescue system's disk over SSH and verify it")
    s.add_argument("image", type=Path, metavar="IMAGE")
    s.add_argument("--ssh", required=True, metavar="USER@HOST[:PORT]")
    s.add_argument("--disk", required=True, metavar="/dev/sdX")
    s.add_argument("--identity", type=Path, help="SSH private key file")
    s.add_argument("--accept-host-key", metavar="SHA256:FINGERPRINT",
                   help="trust this unknown host key (as shown by the refusal)")
    s.add_argument("--yes", action="store_true", help="skip the confirmation prompt (never the safety checks)")
    s.set_defaults(func=_handler("upload:cmd_upload"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # to run again in a user namespace
    try:
        return args.func(args) or 0
    except MkMailImageError as e:
        print(f"mkmailimage: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("mkmailimage: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
