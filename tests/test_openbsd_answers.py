"""install.conf against the OpenBSD installer's questions, matched with the installer's own rule.

`Responder` is a Python transcription of install.sub's `_autorespond` (rev 1.1292):
  - lines read with `read -r` (IFS blank: leading/trailing blanks dropped), kept only if they
    match `[!#=]*=?*`; key = text before the first '=' minus trailing blanks, value = text after
    it minus leading blanks;
  - the question and key are lower-cased (`typeset -l`); a line matches when
    `[[ $_q == @(|*[[:blank:]])"$_key"@([[:blank:]?]*|) ]]`;
  - the first matching line wins and is removed; no match: the default, or, without one,
    `Question has no answer in response file: "<question>"` and the install stops.
The question sequence comes from install.sub itself (tests/data/openbsd/*.tsv, revision noted).
"""
from __future__ import annotations

import atexit
import fnmatch
import os
import shutil
import tempfile
import re
from pathlib import Path

import pytest
import yaml

from builder.initsite import init_site
from builder.openbsd import answers, sets
from builder.site import load_site

DATA = Path(__file__).parent / "data" / "openbsd"
BASE_URL = "http://10.0.2.2:8123"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGr6Jz3m4hQ1Z0u6X2w8b5Qm0b2dC1s3k4Vq9yYxZ1Aa admin@laptop"
# Prompts where taking the installer's default is the intent (everything else must be answered).
INTENDED_DEFAULTS = {"DNS domain name? (e.g. 'example.com')"}


class NoAnswer(Exception):
    pass


class Responder:
    BLANKS = " \t"

    def __init__(self, text: str):
        self.lines = []
        for raw in text.splitlines():
            line = raw.strip(self.BLANKS)
            if not re.fullmatch(r"[^#=].*=.+", line, re.S):   # [[ $_l == [!#=]*=?* ]]
                continue
            self.lines.append(line)

    @staticmethod
    def split(line: str) -> tuple[str, str]:
        key, _, val = line.partition("=")
        return key.rstrip(Responder.BLANKS), val.lstrip(Responder.BLANKS)

    @staticmethod
    def matches(question: str, key: str) -> bool:
        q, k = question.lower(), key.lower()
        start = q.find(k)
        while start != -1:
            before_ok = start == 0 or q[start - 1] in Responder.BLANKS
            after = q[start + len(k):]
            if before_ok and (after == "" or after[0] in Responder.BLANKS + "?"):
                return True
            start = q.find(k, start + 1)
        return False

    def respond(self, question: str, default: str = "") -> tuple[str, bool]:
        """(answer, from_file). Raises NoAnswer like the installer's err_exit."""
        for i, line in enumerate(self.lines):
            key, val = self.split(line)
            if self.matches(question, key):
                del self.lines[i]
                return val, True
        if default:
            return default, False
        raise NoAnswer(f'Question has no answer in response file: "{question.lower()}"')


def load_questions(**fill) -> list[tuple[str, str, str, str]]:
    out = []
    for line in (DATA / "install-sub-1.1292-questions.tsv").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        how, question, default, when = line.split("\t")
        out.append((how, question.format(**fill), default.format(**fill), when))
    return out


def run_installer(conf: str, site, *, display=False, domain_asked=False):
    """Replay the question sequence; return [(question, answer, from_file)] and the leftovers."""
    admin = answers.admin_for(site)
    version = site.model.openbsd.version
    fill = dict(nic=answers.NIC, admin=admin.login if admin else "-",
                site_set=answers.site_set_name(version), version=version, domain=site.domain)
    active = {"always", "display" if display else "", "admin" if admin else "no-admin",
              "domain-asked" if domain_asked else ""}
    r = Responder(conf)
    log = []
    for how, question, default, when in load_questions(**fill):
        if when not in active:
            continue
        answer, from_file = r.respond(question, "" if how == "password" else default)
        log.append((question, answer, from_file))
    return log, r.lines


