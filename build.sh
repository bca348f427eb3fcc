#!/usr/bin/env bash
# Pixiebox build pipeline.
#
#   sudo ./build.sh demo     set up, then run the virtual lab: QEMU machines PXE-boot from Pixiebox
#                            (--machines N, --timeout S, --keep, --power-cycle; Ctrl-C removes
#                            everything; --appliance boots the appliance image as the lab's VM)
#   sudo ./build.sh serve    set up, then run the agent on config/lab.toml (PIXIEBOX_CONFIG overrides)
#   sudo ./build.sh test     set up, then run linters and the whole test suite (what CI runs)
#        ./build.sh test -m 'not netns'   as any user: linters and the tests that need no root,
#                            namespaces or QEMU (no image build; no system packages unless root)
#   sudo ./build.sh setup    install system packages and the Python environment only
#   sudo ./build.sh osie     build the OSIE (kernel + initrd) with mkosi into out/osie/
#   sudo ./build.sh appliance  build the appliance disk image into out/appliance/ (builds the OSIE)
#   sudo ./build.sh all      both images
#   sudo ./build.sh clean    remove out/ and the image build caches
#   sudo ./build.sh trixie   fetch the pinned Debian trixie shim, GRUB, OVMF, iPXE (image/trixie.txt;
#                            unpacked, not installed): Secure Boot, arm64 iPXE; `test` does this too
#   (--require-upstream with osie/appliance/all: fail when k3s/Telegraf cannot be downloaded)
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
    qemu-system-arm qemu-efi-aarch64  # arm64 VM tests: qemu-system-aarch64 virt with AAVMF
    openssh-server openipmi  # power tests: a real sshd, and ipmi_sim as the BMC
    jq e2fsprogs fdisk shellcheck  # OSIE script tests: jq, mkfs/e2fsck on loop disks, sfdisk
    mtools  # image tests and demo --appliance write lab.toml onto the appliance's FAT partition
    chromium chromium-driver  # dashboard tests: a real browser, driven by Selenium (tests/browser.py)
)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "run as root (sudo ./build.sh $1): $2"
}

missing_packages() { # PACKAGE[=VERSION]... -> those not installed, one per line
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "${pkg%%=*}" 2>/dev/null | grep -q "install ok installed" \
            || echo "$pkg"
    done
}

setup_system() {
    need_root setup "it installs Debian packages"
    command -v apt-get >/dev/null || die "apt-get not found: Pixiebox is built on Debian (bookworm or newer)"
    local missing
    mapfile -t missing < <(missing_packages "${APT_PACKAGES[@]}")
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
    # --appliance boots out/appliance/appliance.raw as the lab's appliance VM.
    case " $* " in
        *" --appliance "*)
            [ -f "$ROOT/out/appliance/appliance.raw" ] || cmd_appliance
            exec "$VENV/bin/pixiebox" demo "$@" ;;
    esac
    # The real OSIE once `build.sh osie` (or all, or test) built it; else the small test OS.
    if [ -f "$ROOT/out/osie/initrd" ]; then
        say "the machines boot the OSIE from out/osie (./build.sh osie rebuilds it)"
        exec "$VENV/bin/pixiebox" demo --os "$ROOT/out/osie" "$@"
    fi
    build_testos
    exec "$VENV/bin/pixiebox" demo --os "$ROOT/out/testos" "$@"
}

# True when the pytest arguments select only tests without the `netns` marker (-m "not netns",
# tests/conftest.py): those need no root, namespaces or QEMU, so neither do their set-up steps.
unprivileged_selection() { # PYTEST-ARGS...
    local expr=""
    while [ "$#" -gt 0 ]; do
        case "$1" in
            -m) expr=${2:-}; shift ;;
            -m*) expr=${1#-m} ;;
        esac
        shift
    done
    case "$expr" in *"not netns"*) return 0 ;; *) return 1 ;; esac
}

lint() {
    say "ruff"
    "$VENV/bin/ruff" check agent tests bench
    "$VENV/bin/ruff" format --check agent tests bench
    say "mypy"
    "$VENV/bin/mypy"
}

