#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, made with debootstrap and imported into podman's
# store, for machines where no registry of base images is reachable (only a Debian mirror).
# deploy/Dockerfile builds FROM it when build-and-run.sh passes it as PYTHON_IMAGE; anywhere a
# registry is reachable, the Dockerfile's default (python:3.11-slim-bookworm) needs none of this.
#
#   deploy/image/debian-base.sh [TAG]        (root; default TAG localhost/lesionserve-base:bookworm)
#   DEBIAN_MIRROR=http://deb.debian.org/debian  the mirror debootstrap reads
set -euo pipefail

tag=${1:-localhost/lesionserve-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

die() { echo "debian-base.sh: $*" >&2; exit 2; }
for tool in debootstrap podman tar; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install -y debootstrap podman)"
done
[[ $(id -u) == 0 ]] || die "debootstrap needs root (it makes device nodes and chroots)"

rootfs=$(mktemp -d /var/tmp/lesionserve-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

# minbase: essential packages + apt only. python-is-python3 gives the `python` the Dockerfile
# calls; python3-venv the `python -m venv`; ca-certificates lets pip verify PyPI.
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || die "debootstrap failed ($mirror); its log: $rootfs.log"
rm -f "$rootfs.log"
# What a slim base leaves out too: package lists and downloaded .debs (the image never runs apt).
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
tar --numeric-owner -C "$rootfs" -c . | podman import --quiet - "$tag" >/dev/null
echo "$tag"
