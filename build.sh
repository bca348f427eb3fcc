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
#                            (--arch arm64|armhf: out/osie-ARCH/, under qemu-user-static on x86;
#                            --arch all: the three; --arch lab: those config/lab.toml's images use)
#   sudo ./build.sh appliance  build the appliance disk image into out/appliance/ (builds the OSIE)
#   sudo ./build.sh all      both images
#   sudo ./build.sh clean    remove out/ and the image build caches
#   sudo ./build.sh trixie   fetch the pinned Debian trixie shim, GRUB, OVMF, iPXE, raspi-firmware
#                            (image/trixie.txt; unpacked, not installed): Secure Boot, arm64 iPXE,
#                            the Raspberry Pi's firmware; `test` does this too
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
    qemu-system-arm qemu-efi-aarch64 u-boot-qemu  # arm VM tests: virt with AAVMF, with U-Boot
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
    # What the machines boot: the real OSIE by default, built here when missing or out of date
    # (cmd_osie is cached: a rebuild only when its inputs changed); --test-os: the small busybox
    # test OS (up in half the time, no SSH); --os DIR: the user's own, nothing to build.
    local test_os=0 own_os=0
    case " $* " in *" --test-os "*) test_os=1 ;; esac
    case " $* " in *" --os "*|*" --os="*|*" --testos "*|*" --testos="*) own_os=1 ;; esac
    # --arm64 (a mixed lab): an arm64 UEFI machine beside the x86 ones. Its firmware is served
    # trixie's arm64 iPXE (bookworm's ipxe package has x86 builds only), and it boots the arm64
    # build of what the x86 machines boot; --arm64-os DIR: the user's own, nothing to build.
    local arm64=()
    case " $* " in
        *" --arm64 "*|*" --arm64-os "*|*" --arm64-os="*)
            trixie_debs || true ;;  # each miss said above; the demo then says what it lacks
    esac
    case " $* " in
        *" --arm64-os "*|*" --arm64-os="*) ;;
        *" --arm64 "*)
            if [ "$test_os" = 0 ]; then
                cmd_osie_arches arm64
                arm64=(--arm64-os "$ROOT/out/osie-arm64")
            else
                say "building the arm64 test OS (Debian kernel + busybox initrd) in out/testos-arm64"
                bash scripts/build-testos.sh --arch arm64 "$ROOT/out/testos-arm64" \
                    || die "the arm64 test OS did not build (see above)"
                arm64=(--arm64-os "$ROOT/out/testos-arm64")
            fi ;;
    esac
    if [ "$own_os" = 1 ]; then
        exec "$VENV/bin/pixiebox" demo "${arm64[@]}" "$@"
    elif [ "$test_os" = 1 ]; then
        build_testos
        exec "$VENV/bin/pixiebox" demo --os "$ROOT/out/testos" "${arm64[@]}" "$@"
    fi
    cmd_osie
    say "the machines boot the OSIE from out/osie (--test-os: the small test OS instead)"
    exec "$VENV/bin/pixiebox" demo --os "$ROOT/out/osie" "${arm64[@]}" "$@"
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
        cmd_appliance  # with the OSIE of every architecture, which the ARM board tests boot too
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
    python3-pefile uidmap fdisk
    qemu-user-static)  # osie --arch arm64|armhf on x86: the image's binaries run under binfmt_misc
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