# `./build.sh test -m 'not netns'`: no image build (only namespace and VM tests boot images) and,
# as a normal user, no Debian packages; the Python environment is set up unless it exists and is
# not this user's (made by an earlier `sudo ./build.sh`), in which case it is used as it is.
cmd_test_unprivileged() {
    if [ "$(id -u)" -eq 0 ]; then
        setup_system  # the tools some of these tests use (jq, shellcheck), since root can
    fi
    if [ ! -x "$VENV/bin/python" ] || [ -w "$VENV" ]; then
        setup_python test
    else
        say "using $VENV as it is (not writable by $(id -un); sudo ./build.sh setup updates it)"
    fi
    lint
    say "pytest (tests that need no root)"
    "$VENV/bin/pytest" "$@"
}

cmd_test() {
    if unprivileged_selection "$@"; then
        cmd_test_unprivileged "$@"
        return
    fi
    need_root test "the tests build network namespaces (./build.sh test -m 'not netns' runs the others without root)"
    setup_system
    trixie_debs || true  # shim, GRUB, OVMF (Secure Boot), the iPXE served; each miss said above
    # The image tests (tests/test_images.py) boot the real OSIE and appliance: build them first
    # (cached: only what changed is rebuilt). PIXIEBOX_SKIP_IMAGES=1 skips this for quick runs;
    # the image tests then skip, except on CI (CI=true), where they fail.
    if [ "${PIXIEBOX_SKIP_IMAGES:-}" != 1 ]; then
        cmd_appliance
    fi
    setup_python test
    lint
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
    local missing
    mapfile -t missing < <(missing_packages "${BENCH_PACKAGES[@]}")
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

# --- images (mkosi) ------------------------------------------------------------------------------
# mkosi 24 comes from bookworm-backports (bookworm itself has 14) with the systemd 254 tools it
# needs (systemd-repart); GRUB 2.12 from there too, so that the BIOS core image is made by the
# same GRUB version as the trixie modules in the image. Pinned: a newer mkosi changes defaults.
MKOSI_VERSION=24.3-1~bpo12+1
BACKPORTS_LIST=/etc/apt/sources.list.d/pixiebox-bookworm-backports.list
IMAGE_PACKAGES=(bubblewrap debian-archive-keyring dosfstools mtools e2fsprogs zstd xz-utils cpio
    python3-pefile uidmap fdisk)
BACKPORTS_PACKAGES=("mkosi=$MKOSI_VERSION" systemd systemd-container systemd-boot systemd-boot-efi grub-pc-bin)
IMAGE_CACHE=${PIXIEBOX_IMAGE_CACHE:-/var/cache/pixiebox}
REQUIRE_UPSTREAM=""

setup_images() {
    need_root "$1" "mkosi builds images as root"
    setup_system
    local have missing_bpo
    have=$(dpkg-query -W -f='${Version}' mkosi 2>/dev/null || true)
    mapfile -t missing_bpo < <(missing_packages "${BACKPORTS_PACKAGES[@]}")
    if [ "$have" != "$MKOSI_VERSION" ] || [ "${#missing_bpo[@]}" -gt 0 ] || ! command -v bootctl >/dev/null; then
        if [ ! -f "$BACKPORTS_LIST" ] && ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
            say "adding Debian bookworm-backports (for mkosi $MKOSI_VERSION) in $BACKPORTS_LIST"
            echo "deb http://deb.debian.org/debian bookworm-backports main" >"$BACKPORTS_LIST"
        fi
        say "installing mkosi $MKOSI_VERSION and its tools"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || die "apt-get update failed: check the network and /etc/apt/sources.list"
        apt-get install -y -qq --no-install-recommends -t bookworm-backports \
            "${BACKPORTS_PACKAGES[@]}" "${IMAGE_PACKAGES[@]}" >/dev/null \
            || die "installing mkosi $MKOSI_VERSION from bookworm-backports failed (apt-cache policy mkosi shows what is available; if $MKOSI_VERSION is gone from backports, update MKOSI_VERSION in build.sh)"
    fi
    local missing
    mapfile -t missing < <(missing_packages "${IMAGE_PACKAGES[@]}")
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || die "apt-get install ${missing[*]} failed"
    fi
    mkdir -p "$IMAGE_CACHE/mkosi" out
}

# Upstream binaries that no Debian registry carries, pinned by version (image/upstream.txt:
# name, version, URL, sha256). Unreachable → one line and the image is built without them
# (--require-upstream makes that an error). An entry without a sha256 is checked against the
# checksum file its project publishes, and the sha256 to pin is printed.
fetch_upstream() { # NAME DEST
    local name=$1 dest=$2 version url sha checksums file
    local list=${PIXIEBOX_UPSTREAM_FILE:-image/upstream.txt}
    read -r version url sha checksums < <(awk -v n="$name" '$1 == n { print $2, $3, $4, $5 }' "$list")
    [ -n "$url" ] || die "$list has no entry for $name"
    file="$IMAGE_CACHE/upstream/$name-$version-$(echo "$url" | sha256sum | cut -c1-12)"
    mkdir -p "$IMAGE_CACHE/upstream"
    if [ ! -s "$file" ]; then
        if ! curl -fsSL --connect-timeout 10 --max-time 600 -o "$file.part" "$url" 2>"$file.err"; then
            rm -f "$file.part"
            local why; why=$(tr '\n' ' ' <"$file.err" | sed 's/curl: ([0-9]*) //; s/ *$//')
            if [ -n "$REQUIRE_UPSTREAM" ]; then
                die "$name $version: cannot download $url ($why) and --require-upstream is set"
            fi
            printf 'build.sh: %s %s not included: %s is unreachable (%s); the image is built without it.\n' \
                "$name" "$version" "$url" "$why" >&2
            return 0
        fi
        if [ "$sha" = "-" ]; then
            local want
            want=$(curl -fsSL --connect-timeout 10 --max-time 60 "$checksums" 2>/dev/null | awk -v f="$(basename "$url")" 'NF == 1 || $2 == f || $2 == "*"f { print $1 }' | head -n1)
            [ -n "$want" ] || { rm -f "$file.part"; die "$name $version: no sha256 pinned and $checksums gives none: pin one in image/upstream.txt"; }
            sha=$want
            say "$name $version: sha256 $sha (from $checksums; pin it in image/upstream.txt)"
        fi
        echo "$sha  $file.part" | sha256sum -c --quiet - >/dev/null 2>&1 \
            || { rm -f "$file.part"; die "$name $version: sha256 mismatch for $url (expected $sha): not used"; }
        mv "$file.part" "$file"
    fi
    case "$url" in
        *.tar.gz) tar -xzf "$file" -O --wildcards '*/usr/bin/telegraf' >"$dest" || die "$name: no usr/bin/telegraf in $url" ;;
        *) cp "$file" "$dest" ;;
    esac
    chmod 0755 "$dest"
}

