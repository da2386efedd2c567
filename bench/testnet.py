"""Print how long the two-VM proof takes: image builds, boot + wiring of both peers, and the
time from "both VMs started" to "scenario 1 verified" (signed mail A -> B with dkim/spf/dmarc
pass). Target under TCG on 2 cores: <= 3 min for the latter.

    .venv/bin/python bench/testnet.py [WORKDIR]
"""
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from builder.machine import ssh_keypair  # noqa: E402
from builder.mailclient import auth_results, swaks, wait_for_message  # noqa: E402
from builder.testnet import TestNetwork, build_images  # noqa: E402


def bench_key(directory: Path) -> tuple[Path, str]:
    """The harness's SSH key; a reused WORKDIR keeps its key (its site files carry it)."""
    private = directory / "id_ed25519"
    if private.exists():
        return private, (directory / "id_ed25519.pub").read_text().strip()
    return ssh_keypair(directory)


def load() -> str:
    return "host load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="bench-testnet-"))
    key, public = bench_key(work / "ssh")
    t0 = time.monotonic()
    sites, images = build_images(work, public)
    print(f"build both images: {time.monotonic() - t0:.0f} s", flush=True)
    t1 = time.monotonic()
    with TestNetwork(sites, images, work / "run", key) as net:
        t2 = time.monotonic()
        print(f"boot + wire both peers (services and rspamd ready): {t2 - t1:.0f} s ({load()})",
              flush=True)
        subject = f"bench-{int(t2)}"
        r = swaks("127.0.0.1", net.a.port(587), sender=net.a.spec.email, to=net.b.spec.email,
                  tls="starttls", auth=(net.a.spec.email, net.a.spec.password),
                  headers={"Subject": subject})
        if not r.ok:
            print(r.transcript)
            return 1
        _, raw = wait_for_message(net.b.imap, subject)
        results = auth_results(raw)
        ok = all(results.get(k) == "pass" for k in ("dkim", "spf", "dmarc"))
        t3 = time.monotonic()
        print(f"submit on A -> verified in B's INBOX: {t3 - t2:.0f} s")
        print(f"both VMs started -> scenario 1 verified: {t3 - t1:.0f} s "
              f"({'pass' if ok else results}; target <= 180 s; {load()})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