run_mkosi() { # NAME [OUT [MKOSI-OPTIONS...]] (image/NAME, out/OUT, out/OUT.log; OUT defaults to NAME)
    local name=$1 out=${2:-$1} started=$SECONDS
    local log="$ROOT/out/$out.log"
    shift $(($# < 2 ? $# : 2))
    say "mkosi: building the $out image (log: out/$out.log)"
    # Progress: mkosi's own step lines (‣) on the terminal, everything in the log. With
    # pipefail the pipeline fails when mkosi (or tee) does; the filter itself never fails it.
    local status=0
    mkosi -C "image/$name" --cache-dir "$IMAGE_CACHE/mkosi" --output-dir "$ROOT/out/$out" "$@" \
        --incremental -f build 2>&1 | tee "$log" | { grep --line-buffered '‣' >&2 || true; } \
        || status=$?
    if [ "$status" -ne 0 ] || ! grep -q "size is" "$log"; then
        local last; last=$(grep '‣' "$log" | tail -n1 | sed 's/^‣ *//')
        die "mkosi failed building the $out image at: ${last:-the start} (full log: out/$out.log)"
    fi
    say "$out image built in $((SECONDS - started)) s"
}

# The OSIE's architectures (issue 15): lab.toml's names ([images.NAME.arch.ARCH]) → mkosi's
# --architecture, the QEMU user-mode name (binfmt_misc handler), the upstream.txt suffix and the
# output directory. x86-64 stays out/osie/ (the appliance and the x86 tests read it there).
OSIE_ARCHES_ALL=(x86-64 arm64 armhf)
OSIE_ARCHES=()  # --arch (repeatable, or all / lab); none: x86-64
osie_arch() { # ARCH FIELD(mkosi|qemu|suffix|out)
    case "$1:$2" in
        x86-64:mkosi) echo x86-64 ;; x86-64:qemu) echo x86_64 ;; x86-64:suffix) echo "" ;; x86-64:out) echo osie ;;
        arm64:mkosi) echo arm64 ;; arm64:qemu) echo aarch64 ;; arm64:suffix) echo -arm64 ;; arm64:out) echo osie-arm64 ;;
        armhf:mkosi) echo arm ;; armhf:qemu) echo arm ;; armhf:suffix) echo -armhf ;; armhf:out) echo osie-armhf ;;
        *) die "unknown architecture '$1' for --arch: use x86-64, arm64, armhf, all (the three) or lab (those config/lab.toml's images use)" ;;
    esac
}

# Every architecture lab.toml boots an OSIE build on: [images.NAME.arch.ARCH] tables whose kernel
# is in an osie-ARCH/ directory (another image's variants need no OSIE), and x86-64 always.
lab_osie_arches() {
    local config=${PIXIEBOX_CONFIG:-config/lab.toml}
    [ -f "$config" ] || die "$config not found (--arch lab builds the architectures its images use)"
    python3 - "$config" <<'PY' || die "cannot read $config: ./build.sh serve checks it (pixiebox check)"
import sys, tomllib
images = tomllib.load(open(sys.argv[1], "rb")).get("images", {})
arches = {"x86-64"} | {
    arch for image in images.values() if isinstance(image, dict)
    for arch, variant in image.get("arch", {}).items()
    if isinstance(variant, dict) and str(variant.get("kernel", "")).startswith("osie-")}
print(*sorted(arches, key=lambda a: (a != "x86-64", a)))
PY
}