# Debian trixie packages for the Secure Boot chain and its tests (issue 16) and the iPXE the agent
# serves on a bookworm host (issue 15: arm64 and riscv64 builds; core/firmware.py), pinned in
# image/trixie.txt (package, version, pool path, sha256): downloaded from the mirror, checked
# against the pinned sha256 and unpacked with dpkg-deb -x into $IMAGE_CACHE/trixie/<pkg>_<version>/.
# Never installed: the host stays bookworm and its apt never sees trixie. A package that cannot
# be downloaded is one line naming it and its URL; the Secure Boot tests then skip (fail on CI).
TRIXIE_MIRROR=${PIXIEBOX_TRIXIE_MIRROR:-https://deb.debian.org/debian}

trixie_current() { # PACKAGE -> "version pool-path sha256" as trixie's Packages index has it now
    local index="$TRIXIE_MIRROR/dists/trixie/main/binary-amd64/Packages.xz"
    command -v xz >/dev/null || return 0
    curl -fsS --connect-timeout 10 --max-time 300 "$index" 2>/dev/null | xz -dc 2>/dev/null \
        | awk -v p="$1" -v RS= '$0 ~ "(^|\n)Package: " p "\n" {
            for (i = 1; i <= split($0, l, "\n"); i++) {
                if (l[i] ~ /^Version: /) v = substr(l[i], 10)
                if (l[i] ~ /^Filename: /) f = substr(l[i], 11)
                if (l[i] ~ /^SHA256: /) s = substr(l[i], 9)
            }
            print v, f, s }' || true  # only a hint: nothing when the index is unreachable
}

