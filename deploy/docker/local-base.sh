#!/usr/bin/env bash
# Makes a local base image for hosts that reach no container registry but do reach a Debian package
# mirror: Debian 12 (bookworm) minbase with the release's python3 (3.11) and venv, built with
# debootstrap and imported into the container engine. Build the CPU image on it with
#   --build-arg BASE=localhost/pdmesh-base:bookworm
#
# usage: deploy/docker/local-base.sh [TAG]           (root; needs debootstrap and podman or docker)
# env:   ENGINE=podman|docker (default: podman if installed), DEBIAN_MIRROR (default: debootstrap's),
#        REBUILD=1 makes it again even if TAG exists.
set -euo pipefail
TAG=${1:-localhost/pdmesh-base:bookworm}
SUITE=bookworm
ENGINE=${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}

die() { echo "local-base.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
command -v "$ENGINE" >/dev/null || die "$ENGINE is not installed"

if [ "${REBUILD:-0}" != 1 ] && "$ENGINE" image inspect "$TAG" >/dev/null 2>&1; then
    echo "local-base.sh: $TAG exists (REBUILD=1 to make it again)"
    exit 0
fi

root=$(mktemp -d /var/tmp/pdmesh-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
# minbase: apt, dpkg, bash, coreutils, passwd (useradd); python3-venv brings ensurepip's wheels.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$root" ${DEBIAN_MIRROR:+"$DEBIAN_MIRROR"} >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; rm -f "$root.log"; die "debootstrap failed"; }
rm -f "$root.log"
# What a slim image leaves out: apt's lists and downloaded packages, docs, man pages, locales.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/locale/* "$root"/var/log/*.log
tar -C "$root" --numeric-owner -c . | "$ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' - "$TAG" >/dev/null 2>&1
version=$("$ENGINE" run --rm --network none "$TAG" python3 -c 'import venv, ssl, sys; print(sys.version.split()[0])') \
    || die "$TAG was made but does not run python3 (podman here: export CONTAINERS_CONF=deploy/podman/containers.conf)"
echo "local-base.sh: made $TAG (Python $version)"