# A foreign architecture's build runs the image's own binaries (dpkg's maintainer scripts,
# depmod inside the image) on this machine: the kernel must hand them to qemu-user-static through
# binfmt_misc, with the F flag (the interpreter opened at registration, so it works inside mkosi's
# sandbox, where /usr/libexec/qemu-binfmt is not visible). bookworm's qemu-user-static registers
# its handlers through systemd-binfmt, which does not run in containers or chroots: register them
# from its /usr/lib/binfmt.d files. Proven by running a 3-instruction ELF of that architecture.
foreign_ready() { # ARCH
    local qemu dir=/proc/sys/fs/binfmt_misc probe
    qemu=$(osie_arch "$1" qemu)
    [ "$(uname -m)" = "$qemu" ] && return 0
    mountpoint -q "$dir" || mount -t binfmt_misc binfmt_misc "$dir" 2>/dev/null || true
    if [ ! -e "$dir/qemu-$qemu" ] && [ -f "/usr/lib/binfmt.d/qemu-$qemu.conf" ] && [ -w "$dir/register" ]; then
        cat "/usr/lib/binfmt.d/qemu-$qemu.conf" >"$dir/register" 2>/dev/null || true
    fi
    if [ -e "$dir/qemu-$qemu" ] && ! grep -qx enabled "$dir/qemu-$qemu"; then
        echo 1 >"$dir/qemu-$qemu" 2>/dev/null || true
    fi
    probe=$(mktemp) && python3 - "$qemu" "$probe" <<'PY'
import struct, sys
arch, path = sys.argv[1], sys.argv[2]
if arch == "aarch64":  # mov x0, #0; mov x8, #93 (exit); svc #0
    code = struct.pack("<3I", 0xD2800000, 0xD2800BA8, 0xD4000001)
    head = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 2, 183, 1, 0x400078, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    head += struct.pack("<IIQQQQQQ", 1, 5, 0, 0x400000, 0x400000, 132, 132, 0x1000)
else:  # arm: mov r0, #0; mov r7, #1 (exit); svc #0
    code = struct.pack("<3I", 0xE3A00000, 0xE3A07001, 0xEF000000)
    head = struct.pack("<4sBBBB8xHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 2, 40, 1, 0x10054, 52, 0, 0x5000400, 52, 32, 1, 0, 0, 0)
    head += struct.pack("<8I", 1, 0, 0x10000, 0x10000, 96, 96, 5, 0x1000)
open(path, "wb").write(head + code)
PY
    chmod 0755 "$probe"
    if ! "$probe" 2>/dev/null; then
        rm -f "$probe"
        die "this host cannot run $1 binaries ($( [ -e "$dir/qemu-$qemu" ] && grep -q '^flags:.*F' "$dir/qemu-$qemu" && echo "its qemu-$qemu handler in $dir does not run them" || echo "no qemu-$qemu handler with flag F in $dir")): install qemu-user-static (apt-get install qemu-user-static) and mount binfmt_misc (mount -t binfmt_misc binfmt_misc $dir), or build on an $1 machine"
    fi
    rm -f "$probe"
}

cmd_osie() { # [ARCH]: x86-64 (default) → out/osie/, arm64 → out/osie-arm64/, armhf → out/osie-armhf/
    local arch=${1:-x86-64} out suffix
    out=$(osie_arch "$arch" out) suffix=$(osie_arch "$arch" suffix)
    setup_images osie
    foreign_ready "$arch"
    local input="$ROOT/out/osie-input/tree"  # image/osie/mkosi.conf's ExtraTrees: refilled per build
    rm -rf "$input" && mkdir -p "$input/usr/local/bin"
    fetch_upstream "k3s$suffix" "$input/usr/local/bin/k3s"
    fetch_upstream "telegraf$suffix" "$input/usr/local/bin/telegraf"
    local stamp; stamp=$(inputs_stamp image/osie image/shared overlays/osie "$input")
    if [ -f "out/$out/osie.cpio.zst" ] && [ "$(cat "out/$out/stamp" 2>/dev/null)" = "$stamp" ]; then
        say "the $arch OSIE is up to date (out/$out; ./build.sh clean forces a rebuild)"
    else
        rm -f "out/$out/stamp"
        run_mkosi osie "$out" --architecture "$(osie_arch "$arch" mkosi)"
        echo "$stamp" >"out/$out/stamp"
    fi
    ln -sf osie.vmlinuz "out/$out/vmlinuz"
    ln -sf osie.cpio.zst "out/$out/initrd"
    local size; size=$(du -m --apparent-size "out/$out/osie.cpio.zst" | cut -f1)
    say "OSIE ($arch): out/$out/vmlinuz ($(du -m --apparent-size "out/$out/osie.vmlinuz" | cut -f1) MB), out/$out/initrd (${size} MB; goal < 120 MB)$( [ -d "out/$out/dtbs" ] && echo ", out/$out/dtbs ($(find "out/$out/dtbs" -name '*.dtb' -type f | wc -l) device trees)")$( [ -x "$input/usr/local/bin/k3s" ] || echo ', without k3s')$( [ -x "$input/usr/local/bin/telegraf" ] || echo ', without Telegraf')"
}

# Every OSIE architecture asked for, one build at a time (each foreign build is cached in
# /var/cache/pixiebox like the x86 one).
cmd_osie_arches() { # ARCH...
    local arch arches=() lab one
    for arch in "${@:-x86-64}"; do
        case "$arch" in
            all) arches+=("${OSIE_ARCHES_ALL[@]}") ;;
            lab) lab=$(lab_osie_arches)
                 read -r -a lab <<<"$lab"
                 for one in "${lab[@]}"; do
                     case "$one" in
                         riscv64) printf 'build.sh: no riscv64 OSIE for config/lab.toml: build.sh osie builds %s; riscv64 machines need an image of your own.\n' "${OSIE_ARCHES_ALL[*]}" >&2 ;;
                         *) arches+=("$one") ;;
                     esac
                 done ;;
            *) osie_arch "$arch" out >/dev/null; arches+=("$arch") ;;
        esac
    done
    local done_=" "
    for arch in "${arches[@]}"; do
        case "$done_" in *" $arch "*) continue ;; esac
        done_+="$arch "
        cmd_osie "$arch"
    done
}

