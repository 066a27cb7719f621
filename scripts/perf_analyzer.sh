#!/usr/bin/env bash
# Run Triton's perf_analyzer (PyPI package `perf-analyzer`) against a local server.
#
#   scripts/perf_analyzer.sh [perf_analyzer args...]
#   scripts/perf_analyzer.sh -m simple -i grpc -u 127.0.0.1:8001 --concurrency-range 4
#
# The perf_analyzer binary in the perf-analyzer wheel is built against glibc 2.38
# (manylinux_2_38), newer than this machine's Debian 12 (glibc 2.36), so it runs inside a
# Debian 13 (trixie) minbase chroot kept under .cache/perf-chroot in the repo root
# (git-ignored). The first call builds that chroot (debootstrap + python3-venv + a venv
# holding perf-analyzer); later calls reuse it (marker file .perf-analyzer-ready inside it).
#
# Each call runs in its own private mount namespace (unshare --mount): /dev (with /dev/shm,
# so --shared-memory system works against a host server), /proc, /sys, the host /tmp and
# the current directory are bind-mounted into the chroot at the same paths, so relative
# and /tmp paths given to perf_analyzer (-f out.csv, --input-data x.json, ...) work. The
# mounts vanish with the namespace when perf_analyzer exits, even on kill -9: nothing to
# unmount, nothing left behind. The chroot shares the host network namespace, so
# 127.0.0.1 is the host's loopback.
#
# `--help` (or `-h`) alone prints perf_analyzer's usage and exits 0: perf_analyzer itself
# has no help option; run without arguments it prints the usage and exits 99.
#
# perf_analyzer's exit code is passed through (it uses 99 both for bad arguments and for
# failed runs, e.g. an unreachable server or unknown model). Failures of this runner itself
# (not root, debootstrap/apt/pip failure, ...) exit with 125.
#
# perf_analyzer needs Triton's ModelConfig gRPC method besides the v2 core protocol: KServe's
# and MLServer's servers lack it, so start the peers of scripts/peers with
# --triton_model_config to benchmark them with it. For a model with max_batch_size 0 and
# variable dimensions give the shapes, e.g. --shape INPUT0:1,16 --shape INPUT1:1,16.
#
# Environment knobs:
#   PERF_ANALYZER_VERSION   perf-analyzer version to install (default 2.60.0); changing it
#                           reinstalls the venv, not the chroot
#   PERF_CHROOT             chroot directory (default <repo>/.cache/perf-chroot)
#   DEBIAN_MIRROR           Debian mirror for debootstrap/apt (default http://deb.debian.org/debian)
#   PIP_INDEX_URL           passed to pip inside the chroot when set
# To rebuild from scratch: rm -rf .cache/perf-chroot
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHROOT=${PERF_CHROOT:-$REPO_ROOT/.cache/perf-chroot}
PA_VERSION=${PERF_ANALYZER_VERSION:-2.60.0}
SUITE=trixie
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
VENV=/opt/perf-analyzer-venv          # path inside the chroot
MARKER=$CHROOT/.perf-analyzer-ready   # holds the installed perf-analyzer version
BOOTSTRAPPED=$CHROOT/.debootstrap-done
# Debian packages for the shared libraries perf_analyzer links (see `ldd` check below):
# libz.so.1 libssl.so.3 libcrypto.so.3 libstdc++.so.6 libgcc_s.so.1 (libm/libc: libc6).
CHROOT_PKGS=(python3 python3-venv ca-certificates zlib1g libssl3t64 libstdc++6 libgcc-s1)
CHROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUNNER_FAIL=125

die() { echo "perf_analyzer.sh: error: $*" >&2; exit "$RUNNER_FAIL"; }
log() { echo "perf_analyzer.sh: $*" >&2; }

[ "$(id -u)" -eq 0 ] || die "must be run as root (debootstrap, chroot and mount need it); try: sudo $0 $*"
command -v unshare >/dev/null || die "unshare (util-linux) not found"

