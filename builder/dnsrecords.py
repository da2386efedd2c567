"""The DNS records a site must publish, as zone-file text and as data for `--check` and test DNS."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .secrets import dkim_public_record
from .site import Site

TTL = 3600


@dataclass(frozen=True)
class Record:
    name: str           # fully qualified, with trailing dot
    rtype: str          # MX, A, AAAA, TXT, CAA, PTR
    value: str          # for TXT: the unsplit text; otherwise zone-file rdata
    comment: str = ""
    publish_at_provider: bool = False   # PTR: asked from the IP provider, not in the zone

    def rdata(self) -> str:
        if self.rtype == "TXT":
            return " ".join(f'"{chunk}"' for chunk in txt_chunks(self.value))
        return self.value

    def zone_line(self) -> str:
        line = f"{self.name:<40} {TTL} IN {self.rtype:<5} {self.rdata()}"
        return ("; " + line) if self.publish_at_provider else line


def txt_chunks(text: str, size: int = 255) -> list[str]:
    """TXT character-strings hold at most 255 bytes; long DKIM keys are split across several."""
    data = text.encode()
    return [data[i:i + size].decode() for i in range(0, len(data), size)] or [""]


def spf_value(site: Site) -> str:
    return "v=spf1 mx -all"


def dmarc_value(site: Site) -> str:
    m = site.model.dmarc
    return f"v=DMARC1; p={m.policy}; rua=mailto:{site.dmarc_report_address}; adkim=s; aspf=s"


def records(site: Site, ipv4: str | None = None, ipv6: str | None = None) -> list[Record]:
    """All records; `ipv4`/`ipv6` override the site's (the test network uses its own)."""
    d = site.domain + "."
    host = site.hostname + "."
    ipv4 = ipv4 or site.model.ipv4
    ipv6 = ipv6 or site.model.ipv6
    out = [Record(d, "MX", f"10 {host}")]
    if ipv4:
        out.append(Record(host, "A", ipv4))
    if ipv6:
        out.append(Record(host, "AAAA", ipv6))
    out.append(Record(d, "TXT", spf_value(site), "SPF: only the MX may send for the domain"))
    for selector, pem in site.dkim_keys.items():
        out.append(Record(f"{selector}._domainkey.{d}", "TXT", dkim_public_record(pem),
                          f"DKIM selector {selector}"))
    out.append(Record(f"_dmarc.{d}", "TXT", dmarc_value(site), "DMARC policy and report address"))
    if site.model.tls.mode == "acme":
        out.append(Record(d, "CAA", '0 issue "letsencrypt.org"', "only Let's Encrypt may issue"))
    else:
        out.append(Record(d, "CAA", '0 issue ";"', "self-signed TLS: no CA may issue (change for acme)"))
    for ip in (ipv4, ipv6):
        if ip:
            out.append(Record(ipaddress.ip_address(ip).reverse_pointer + ".", "PTR", host,
                              "reverse DNS: ask the VPS provider to set this", publish_at_provider=True))
    return out


def zone_snippet(site: Site) -> str:
    lines = [f"; DNS records for {site.domain} (mkmailimage dns)"]
    if not (site.model.ipv4 or site.model.ipv6):
        lines.append("; no ipv4/ipv6 in the site file: A/AAAA and PTR records are left out")
    report = site.dmarc_report_address
    if not report.endswith("@" + site.domain):
        other = report.rpartition("@")[2]
        lines.append(f"; DMARC reports go to {other}: it must publish "
                     f"{site.domain}._report._dmarc.{other}. TXT \"v=DMARC1\"")
    for r in records(site):
        if r.comment:
            lines.append(f"; {r.comment}")
        lines.append(r.zone_line())
    return "\n".join(lines) + "\n"


def check(site: Site, nameservers: list[str] | None = None, timeout: float = 5.0) -> list[tuple[Record, str, str]]:
    """Look each record up; returns (record, 'ok'|'missing'|'different', what was found)."""
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=not nameservers)
    if nameservers:
        parsed = [_server(n) for n in nameservers]
        resolver.nameservers = [ip for ip, _ in parsed]
        resolver.port = parsed[0][1]
    resolver.lifetime = timeout
    results = []
    for r in records(site):
        try:
            answer = resolver.resolve(r.name, r.rtype)
            found = [_normalise(r.rtype, rd) for rd in answer]
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            results.append((r, "missing", ""))
            continue
        except (dns.exception.DNSException, OSError) as e:
            results.append((r, "missing", f"lookup failed: {e.__class__.__name__}"))
            continue
        want = _normalise_text(r.rtype, r.value)
        state = "ok" if want in found else "different"
        results.append((r, state, "; ".join(found)))
    return results


def _normalise(rtype: str, rdata) -> str:
    if rtype == "TXT":
        return b"".join(rdata.strings).decode(errors="replace")
    return _normalise_text(rtype, rdata.to_text())


def _normalise_text(rtype: str, text: str) -> str:
    if rtype in ("MX", "PTR", "CNAME"):
        return text.lower().rstrip(".") + "."
    if rtype in ("A", "AAAA"):
        return str(ipaddress.ip_address(text))
    if rtype == "CAA":
        return text.replace('"', "").lower()
    return text


def _server(text: str) -> tuple[str, int]:
    """`1.2.3.4`, `1.2.3.4:5353`, `::1` or `[::1]:5353` -> (address, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return host, int(port or 53)
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53
