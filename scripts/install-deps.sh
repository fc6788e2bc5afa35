#!/usr/bin/env bash
# Installs what building and testing tidemark needs on a fresh Debian
# machine, as root. Safe to run again: installs only what is missing.
set -euo pipefail

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v losetup >/dev/null || need+=(util-linux)
command -v cmp >/dev/null || need+=(diffutils)
command -v bc >/dev/null || need+=(bc)
command -v fsck.ext4 >/dev/null || need+=(e2fsprogs)
# Power-cut tests copy volumes instantly with reflinks on XFS.
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v fstrim >/dev/null || need+=(util-linux)
# A partitioned disk's test writes its table with sfdisk.
command -v sfdisk >/dev/null || need+=(fdisk)
command -v vmdkinfo >/dev/null || need+=(libvmdk-utils)
command -v vhdiinfo >/dev/null || need+=(libvhdi-utils)
command -v 7zz >/dev/null || need+=(7zip)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "install-deps: cargo is missing; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
if command -v rustup >/dev/null; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
fi
