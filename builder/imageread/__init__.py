"""Read a disk image without booting or mounting it: partition table (sfdisk), ext4 through
e2fsprogs' debugfs, FAT through mtools. No root, no loop devices."""
