#!/bin/sh
# mkmailimage, inside the installed system (in-target, run by late.sh): the same layering the
# bootstrap installer does on its tree (builder/debian/layer.py), from data files the builder
# wrote: accounts, the site overlay with owners and modes, units, no build-time state.
set -eu
D=/tmp/mkmailimage
TAR=$D-overlay.tar
exec >>$D-late.log 2>&1     # late.sh shows this log on the console if we fail

step() { echo "late-target: $*"; }

step "accounts"
while read -r kind a b c d; do
	case "$kind" in
	group)  getent group "$a" >/dev/null || groupadd --system "$a" ;;
	user)   getent passwd "$a" >/dev/null ||
		useradd --system --gid "$b" --home-dir "$c" --shell "$d" --no-create-home "$a"
		if [ "$c" != /nonexistent ] && [ ! -d "$c" ]; then
			install -d -m 0750 -o "$a" -g "$b" "$c"
		fi ;;
	member) usermod --append --groups "$a" "$b" ;;
	esac
done <"$D-accounts.txt"

step "apt sources: the image's own, not the build's"
rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*
rm -rf /var/lib/apt/lists/*_*

step "overlay"
# GNU tar as root maps owner names to this system's ids; existing directories keep theirs.
tar --extract --file "$TAR" --directory / --same-owner --same-permissions --no-overwrite-dir
while read -r mode owner group path; do
	[ "$owner" = root ] && [ "$group" = root ] && continue
	chown "$owner:$group" "$path"
	chmod "$mode" "$path"
done <"$D-owners.txt"

step "units"
systemctl enable $(cat "$D-units.txt")
# networking is systemd-networkd's (the overlay's .network file), not ifupdown's
systemctl disable networking.service 2>/dev/null || true

step "per-instance state, made again at first boot"
while read -r pattern; do
	for f in /$pattern; do
		if [ -f "$f" ] || [ -L "$f" ]; then rm -f "$f"; fi
	done
done <"$D-instance-files.txt"
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id

step "the installer's temporary user"
user=$(cat "$D-install-user.txt")
if getent passwd "$user" >/dev/null; then
	userdel --remove "$user" 2>/dev/null || userdel "$user"
fi
rm -f "/etc/sudoers.d/$user"

step "GRUB on the serial console as well as the screen"
if [ -f /etc/default/grub ]; then
	sed -i -e '/^#\?GRUB_TERMINAL=/d' -e '/^GRUB_SERIAL_COMMAND=/d' /etc/default/grub
	printf '%s\n' 'GRUB_TERMINAL="console serial"' \
		'GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"' >>/etc/default/grub
	update-grub
fi
step "done"