cmd_appliance() {
    cmd_osie
    # The ARM builds too (each cached by its stamp like the x86 one): config/lab.toml's
    # [images.osie.arch.arm64] and [images.osie.arch.armhf] name them, so an arm64 UEFI machine,
    # a U-Boot board or a Raspberry Pi boots its own build out of the box, not the x86 kernel.
    cmd_osie_arches arm64 armhf
    setup_python ""
    local input="$ROOT/out/appliance-input" arch
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
    for arch in arm64 armhf; do
        [ -d "out/osie-$arch/dtbs" ] || die "out/osie-$arch/dtbs is missing (the $arch kernel's device trees, laid out by image/osie/mkosi.finalize): rm out/osie-$arch/stamp and run ./build.sh appliance again"
        mkdir -p "$input/osie-$arch"
        cp "out/osie-$arch/osie.vmlinuz" "$input/osie-$arch/vmlinuz"
        cp "out/osie-$arch/osie.cpio.zst" "$input/osie-$arch/initrd"
        cp -R "out/osie-$arch/dtbs" "$input/osie-$arch/dtbs"  # its links (flat names) stay links
    done
    say "the appliance carries the OSIE for x86-64 (osie/), arm64 (osie-arm64/) and armhf (osie-armhf/, device trees in dtbs/ each) in /var/lib/pixiebox/assets, which config/lab.toml's [images.osie] and its arch tables name"
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

image_flags() { # parse --require-upstream and --arch ARCH (osie only)
    local words
    while [ $# -gt 0 ]; do
        case "$1" in
            --require-upstream) REQUIRE_UPSTREAM=1 ;;
            --arch|--arch=*) [ "$COMMAND" = osie ] || die "--arch is for ./build.sh osie (the appliance builds and carries every architecture's)" ;;&
            --arch=*) read -r -a words <<<"${1#--arch=}"; OSIE_ARCHES+=("${words[@]}") ;;
            --arch) [ $# -ge 2 ] || die "--arch needs a value: x86-64, arm64, armhf, all or lab"
                    read -r -a words <<<"$2"; OSIE_ARCHES+=("${words[@]}"); shift ;;
            *) die "unknown option $1 (image builds take --require-upstream; osie takes --arch x86-64|arm64|armhf|all|lab)" ;;
        esac
        shift
    done
}

COMMAND=${1:-}
case "$COMMAND" in
    setup) shift; cmd_setup "$@" ;;
    osie) shift; image_flags "$@"; cmd_osie_arches "${OSIE_ARCHES[@]}" ;;
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