def intended(site, *, display=False, domain_asked=False) -> list[tuple[str, str]]:
    """What each asked question must get, written out independently of the template."""
    v = site.model.openbsd.version
    vv = sets.short_version(v)
    admin = bool(site.model.admin_ssh_keys)
    want = [
        ("Terminal type?", "vt220"),
        ("System hostname? (short form, e.g. 'foo')", site.hostname),
        ("Network interface to configure? (name, lladdr, '?', or 'done')", "vio0"),
        ("IPv4 address for vio0? (or 'autoconf' or 'none')", "autoconf"),
        ("IPv6 address for vio0? (or 'autoconf' or 'none')", "autoconf"),
        ("Network interface to configure? (name, lladdr, '?', or 'done')", "done"),
    ]
    if domain_asked:
        want.append(("DNS domain name? (e.g. 'example.com')", site.domain))
    want += [
        ("Password for root account?", "*************"),
        ("Public ssh key for root account?", "none"),
        ("Start sshd(8) by default?", "yes"),
    ]
    if display:
        want.append(("Do you expect to run the X Window System?", "no"))
    want += [("Change the default console to com0?", "yes"), ("Which speed should com0 use?", "115200")]
    if admin:
        want += [("Setup a user? (enter a lower-case loginname, or 'no')", "admin"),
                 ("Full name for user admin?", "Mail server administrator"),
                 ("Password for user admin?", "*************"),
                 ("Public ssh key for user admin", site.model.admin_ssh_keys[0])]
    else:
        want.append(("Setup a user? (enter a lower-case loginname, or 'no')", "no"))
    want += [
        ("Allow root ssh login? (yes, no, prohibit-password)", "prohibit-password"),
        ("Which disk is the root disk? ('?' for details)", "sd0"),
        ("Encrypt the root disk with a (p)assphrase or (k)eydisk?", "no"),
        ("Use (W)hole disk MBR, whole disk (G)PT or (E)dit?", "whole"),
        ("URL to autopartitioning template for disklabel?", f"{BASE_URL}/disklabel"),
        ("Location of sets? (disk http nfs or 'done')", "http"),
        ("HTTP proxy URL? (e.g. 'http://proxy:8080', or 'none')", "none"),
        ("HTTP Server? (hostname or 'done')", BASE_URL),
        ("Server directory?", f"pub/OpenBSD/{v}/amd64"),
        ("Set name(s)? (or 'abort' or 'done')", f"-x* -game* -comp* site{vv}.tgz done"),
        (f"Checksum test for site{vv}.tgz failed. Continue anyway?", "yes"),
        (f"Unverified sets: site{vv}.tgz. Continue without verification?", "yes"),
        ("Location of sets? (disk http nfs or 'done')", "done"),
        ("What timezone are you in? ('?' for list)", site.model.timezone),
    ]
    return want


_TEMPLATE: dict = {}


def make_site(tmp_path, keys=(KEY,), timezone="Europe/Berlin"):
    """A fresh copy of one generated site (DKIM key generation is slow), with keys/timezone set."""
    if "dir" not in _TEMPLATE:
        base = Path(tempfile.mkdtemp(prefix="obsd-answers-"))
        atexit.register(shutil.rmtree, base, True)
        init_site("a.test", base / "a", password="correct horse battery", out=open(os.devnull, "w"))
        _TEMPLATE["dir"] = base / "a"
    d = tmp_path / "a"
    shutil.copytree(_TEMPLATE["dir"], d)
    f = d / "site.yaml"
    data = yaml.safe_load(f.read_text())
    data["admin_ssh_keys"] = list(keys)
    data["timezone"] = timezone
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_site(f)