# Runs "$@" (a shell snippet and its args) in a private mount namespace with /dev, /proc,
# /sys and /tmp of the host mounted into the chroot; mounts disappear with the namespace.
in_chroot_ns() {
    local snippet=$1; shift
    unshare --mount --propagation private bash -euo pipefail -c '
        root=$1; snippet=$2; shift 2
        fail() { echo "perf_analyzer.sh: error: $*" >&2; exit 125; }
        mount --rbind /dev  "$root/dev"  || fail "cannot bind-mount /dev into $root"
        mount -t proc proc  "$root/proc" || fail "cannot mount /proc in $root"
        mount --rbind /sys  "$root/sys"  || fail "cannot bind-mount /sys into $root"
        { mkdir -p "$root/tmp" && mount --rbind /tmp "$root/tmp"; } || fail "cannot bind-mount /tmp into $root"
        eval "$snippet"
    ' in_chroot_ns "$CHROOT" "$snippet" "$@"
}

# Runs a command inside the chroot with a clean environment (for the build steps).
chroot_run() {
    local extra=()
    [ -n "${PIP_INDEX_URL:-}" ] && extra+=("PIP_INDEX_URL=$PIP_INDEX_URL")
    [ -n "${http_proxy:-}" ] && extra+=("http_proxy=$http_proxy")
    [ -n "${https_proxy:-}" ] && extra+=("https_proxy=$https_proxy")
    in_chroot_ns 'exec chroot "$root" "$@"' /usr/bin/env -i PATH="$CHROOT_PATH" HOME=/root LANG=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore "${extra[@]}" "$@"
}

ensure_debootstrap() {
    command -v debootstrap >/dev/null && return 0
    command -v apt-get >/dev/null || die "debootstrap not installed and apt-get not available"
    log "installing debootstrap with apt-get"
    if ! apt-get install -y --no-install-recommends debootstrap >/dev/null 2>&1; then
        apt-get update >/dev/null 2>&1 || true
        apt-get install -y --no-install-recommends debootstrap >/dev/null \
            || die "apt-get install debootstrap failed"
    fi
}

