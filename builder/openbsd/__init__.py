"""The OpenBSD image path: verified sets, the autoinstall answer file, the site set and the
pexpect driver for the installer on the serial console. `build.build_openbsd` ties them together."""