@pytest.mark.parametrize("with_key", [True, False], ids=["admin-key", "no-admin"])
@pytest.mark.parametrize("display", [False, True], ids=["serial-only", "vga"])
@pytest.mark.parametrize("domain_asked", [False, True], ids=["dhcp-domain", "domain-asked"])
def test_every_question_gets_the_intended_answer(tmp_path, with_key, display, domain_asked):
    site = make_site(tmp_path, keys=(KEY,) if with_key else ())
    conf = answers.render_install_conf(site, BASE_URL, display=display)
    log, leftover = run_installer(conf, site, display=display, domain_asked=domain_asked)
    assert [(q, a) for q, a, _ in log] == intended(site, display=display, domain_asked=domain_asked)
    accidental = [q for q, _, from_file in log if not from_file and q not in INTENDED_DEFAULTS]
    assert accidental == [], f"fell to the installer's default: {accidental}"
    assert leftover == [], f"answers never used: {leftover}"


def test_a_missing_answer_stops_the_install_like_the_installer(tmp_path):
    site = make_site(tmp_path)
    conf = answers.render_install_conf(site, BASE_URL)
    broken = "\n".join(l for l in conf.splitlines() if not l.startswith("Password for root"))
    with pytest.raises(NoAnswer, match='"password for root account\\?"'):
        run_installer(broken, site)


def test_site_set_answers_name_only_the_site_set(tmp_path):
    site = make_site(tmp_path)
    conf = answers.render_install_conf(site, BASE_URL)
    r = Responder(conf)
    # Base sets failing their checksum, or unverified together with the site set, fall to the
    # installer's default "no" and stop the install.
    for q in ["Checksum test for base78.tgz failed. Continue anyway?",
              "Checksum test for bsd.rd failed. Continue anyway?",
              "Fetching of site78.tgz failed. Continue anyway?",
              "Unverified sets: base78.tgz site78.tgz. Continue without verification?",
              "Unverified sets: site78.tgz bsd. Continue without verification?",
              "Signature check of SHA256.sig failed. Continue without verification?",
              "Directory does not contain SHA256.sig. Continue without verification?",
              "Cannot determine prefetch area. Continue without verification?"]:
        assert r.respond(q, "no") == ("no", False), q


def test_set_selection_installs_kernels_base_man_and_the_site_set(tmp_path):
    """select_sets() over the 7.8 amd64 file list: what the answer actually selects."""
    site = make_site(tmp_path)
    v = "78"
    allsets = ["bsd", "bsd.mp", "bsd.rd"] + [f"{s}{v}.tgz" for s in
                                             ("base", "comp", "man", "game", "xbase", "xshare", "xfont", "xserv")]
    available = allsets + [f"site{v}.tgz"]
    selected = list(allsets)                      # DEFAULTSETS with NCPU > 1
    answer = answers.set_selection(site.model.openbsd.version)
    for word in answer.split():                   # select_sets(): noglob, one word at a time
        if word in ("done", "abort"):
            break
        action_add = not word.startswith("-")
        pattern = word.lstrip("+-")
        pattern = "*" if pattern == "all" else pattern
        for f in available:
            if fnmatch.fnmatchcase(f, pattern):
                if action_add and f not in selected:
                    selected.append(f)
                elif not action_add and f in selected:
                    selected.remove(f)
    assert selected == ["bsd", "bsd.mp", "bsd.rd", f"base{v}.tgz", f"man{v}.tgz", f"site{v}.tgz"]
    served = set(sets.set_names("7.8"))
    assert set(selected) - {f"site{v}.tgz"} <= served and "BUILDINFO" in served


def test_unmatched_key_text_never_matches_mid_word():
    assert Responder.matches("Which disk is the root disk? ('?' for details)", "root disk")
    assert not Responder.matches("Password for root account?", "root acc")
    assert not Responder.matches("Unverified sets: site78.tgz. Continue?", "Unverified sets: site78.tgz")


def test_answers_refuse_blanks(tmp_path):
    site = make_site(tmp_path)
    from builder.errors import BuildError
    with pytest.raises(BuildError):
        answers.render_install_conf(site, "http://10.0.2.2:80 80")


