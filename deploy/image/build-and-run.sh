#!/usr/bin/env bash
# Build the CPU image (deploy/Dockerfile) with podman from a given base, run the image's filesystem
# as its own user (uid 10001) and classify a test image through it. Prints one line of figures.
#
#   deploy/image/build-and-run.sh [BASE]      from the repository root, as root (`make image`)
#
# BASE is passed to the Dockerfile as PYTHON_IMAGE; default localhost/lesionserve-base:bookworm,
# which deploy/image/debian-base.sh makes with debootstrap when it is not in podman's store yet
# (on this machine no registry of base images is reachable; with one, BASE=python:3.11-slim-bookworm).
#
# Why a chroot and not `podman run`: this sandbox refuses `podman run` (setrlimit in the OCI runtime).
# The chroot runs the same files, the image's Env, WorkingDir and Entrypoint, as the image's USER,
# with /proc, /dev and the model folder mounted in; what it does not reproduce: the container's own
# network and PID namespaces, cgroup limits, and a read-only root (the container's layer is writable).
#
# Environment: MODEL (default models/reference.onnx), IMAGE (tag, default localhost/lesionserve:cpu),
#   IMAGE_FILE (default tests/data/isic/nevus/ISIC_0000017.jpg), NO_CACHE=1 (build every layer again),
#   ISOLATION (podman build --isolation; default chroot, `oci` where the OCI runtime works),
#   BUILD_CA (CA bundle the RUN steps trust; default the host's, empty = the base's own).
set -euo pipefail

base=${1:-localhost/lesionserve-base:bookworm}
image=${IMAGE:-localhost/lesionserve:cpu}
model=${MODEL:-models/reference.onnx}
sample=${IMAGE_FILE:-tests/data/isic/nevus/ISIC_0000017.jpg}
here=$(cd "$(dirname "$0")" && pwd)

die() { echo "build-and-run.sh: $*" >&2; exit 2; }
for tool in podman curl chroot mount python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install -y podman curl)"
done
[[ $(id -u) == 0 ]] || die "run as root: mounting the image and chroot need it (rootless: podman unshare $0)"
[[ -f deploy/Dockerfile ]] || die "run from the repository root (deploy/Dockerfile not found)"
[[ -f $model ]] || die "model $model is missing (MODEL=path/to/model.onnx)"
[[ -f $sample ]] || die "test image $sample is missing"
# The CA bundle the build's RUN steps trust (see the build below); default: this machine's.
ca=${BUILD_CA-/etc/ssl/certs/ca-certificates.crt}
[[ -z $ca || -f $ca ]] || die "BUILD_CA $ca is not a file (BUILD_CA= uses the base's own bundle)"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }

# ---- the base: bootstrap ours only when it is not in the store; podman pulls any other -----------
base_s=-
if [[ $base == localhost/lesionserve-base:* ]] && ! podman image exists "$base"; then
    t0=$(now)
    "$here/debian-base.sh" "$base" >/dev/null
    base_s=$(secs "$t0" "$(now)")
fi

# ---- the build -----------------------------------------------------------------------------------
t0=$(now)
# --isolation chroot: RUN steps through buildah's chroot, not crun, which this sandbox refuses
# ("cgroups in hybrid mode not supported"). The steps see the host's network (pip reaches PyPI).
# The host's CA bundle over the base's, during RUN steps only (a build volume is never committed to a
# layer): this machine reaches PyPI through a TLS-intercepting proxy whose CA only the host trusts.
# BUILD_CA= (empty) keeps the base's own bundle.
# --format docker: the OCI image format has no HEALTHCHECK, and podman would drop the Dockerfile's.
podman build --format docker --isolation "${ISOLATION:-chroot}" ${NO_CACHE:+--no-cache} ${ca:+--volume "$ca:/etc/ssl/certs/ca-certificates.crt:ro"} --quiet -f deploy/Dockerfile --build-arg PYTHON_IMAGE="$base" -t "$image" . >/dev/null \
    || die "podman build of deploy/Dockerfile from $base failed (the failing step's output is above)"
build_s=$(secs "$t0" "$(now)")
size_mb=$(podman image inspect --format '{{.Size}}' "$image" | python3 -c "import sys; print(f'{int(sys.stdin.read()) / 1e6:.0f}')")

# ---- run the image's filesystem as its user ------------------------------------------------------
ctr=$(podman create "$image")
root=""
pid=""
cleanup() {
    [[ -n $pid ]] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    if [[ -n $root ]]; then
        for m in models dev proc; do umount -l "$root/$m" 2>/dev/null || true; done
    fi
    podman umount "$ctr" >/dev/null 2>&1 || true
    podman rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
root=$(podman mount "$ctr")
workdir=$(podman image inspect --format '{{.Config.WorkingDir}}' "$image")
# The workdir too: a container runtime creates it at start; buildah does not when no step used it.
mkdir -p "$root/models" "$root/proc" "$root/dev" "$root$workdir"
mount --bind "$(cd "$(dirname "$model")" && pwd)" "$root/models"
mount -o remount,bind,ro "$root/models"
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"

# The image's own settings, as `podman run` would set them (Env, User, WorkingDir, Entrypoint).
mapfile -t env < <(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$image" | sed '/^$/d')
user=$(podman image inspect --format '{{.Config.User}}' "$image")
mapfile -t entry < <(podman image inspect --format '{{range .Config.Entrypoint}}{{println .}}{{end}}' "$image" | sed '/^$/d')
port=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
log=$(mktemp /tmp/lesionserve-image.XXXXXX.log)
# Loopback and a free port: the chroot shares this machine's network (no namespace of its own).
# sh -c: cd to the image's WorkingDir inside the chroot, then exec the Entrypoint (single quotes on
# purpose: $1 and $@ are the inner shell's).
# shellcheck disable=SC2016
chroot --userspec="$user" "$root" /usr/bin/env -i "${env[@]}" HOME=/nonexistent \
    LESIONSERVE_HOST=127.0.0.1 LESIONSERVE_PORT="$port" LESIONSERVE_MODEL_PATH="/models/$(basename "$model")" \
    /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$workdir" "${entry[@]}" >"$log" 2>&1 &
pid=$!

t0=$(now)
deadline=$((SECONDS + 300))
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
    kill -0 "$pid" 2>/dev/null || die "the service exited before it was ready; its log: $log"
    ((SECONDS < deadline)) || die "not ready after 300 s; its log: $log"
    sleep 0.5
done
ready_s=$(secs "$t0" "$(now)")
# chroot, env and sh each exec the next: $pid is the Python process itself. Its real uid, as proof.
uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
answer=$(curl -sf -X POST -H 'Content-Type: image/jpeg' --data-binary @"$sample" "http://127.0.0.1:$port/v1/classify") \
    || die "classification failed; the service's log: $log"
echo "$answer"
echo "image=$image base=$base base_bootstrap_s=$base_s build_s=$build_s size_mb=$size_mb ready_s=$ready_s uid=$uid"
