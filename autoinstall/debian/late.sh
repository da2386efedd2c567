#!/bin/sh
# mkmailimage late command, run by debian-installer (busybox sh) before it finishes:
# fetches the site overlay from the builder's HTTP server ($1) and lays it into /target.
# Progress and failures go to the serial console, where the builder is watching, and to a
# status URL the builder's server logs (a missing file there is the message, not an error).
BASE="$1"
LOG=/target/tmp/mkmailimage-late.log

say() {
	echo "mkmailimage-late: $*" >/dev/console 2>/dev/null || true
	logger -t mkmailimage-late "$*" 2>/dev/null || true
}

fail() {
	say "FAILED: $*"
	[ -f "$LOG" ] && sed 's/^/mkmailimage-late:   /' "$LOG" >/dev/console 2>/dev/null
	wget -q -O /dev/null "$BASE/status/late-failed/$2" 2>/dev/null || true
	exit 1
}

say "fetching the site overlay"
for f in overlay.tar owners.txt accounts.txt units.txt instance-files.txt install-user.txt late-target.sh; do
	wget -q -O "/target/tmp/mkmailimage-$f" "$BASE/$f" || fail "download of $BASE/$f failed" "download-$f"
done

say "laying the overlay into /target"
in-target sh /tmp/mkmailimage-late-target.sh || fail "late-target.sh failed" late-target
rm -f /target/tmp/mkmailimage-*

# The installer would copy its logs and debconf database (which name the build's mirror and
# network) into /target/var/log/installer after us: keep them out of the image.
chmod -x /usr/lib/finish-install.d/94save-logs 2>/dev/null || true

say "overlay in place"
wget -q -O /dev/null "$BASE/status/late-ok" || true