trixie_debs() { # returns 1 when a pinned package could not be fetched (after saying which)
    local list=${PIXIEBOX_TRIXIE_FILE:-$ROOT/image/trixie.txt} pkg version path sha rest
    local dir="$IMAGE_CACHE/trixie" dest deb url why now status=0 fetched=()
    mkdir -p "$dir/debs"
    while read -r pkg version path sha rest <&3; do
        case "$pkg" in ''|'#'*) continue ;; esac
        if [ -z "$sha" ] || [ -n "$rest" ]; then
            die "$list: '$pkg' needs: package version pool-path sha256"
        fi
        dest="$dir/${pkg}_$version"
        [ -f "$dest/.unpacked" ] && continue
        deb="$dir/debs/$(basename "$path")" url="$TRIXIE_MIRROR/$path"
        if [ ! -s "$deb" ]; then
            if ! why=$(curl -fsS --connect-timeout 10 --max-time 600 -o "$deb.part" "$url" 2>&1); then
                rm -f "$deb.part"
                why=$(printf '%s' "$why" | tr '\n' ' ' | sed 's/curl: ([0-9]*) //; s/ *$//')
                case "$why" in
                    *"error: 404"*)
                        now=$(trixie_current "$pkg")
                        printf 'build.sh: %s %s is gone from %s (a trixie point release replaced it)%s\n' \
                            "$pkg" "$version" "$url" "${now:+: pin the current one in $list: $pkg  $now}" >&2 ;;
                    *)
                        printf 'build.sh: %s %s not fetched: %s is unreachable (%s); the tests that need it skip (fail on CI).\n' \
                            "$pkg" "$version" "$url" "$why" >&2 ;;
                esac
                status=1
                continue
            fi
            mv "$deb.part" "$deb"
        fi
        echo "$sha  $deb" | sha256sum -c --quiet - >/dev/null 2>&1 \
            || { rm -f "$deb"; die "$pkg $version: sha256 mismatch for $url (expected $sha): not used"; }
        rm -rf "$dest.part" && mkdir -p "$dest.part"
        dpkg-deb -x "$deb" "$dest.part" || die "$pkg $version: dpkg-deb -x $deb failed"
        touch "$dest.part/.unpacked" && rm -rf "$dest" && mv "$dest.part" "$dest"
        fetched+=("$pkg $version")
    done 3<"$list"
    if [ "${#fetched[@]}" -gt 0 ]; then
        local names; names=$(IFS=,; echo "${fetched[*]}")
        say "trixie packages unpacked into $dir (not installed): ${names//,/, }"
    fi
    return "$status"
}

