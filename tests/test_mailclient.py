"""The host-side mail clients the VM scenarios rely on (fast: no VM).

swaks only Recommends Perl's Net::SSLeay; without it every STARTTLS session fails at the client,
which once made all mail scenarios fail in CI for a reason that had nothing to do with the images.
"""
import pytest

from builder import mailclient
from builder.errors import ToolMissing


@pytest.fixture(autouse=True)
def fresh_probe():
    mailclient.swaks_supports_tls.cache_clear()
    yield
    mailclient.swaks_supports_tls.cache_clear()


def test_host_swaks_can_do_tls():
    """quickstart installs what swaks needs for STARTTLS and SMTPS."""
    assert mailclient.swaks_supports_tls()


def test_swaks_without_its_tls_module_is_named_before_sending(tmp_path, monkeypatch):
    # the real swaks, with a Net::SSLeay that cannot load shadowing the installed one
    (tmp_path / "Net").mkdir()
    (tmp_path / "Net" / "SSLeay.pm").write_text('die "hidden by the test\\n";\n')
    monkeypatch.setenv("PERL5LIB", str(tmp_path))
    with pytest.raises(ToolMissing, match="libnet-ssleay-perl"):
        mailclient.swaks("127.0.0.1", 9, sender="a@a.test", to="b@b.test", tls="starttls")
