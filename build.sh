#!/usr/bin/env bash
# Pixiebox build pipeline.
#
#   sudo ./build.sh demo     set up, then run the virtual lab: QEMU machines PXE-boot from Pixiebox
#                            (--machines N, --timeout S, --keep; Ctrl-C removes everything)
#   sudo ./build.sh serve    set up, then run the agent on config/lab.toml (PIXIEBOX_CONFIG overrides)
#   sudo ./build.sh test     set up, then run linters and the whole test suite (what CI runs)
#   sudo ./build.sh setup    install system packages and the Python environment only
#   sudo ./build.sh bench    set up, then benchmark Pixiebox against Kea, dnsmasq, tftpd-hpa and
#                            nginx (--quick, --only/--skip dhcp tftp http dns startup vm, --profile)
#
# Needs Debian bookworm (or newer) and root: the agent binds DHCP ports, and the tests build
# network namespaces.
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")"
ROOT=$(pwd)
VENV="$ROOT/.venv"

# System packages: the real peers the tests talk to (ISC dhclient, busybox udhcpc, dnsmasq as
# the home router, dig, tftp-hpa, curl), tcpdump for debugging, and Debian's iPXE builds.
APT_PACKAGES=(
    python3 python3-venv python3-dev gcc
    iproute2 isc-dhcp-client busybox dnsmasq-base dnsutils curl tftp-hpa tcpdump procps
    ipxe strace nftables openssh-client netbase  # nft: tests block ports on purpose
    qemu-system-x86 ovmf ipxe-qemu kmod cpio  # VM tests; depmod + cpio build the test OS
    openssh-server openipmi  # power tests: a real sshd, and ipmi_sim as the BMC
)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo ./build.sh $1): $2"
}

setup_system() {
    need_root setup "it installs Debian packages"
    command -v apt-get >/dev/null || die "apt-get not found: Pixiebox is built on Debian (bookworm or newer)"
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || die "apt-get update failed: check the network and /etc/apt/sources.list"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    fi
}

setup_python() {
    local extras=$1
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating the Python environment in $VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed: install python3-venv"
    fi
    say "installing pixiebox${extras:+[$extras]} into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -e ".${extras:+[$extras]}" \
        || die "pip install failed: is PyPI reachable?"
}

cmd_setup() { setup_system; setup_python test; }

cmd_serve() {
    setup_system
    setup_python ""
    say "starting the agent on ${PIXIEBOX_CONFIG:-config/lab.toml} (Ctrl-C stops it)"
    "$VENV/bin/pixiebox" check ${PIXIEBOX_CONFIG:+--config "$PIXIEBOX_CONFIG"} || die "fix lab.toml first (errors above)"
    exec "$VENV/bin/pixiebox" serve ${PIXIEBOX_CONFIG:+--config "$PIXIEBOX_CONFIG"} "$@"
}

build_testos() {
    say "building the test OS (Debian kernel + busybox initrd) in out/testos"
    bash scripts/build-testos.sh "$ROOT/out/testos" || die "the test OS did not build (see above)"
}

cmd_demo() {
    need_root demo "the virtual lab builds network namespaces and runs QEMU"
    setup_system
    setup_python ""
    build_testos
    exec "$VENV/bin/pixiebox" demo --testos "$ROOT/out/testos" "$@"
}

cmd_test() {
    need_root test "the tests build network namespaces"
    setup_system
    setup_python test
    say "ruff"
    "$VENV/bin/ruff" check agent tests
    say "mypy"
    "$VENV/bin/mypy"
    say "pytest"
    # pytest exits 5 when it collected no tests: that is a failure here, not a pass.
    "$VENV/bin/pytest" "$@"
}

# The benchmark's peers (bench/): the established servers Pixiebox is measured against and the
# load generators. Installed only by `bench`, never started as system services.
BENCH_PACKAGES=(
    kea-dhcp4-server kea-admin  # kea-dhcp4 (memfile) and perfdhcp (shipped in kea-admin)
    dnsmasq-base tftpd-hpa nginx-light
    wrk dnsperf curl tftp-hpa
)

cmd_bench() {
    need_root bench "the benchmark builds network namespaces"
    setup_system
    setup_python ""
    local missing=()
    for pkg in "${BENCH_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing the benchmark's peers: ${missing[*]}"
        # The servers must not start as system services (tftpd-hpa and nginx would listen on
        # this machine's own network): policy-rc.d says no while they are installed.
        local policy=/usr/sbin/policy-rc.d made_policy=""
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
        fi
        export DEBIAN_FRONTEND=noninteractive
        local status=0
        apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || status=1
        if [ -n "$made_policy" ]; then rm -f "$policy"; fi
        [ "$status" -eq 0 ] || die "apt-get install ${missing[*]} failed"
        # Nor at the next boot: only the services of the packages installed just now.
        if command -v systemctl >/dev/null; then
            local unit
            for unit in kea-dhcp4-server tftpd-hpa nginx; do
                case " ${missing[*]} " in
                    *" $unit "*|*" $unit-light "*) systemctl disable --now "$unit" >/dev/null 2>&1 || true ;;
                esac
            done
        fi
    fi
    say "benchmark (results in out/bench/; Ctrl-C removes its namespaces)"
    exec "$VENV/bin/python" -m bench "$@"
}

case "${1:-}" in
    setup) shift; cmd_setup "$@" ;;
    serve) shift; cmd_serve "$@" ;;
    demo) shift; cmd_demo "$@" ;;
    test) shift; cmd_test "$@" ;;
    bench) shift; cmd_bench "$@" ;;
    *) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