build_chroot() {
    local t0=$SECONDS
    if [ ! -e "$BOOTSTRAPPED" ]; then
        ensure_debootstrap
        if [ -e "$CHROOT" ]; then
            log "removing incomplete chroot $CHROOT"
            rm -rf --one-file-system "$CHROOT" || die "cannot remove incomplete chroot $CHROOT"
        fi
        mkdir -p "$CHROOT"
        log "debootstrap --variant=minbase $SUITE $CHROOT $MIRROR (takes a few minutes) ..."
        # In a private mount namespace too, so an interrupted debootstrap leaves no mounts.
        if ! unshare --mount --propagation private \
                debootstrap --variant=minbase "$SUITE" "$CHROOT" "$MIRROR" >"$CHROOT.debootstrap.log" 2>&1; then
            tail -n 30 "$CHROOT.debootstrap.log" >&2 || true
            [ -f "$CHROOT/debootstrap/debootstrap.log" ] && tail -n 30 "$CHROOT/debootstrap/debootstrap.log" >&2
            die "debootstrap failed (full log: $CHROOT.debootstrap.log);" \
                "is $MIRROR reachable and does this debootstrap know '$SUITE'?"
        fi
        rm -f "$CHROOT.debootstrap.log"
        touch "$BOOTSTRAPPED"
        log "debootstrap done in $((SECONDS - t0)) s"
    fi

    # Host DNS config and any locally trusted CAs (e.g. an egress proxy CA) for apt/pip.
    cp -L /etc/resolv.conf "$CHROOT/etc/resolv.conf" 2>/dev/null || true
    mkdir -p "$CHROOT/usr/local/share/ca-certificates"
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$CHROOT/usr/local/share/ca-certificates/"
    fi
    printf '#!/bin/sh\nexit 101\n' >"$CHROOT/usr/sbin/policy-rc.d"; chmod +x "$CHROOT/usr/sbin/policy-rc.d"

    log "apt-get install ${CHROOT_PKGS[*]} (in chroot) ..."
    chroot_run apt-get update -q >/dev/null || die "apt-get update failed inside the chroot"
    chroot_run apt-get install -y -q --no-install-recommends "${CHROOT_PKGS[@]}" >/dev/null \
        || die "apt-get install failed inside the chroot"
    chroot_run update-ca-certificates >/dev/null || die "update-ca-certificates failed inside the chroot"

    log "creating venv $VENV and pip install perf-analyzer==$PA_VERSION (in chroot) ..."
    rm -rf "${CHROOT:?}$VENV"
    chroot_run python3 -m venv "$VENV" || die "python3 -m venv failed inside the chroot"
    chroot_run "$VENV/bin/pip" install -q "perf-analyzer==$PA_VERSION" \
        || die "pip install perf-analyzer==$PA_VERSION failed inside the chroot"

    # The wheel's console script (perf_analyzer.cli:main) runs the binary with
    # subprocess.run and drops its exit code, so call the binary directly.
    local bin
    bin=$(chroot_run "$VENV/bin/python" -c 'import pathlib, perf_analyzer
print(pathlib.Path(perf_analyzer.__file__).parent / "bin" / "perf_analyzer")') \
        || die "cannot locate the perf_analyzer binary in the venv"
    [ -x "$CHROOT$bin" ] || die "perf_analyzer binary not found at $bin inside the chroot"
    ln -sfn "$bin" "$CHROOT/usr/local/bin/perf_analyzer"

    local missing
    missing=$(chroot_run ldd "$bin" | grep 'not found' || true)
    [ -z "$missing" ] || die "perf_analyzer is missing shared libraries inside the chroot:"$'\n'"$missing"
    chroot_run apt-get clean >/dev/null || true
    rm -rf "$CHROOT/var/lib/apt/lists/"* "$CHROOT/root/.cache/pip"

    echo "$PA_VERSION" >"$MARKER"
    log "chroot ready in $((SECONDS - t0)) s ($(du -sh --one-file-system "$CHROOT" | cut -f1)): $CHROOT"
}

if [ "$(cat "$MARKER" 2>/dev/null)" != "$PA_VERSION" ]; then
    mkdir -p "$(dirname "$CHROOT")"
    exec 9>"$CHROOT.lock"
    flock 9
    # Another call may have finished the build while this one waited for the lock.
    if [ "$(cat "$MARKER" 2>/dev/null)" != "$PA_VERSION" ]; then
        rm -f "$MARKER"
        build_chroot
    fi
    flock -u 9
    exec 9>&-
fi

# perf_analyzer has no --help: run without arguments it prints its usage and exits 99.
help=0
if [ $# -eq 1 ] && { [ "$1" = --help ] || [ "$1" = -h ]; }; then help=1; set --; fi

# Make the current directory visible at the same path inside the chroot (for relative
# paths in the arguments), unless that path is a non-empty directory of the chroot itself.
cwd=$PWD
bind_cwd=0
case "$cwd" in
    /|/tmp|/tmp/*) ;;
    *)  if [ ! -e "$CHROOT$cwd" ] || { [ -d "$CHROOT$cwd" ] && [ -z "$(ls -A "$CHROOT$cwd")" ]; }; then
            mkdir -p "$CHROOT$cwd" && bind_cwd=1
        else
            log "warning: $cwd is a system path of the chroot; running perf_analyzer from /"
            cwd=/
        fi ;;
esac

rc=0
in_chroot_ns '
    cwd=$1; bind_cwd=$2; shift 2
    if [ "$bind_cwd" = 1 ]; then mount --rbind "$cwd" "$root$cwd" || fail "cannot bind-mount $cwd"; fi
    unset LD_LIBRARY_PATH LD_PRELOAD PYTHONPATH PYTHONHOME VIRTUAL_ENV
    export PATH='"$CHROOT_PATH"'
    exec chroot "$root" /bin/sh -c '\''cd "$1" && shift && exec /usr/local/bin/perf_analyzer "$@"'\'' sh "$cwd" "$@"
' "$cwd" "$bind_cwd" "$@" || rc=$?
# The usage text asked for with --help is a success, not perf_analyzer's error 99.
[ "$help" = 1 ] && [ "$rc" = 99 ] && rc=0
exit "$rc"