# A build is skipped when nothing it reads changed: the stamp is a hash of its inputs.
inputs_stamp() { # PATHS...
    find "$@" -type f -print0 2>/dev/null | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

run_mkosi() { # NAME (image/NAME, out/NAME, out/NAME.log)
    local name=$1 log="$ROOT/out/$1.log" started=$SECONDS
    say "mkosi: building the $name image (log: out/$name.log)"
    # Progress: mkosi's own step lines (‣) on the terminal, everything in the log. With
    # pipefail the pipeline fails when mkosi (or tee) does; the filter itself never fails it.
    local status=0
    mkosi -C "image/$name" --cache-dir "$IMAGE_CACHE/mkosi" --output-dir "$ROOT/out/$name" \
        --incremental -f build 2>&1 | tee "$log" | { grep --line-buffered '‣' >&2 || true; } \
        || status=$?
    if [ "$status" -ne 0 ] || ! grep -q "size is" "$log"; then
        local last; last=$(grep '‣' "$log" | tail -n1 | sed 's/^‣ *//')
        die "mkosi failed building the $name image at: ${last:-the start} (full log: out/$name.log)"
    fi
    say "$name image built in $((SECONDS - started)) s"
}

cmd_osie() {
    setup_images osie
    local input="$ROOT/out/osie-input/tree"
    rm -rf "$input" && mkdir -p "$input/usr/local/bin"
    fetch_upstream k3s "$input/usr/local/bin/k3s"
    fetch_upstream telegraf "$input/usr/local/bin/telegraf"
    local stamp; stamp=$(inputs_stamp image/osie image/shared overlays/osie "$input")
    if [ -f out/osie/osie.cpio.zst ] && [ "$(cat out/osie/stamp 2>/dev/null)" = "$stamp" ]; then
        say "the OSIE is up to date (out/osie; ./build.sh clean forces a rebuild)"
    else
        rm -f out/osie/stamp
        run_mkosi osie
        echo "$stamp" >out/osie/stamp
    fi
    ln -sf osie.vmlinuz out/osie/vmlinuz
    ln -sf osie.cpio.zst out/osie/initrd
    local size; size=$(du -m --apparent-size out/osie/osie.cpio.zst | cut -f1)
    say "OSIE: out/osie/vmlinuz ($(du -m --apparent-size out/osie/osie.vmlinuz | cut -f1) MB), out/osie/initrd (${size} MB; goal < 120 MB)$( [ -x "$input/usr/local/bin/k3s" ] || echo ', without k3s')$( [ -x "$input/usr/local/bin/telegraf" ] || echo ', without Telegraf')"
}

cmd_appliance() {
    cmd_osie
    setup_python ""
    local input="$ROOT/out/appliance-input"
    rm -rf "$input" && mkdir -p "$input/wheels" "$input/osie" "$input/bin"
    say "the agent's wheels for the image's Python (trixie: CPython 3.13)"
    local reqs="$input/requirements.txt"
    "$VENV/bin/python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' >"$reqs"
    mkdir -p "$IMAGE_CACHE/wheels"
    "$VENV/bin/pip" download -q --disable-pip-version-check --only-binary=:all: \
        --python-version 3.13 --implementation cp --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform linux_x86_64 \
        -d "$IMAGE_CACHE/wheels" -r "$reqs" || die "pip download of the agent's dependencies failed: is PyPI reachable?"
    cp "$IMAGE_CACHE"/wheels/*.whl "$input/wheels/"
    "$VENV/bin/pip" wheel -q --disable-pip-version-check --no-deps -w "$input/wheels" . \
        || die "building the pixiebox wheel failed"
    cp out/osie/osie.vmlinuz "$input/osie/vmlinuz"
    cp out/osie/osie.cpio.zst "$input/osie/initrd"
    cp config/lab.toml "$input/lab.toml"
    fetch_upstream k3s "$input/bin/k3s"
    local stamp; stamp=$(inputs_stamp image/appliance image/shared overlays/appliance "$input")
    if [ -f out/appliance/appliance.raw ] && [ "$(cat out/appliance/stamp 2>/dev/null)" = "$stamp" ]; then
        say "the appliance image is up to date (out/appliance/appliance.raw)"
    else
        rm -f out/appliance/stamp
        run_mkosi appliance
        echo "$stamp" >out/appliance/stamp
    fi
    say "appliance: out/appliance/appliance.raw ($(du -m --apparent-size out/appliance/appliance.raw | cut -f1) MB); flash it with dd (see README)"
}

cmd_all() { cmd_appliance; }

cmd_clean() {
    need_root clean "the image caches are root's"
    say "removing out/ and $IMAGE_CACHE (mkosi caches, downloads, wheels)"
    rm -rf out "$IMAGE_CACHE"
}

image_flags() { # parse --require-upstream; echo the other arguments
    local arg
    for arg in "$@"; do
        case "$arg" in
            --require-upstream) REQUIRE_UPSTREAM=1 ;;
            *) die "unknown option $arg (image builds take --require-upstream)" ;;
        esac
    done
}

case "${1:-}" in
    setup) shift; cmd_setup "$@" ;;
    osie) shift; image_flags "$@"; cmd_osie ;;
    appliance) shift; image_flags "$@"; cmd_appliance ;;
    all) shift; image_flags "$@"; cmd_all ;;
    clean) shift; cmd_clean ;;
    trixie) shift; need_root trixie "it writes $IMAGE_CACHE"; trixie_debs ;;
    serve) shift; cmd_serve "$@" ;;
    demo) shift; cmd_demo "$@" ;;
    test) shift; cmd_test "$@" ;;
    bench) shift; cmd_bench "$@" ;;
    *) sed -n '2,/^# Needs Debian/p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