def parse_autotable(text: str) -> list[tuple[str, int, float, int]]:
    """Python transcription of disklabel's parse_autotable()/parse_sizerange()/parse_pct()
    (sbin/disklabel/editor.c): every line "mountpoint size[-max] [pct]", no comments, no blank
    lines; min <= max; sum of percentages <= 100. Returns (mp, min MiB, max MiB, pct)."""
    units = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
    out, pctsum = [], 0
    for n, line in enumerate(text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"), 1):
        tokens = line.split()
        assert tokens and (tokens[0].startswith("/") or tokens[0].lower() in ("swap", "raid")), \
            f"parse error on line {n}: {line!r}"
        size = tokens[1]
        if size == "*":
            lo, hi = 0, float("inf")
        else:
            a, _, b = size.partition("-")
            m = re.fullmatch(r"([0-9.]+)([kKmMgGtT]?)", a)
            assert m, f"parse error on line {n}"
            unit = m[2] or (re.fullmatch(r"[0-9.]+([kKmMgGtT])", b)[1] if b and b != "*" else "")
            assert unit, f"parse error on line {n} (no unit)"
            lo = float(m[1]) * units[unit.lower()]
            if b == "*":
                hi = float("inf")
            elif b:
                mb = re.fullmatch(r"([0-9.]+)([kKmMgGtT])", b)
                assert mb, f"parse error on line {n}"
                hi = float(mb[1]) * units[mb[2].lower()]
            else:
                hi = lo
        pct = 0
        if len(tokens) > 2:
            pct = int(tokens[2].rstrip("%"))
            assert 0 <= pct <= 100
        assert lo <= hi, f"min size > max size on line {n}"
        assert len(tokens) <= 3
        pctsum += pct
        out.append((tokens[0], lo, hi, pct))
    assert pctsum <= 100, "sum of extra space allocation > 100%"
    return out


@pytest.mark.parametrize("gib", [4, 8, 20, 200])
def test_disklabel_template_parses_and_gives_var_the_rest(tmp_path, gib):
    site = make_site(tmp_path)
    site.model.openbsd.__dict__["disk_size"] = f"{gib}G"   # frozen model: test-only override
    table = parse_autotable(answers.render_disklabel(site))
    assert [t[0] for t in table] == ["/", "swap", "/tmp", "/usr", "/home", "/var"]
    var = table[-1]
    assert var[2] == float("inf") and var[3] == 100
    assert sum(t[1] for t in table) <= gib * 1024 - 32    # every minimum fits on the disk
    usr = dict((t[0], t) for t in table)["/usr"]
    assert usr[1] >= (3072 if gib >= 8 else 2304)   # base + packages + prefetched sets


def test_autotable_parser_rejects_what_disklabel_rejects():
    for bad in ["# comment\n/ 1G\n", "/ 1G\n\n", "/ 2G-1G\n", "/ 1G 60%\n/var 1G 50%\n", "var 1G\n"]:
        with pytest.raises(AssertionError):
            parse_autotable(bad)


def test_happy_transcript_echoes_exactly_what_install_conf_answers(tmp_path):
    """The driver's happy-path transcript (tests/data/openbsd/transcripts/happy.txt) and the
    rendered install.conf tell the same story: each question appears in the same order with
    the answer the matching rule gives (passwords are echoed as <provided>)."""
    from builder.openbsd import build
    site = make_site(tmp_path)
    conf = answers.render_install_conf(site, build.BASE_URL)
    log, leftover = run_installer(conf, site)
    assert leftover == []
    text = (DATA / "transcripts" / "happy.txt").read_text()
    lines = text.split("Performing non-interactive install...\n", 1)[1].splitlines()
    pos = 0
    for question, answer, _ in log:
        while not lines[pos].startswith(question):
            pos += 1
        rest = lines[pos][len(question):].strip()
        rest = re.sub(r"^(\(or 'done'\) )?\[[^\]]*\] ?", "", rest)
        expected = "<provided>" if question.startswith("Password for") else answer
        assert rest == expected, (question, rest, expected)
        pos += 1
