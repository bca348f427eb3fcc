#!/usr/bin/env bash
# Build the Pixiebox test OS: a kernel and a busybox initrd that PXE-booted lab machines (and the
# VM tests) run until the real OSIE image exists.
#
#   scripts/build-testos.sh [--arch ARCH] OUTDIR
#       writes OUTDIR/vmlinuz and OUTDIR/initrd (gzip, newc cpio); for arm64 and armhf also
#       OUTDIR/dtbs/ (the kernel package's device trees, for pxelinux `fdtdir`)
#
# ARCH (or env TESTOS_ARCH) is a Debian architecture: amd64 (the default), arm64 or armhf.
# Inputs are Debian bookworm packages, fetched with `apt-get download` (never installed here):
# linux-image-amd64 / linux-image-arm64 / linux-image-armmp (resolved to the versioned kernel
# package it depends on) and busybox-static of that architecture. A foreign architecture's
# package lists are a private apt state in the cache (CACHE/apt-ARCH, refreshed daily): the host's
# dpkg never gets the architecture added. The .debs are cached in OUTDIR/debs
# (PIXIEBOX_TESTOS_CACHE overrides). OUTDIR/stamp records the package versions and this script's
# hash: re-running with the same inputs does nothing.
# Needs: apt-get (with current package lists), dpkg-deb, depmod (kmod), cpio, gzip, flock.
set -euo pipefail

SELF=$(readlink -f "$0")
# Drivers for QEMU's virtio-net-pci and e1000 NICs; their dependencies come from modules.dep.
NIC_MODULES=(virtio_pci virtio_net e1000)
# efivarfs (a module in Debian's kernel): /init mounts it on UEFI machines to read the firmware's
# SecureBoot variable, which the phone-home reports (issue 16). Loaded by /init only on UEFI: on
# BIOS its init fails (no EFI variables), and a failed insmod on every BIOS boot would be noise.
EFI_MODULES=(efivarfs)

step="arguments"
fail() {
    # One line: the step that failed and what to do about it.
    printf 'build-testos: %s failed: %s\n' "$step" "$*" >&2
    exit 1
}

ARCH=${TESTOS_ARCH:-amd64}
if [ "${1:-}" = --arch ] && [ $# -ge 2 ]; then ARCH=$2 && shift 2; fi
[ $# -eq 1 ] || { echo "usage: $0 [--arch amd64|arm64|armhf] OUTDIR" >&2; exit 2; }
HOST_ARCH=$(dpkg --print-architecture)
case "$ARCH" in
amd64) KERNEL_META=linux-image-amd64 ;;
arm64) KERNEL_META=linux-image-arm64 ;;
# armmp, not armmp-lpae: it also runs on Cortex-A9 boards without LPAE, and on QEMU's virt
# board with highmem=off.
armhf) KERNEL_META=linux-image-armmp ;;
*) echo "build-testos: unknown architecture '$ARCH': use amd64, arm64 or armhf" >&2 && exit 2 ;;
esac
case "$ARCH" in
# QEMU's virt board: virtio-net on PCI (U-Boot's and EDK2's drivers) or on virtio-mmio. Its PCI
# host (pci-host-generic) and virtio core are built into Debian's arm kernels.
arm64 | armhf) NIC_MODULES=(virtio_pci virtio_mmio virtio_net) ;;
esac
mkdir -p "$1" || fail "cannot create output directory $1"
OUT=$(readlink -f "$1")
CACHE=${PIXIEBOX_TESTOS_CACHE:-$OUT/debs}
LOG=$OUT/build.log

step="locking $OUT"
# Two test runs building at once would race on the same files.
exec 9>"$OUT/.lock"
flock -w 900 9 || fail "another build-testos holds $OUT/.lock for 15 min; is one stuck?"

# -- which versions: these (and this script) are the stamp --------------------------------------
# APT_OPTS select the package lists: the host's for its own architecture; for a foreign one a
# private state (lists, archive cache, an empty dpkg status) that knows only that architecture, so
# `apt-get download NAME` fetches NAME:ARCH without `dpkg --add-architecture` on the host.
APT_OPTS=()
if [ "$ARCH" != "$HOST_ARCH" ]; then
    step="apt-get update for $ARCH"
    state=$CACHE/apt-$ARCH
    mkdir -p "$state/lists/partial" "$state/cache/archives/partial" || fail "cannot write the cache $CACHE"
    : >"$state/status"
    APT_OPTS=(-o "Dir::State::Lists=$state/lists" -o "Dir::Cache=$state/cache"
        -o "Dir::State::Status=$state/status" -o "APT::Architecture=$ARCH"
        -o "APT::Architectures::=$ARCH" -o APT::Sandbox::User=root)
    # Daily, like unattended-upgrades: a kernel security update is then built within a day.
    # Offline, lists fetched before still do (the stamp then finds the build up to date).
    if [ -z "$(find "$state/lists" -maxdepth 1 -name '*Packages*' -mtime -1 -print -quit)" ]; then
        : >"$LOG"
        if ! apt-get "${APT_OPTS[@]}" update >>"$LOG" 2>&1; then
            [ -n "$(find "$state/lists" -maxdepth 1 -name '*Packages*' -print -quit)" ] ||
                fail "cannot fetch bookworm's $ARCH package lists: no network? (output: $LOG)"
            echo "build-testos: could not refresh the $ARCH package lists; using those of $(date -r "$state/lists" +%F)" >&2
        fi
    fi
fi
step="apt-cache lookup"
candidate() { # PACKAGE [host] -> the version apt would install, empty if unknown
    local opts=("${APT_OPTS[@]}")
    [ "${2:-}" != host ] || opts=()
    apt-cache "${opts[@]}" policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p' | grep -v '(none)' || true
}
meta_version=$(candidate "$KERNEL_META")
[ -n "$meta_version" ] || fail "apt knows no $KERNEL_META: run 'apt-get update' (as root)"
# The metapackage depends on exactly one versioned kernel package, e.g. linux-image-6.1.0-56-amd64.
kernel_pkg=$(apt-cache "${APT_OPTS[@]}" show --no-all-versions "$KERNEL_META=$meta_version" 2>/dev/null |
    sed -n 's/^Depends: //p' | tr ',' '\n' | sed -n 's/^ *\(linux-image-[0-9][^ ]*\).*/\1/p' |
    head -n1)
[ -n "$kernel_pkg" ] || fail "cannot find the kernel package $KERNEL_META depends on: run 'apt-get update'"
kernel_version=$(candidate "$kernel_pkg")
busybox_version=$(candidate busybox-static)
[ -n "$kernel_version" ] && [ -n "$busybox_version" ] ||
    fail "apt knows no $kernel_pkg or busybox-static: run 'apt-get update' (as root)"

stamp="kernel=$kernel_pkg=$kernel_version
busybox=busybox-static=$busybox_version
script=$(sha256sum "$SELF" | cut -d' ' -f1)"
if [ "$ARCH" != "$HOST_ARCH" ]; then
    # A foreign busybox cannot run here to list its applets: the host's busybox-static (the same
    # source and configuration) lists them.
    applets_version=$(candidate busybox-static host)
    [ -n "$applets_version" ] || fail "apt knows no busybox-static for $HOST_ARCH: run 'apt-get update' (as root)"
    stamp="arch=$ARCH
$stamp
applets=busybox-static:$HOST_ARCH=$applets_version"
fi
if [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initrd" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "build-testos: $OUT is up to date ($kernel_pkg $kernel_version)" >&2
    exit 0
fi
rm -f "$OUT/stamp"
: >"$LOG"

# -- fetch --------------------------------------------------------------------------------------
fetch() { # PACKAGE VERSION [host] -> path of the cached .deb (of ARCH, or of the host's arch)
    local dir=$CACHE/$1_$2 opts=("${APT_OPTS[@]}")
    if [ "${3:-}" = host ]; then opts=(); elif [ "$ARCH" != "$HOST_ARCH" ]; then dir=${dir}_$ARCH; fi
    if ! compgen -G "$dir/*.deb" >/dev/null; then
        step="apt-get download $1=$2"
        rm -rf "$dir.part" && mkdir -p "$dir.part" || fail "cannot write the cache $CACHE"
        # Sandbox::User=root: the _apt user cannot write into a root-only cache directory.
        (cd "$dir.part" && apt-get "${opts[@]}" download -o APT::Sandbox::User=root "$1=$2") >>"$LOG" 2>&1 ||
            fail "no network, or stale package lists? try 'apt-get update' (output: $LOG)"
        mv "$dir.part" "$dir"
    fi
    compgen -G "$dir/*.deb" | head -n1
}
kernel_deb=$(fetch "$kernel_pkg" "$kernel_version")
busybox_deb=$(fetch busybox-static "$busybox_version")
keep=("$CACHE/${kernel_pkg}_$kernel_version" "$CACHE/busybox-static_$busybox_version")
if [ "$ARCH" != "$HOST_ARCH" ]; then
    keep=("${keep[0]}_$ARCH" "${keep[1]}_$ARCH")
    applets_deb=$(fetch busybox-static "$applets_version" host)
    keep+=("$CACHE/busybox-static_$applets_version")
fi
# Drop debs of versions no longer wanted, so the cache does not grow with every kernel update.
# Only this architecture's (a foreign one's are NAME_VERSION_ARCH, the host's have no suffix):
# PIXIEBOX_TESTOS_CACHE may be shared by the builds of every architecture.
for old in "$CACHE"/linux-image-*_* "$CACHE"/busybox-static_*; do
    case " ${keep[*]} " in *" $old "*) continue ;; esac
    owner=$HOST_ARCH
    case "$old" in *_amd64 | *_arm64 | *_armhf) owner=${old##*_} ;; esac
    [ "$owner" != "$ARCH" ] || rm -rf "$old"
done

WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# -- extract ------------------------------------------------------------------------------------
step="dpkg-deb -x $(basename "$kernel_deb")"
dpkg-deb -x "$kernel_deb" "$WORK/kernel" >>"$LOG" 2>&1 || fail "corrupt download? delete $CACHE and retry (output: $LOG)"
step="dpkg-deb -x $(basename "$busybox_deb")"
dpkg-deb -x "$busybox_deb" "$WORK/busybox" >>"$LOG" 2>&1 || fail "corrupt download? delete $CACHE and retry (output: $LOG)"
if [ "$ARCH" != "$HOST_ARCH" ]; then
    step="dpkg-deb -x $(basename "$applets_deb")"
    dpkg-deb -x "$applets_deb" "$WORK/applets" >>"$LOG" 2>&1 || fail "corrupt download? delete $CACHE and retry (output: $LOG)"
fi

step="finding the kernel"
# bookworm ships modules under /lib/modules; newer releases under /usr/lib/modules.
moddir=$(compgen -G "$WORK/kernel/lib/modules/*" || compgen -G "$WORK/kernel/usr/lib/modules/*" || true)
moddir=$(head -n1 <<<"$moddir")
[ -n "$moddir" ] && [ -d "$moddir" ] || fail "no lib/modules/VERSION in $kernel_deb"
kver=$(basename "$moddir")
[ -f "$WORK/kernel/boot/vmlinuz-$kver" ] || fail "no boot/vmlinuz-$kver in $kernel_deb"

# -- modules ------------------------------------------------------------------------------------
step="depmod"
# The .deb has no modules.dep (its postinst runs depmod), so generate one for the extracted tree.
command -v depmod >/dev/null || PATH=$PATH:/usr/sbin:/sbin
command -v depmod >/dev/null || fail "depmod not found: apt-get install kmod"
depmod -b "${moddir%/lib/modules/*}" "$kver" >>"$LOG" 2>&1 || fail "see $LOG"

step="resolving NIC modules"
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,dev,etc,proc,sys,run,tmp,lib/modules}
# modules.dep lists a module's dependencies so that loading them last-to-first works (as
# modprobe does); collect that order, each module once, into lib/modules/load.order.
declare -A seen=()
order=()
copy_module() { # REL (a path in modules.dep) -> lib/modules/NAME.ko of the initrd
    local rel=$1 base
    base=$(basename "$rel")
    # bookworm's modules are uncompressed (CONFIG_MODULE_COMPRESS_NONE). Later kernels compress
    # them, and busybox insmod only reads compressed modules if built to, so decompress here:
    # the initrd is gzipped as a whole anyway. (A module's signature is inside the compressed
    # data, so it still loads under Secure Boot's lockdown.)
    case "$base" in
    *.ko) cp "$moddir/$rel" "$ROOT/lib/modules/$base" ;;
    *.ko.xz) xz -dc "$moddir/$rel" >"$ROOT/lib/modules/${base%.xz}" ;;
    *.ko.zst) zstd -qdc "$moddir/$rel" >"$ROOT/lib/modules/${base%.zst}" ;;
    *.ko.gz) gzip -dc "$moddir/$rel" >"$ROOT/lib/modules/${base%.gz}" ;;
    *) fail "unexpected module file $rel" ;;
    esac || fail "cannot decompress $rel (install xz-utils/zstd)"
}
for name in "${NIC_MODULES[@]}"; do
    line=$(grep -E "(^|/)${name}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" || true)
    if [ -z "$line" ] && grep -qE "(^|/)${name}\.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
        continue # built into this kernel
    fi
    [ -n "$line" ] || fail "module $name is not in $kver's modules.dep; is it built in? drop it from NIC_MODULES"
    read -r -a deps <<<"${line#*:}"
    chain=()
    for ((i = ${#deps[@]} - 1; i >= 0; i--)); do chain+=("${deps[i]}"); done
    chain+=("${line%%:*}")
    for rel in "${chain[@]}"; do
        [ -z "${seen[$rel]:-}" ] || continue
        seen[$rel]=1
        copy_module "$rel"
        base=$(basename "$rel")
        order+=("${base%.ko*}.ko")
    done
done
printf '%s\n' "${order[@]}" >"$ROOT/lib/modules/load.order"
step="copying EFI modules"
for name in "${EFI_MODULES[@]}"; do
    line=$(grep -E "(^|/)${name}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" || true)
    [ -n "$line" ] || continue # built into this kernel: nothing to load
    [ -z "${line#*:}" ] || fail "module $name has dependencies now (${line#*:}); load them in /init too"
    copy_module "${line%%:*}"
done

# -- busybox ------------------------------------------------------------------------------------
step="installing busybox"
cp "$WORK/busybox/bin/busybox" "$ROOT/bin/busybox"
# One symlink per applet, from the static binary's own list (it runs on the amd64 build host;
# for a foreign architecture the host's build of the same package lists them).
lister=$ROOT/bin/busybox
[ "$ARCH" = "$HOST_ARCH" ] || lister=$WORK/applets/bin/busybox
applets=$("$lister" --list) || fail "cannot run the extracted busybox (not an amd64 host?)"
for applet in $applets; do
    [ "$applet" = busybox ] || ln -s busybox "$ROOT/bin/$applet"
done
ln -s bin "$ROOT/sbin"

# -- /init and the udhcpc script ----------------------------------------------------------------
step="writing /init"
cat >"$ROOT/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# Called by udhcpc with $1 = deconfig | bound | renew | leasefail | nak and the lease in the
# environment ($ip, $mask as a prefix length, $router, $dns, $interface).
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound | renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    # Only the first router: one default route is all this OS needs.
    [ -z "$router" ] || ip route replace default via "${router%% *}" dev "$interface"
    : >/etc/resolv.conf
    for server in $dns; do echo "nameserver $server" >>/etc/resolv.conf; done
    ;;
esac
exit 0
EOF

cat >"$ROOT/init" <<'EOF'
#!/bin/sh
# Pixiebox test OS: get an address, fetch the SSH keys from the appliance, say "up", stay up.
# Every line for the tests (and people) reading the serial console starts with PIXIEBOX-TESTOS:.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The kernel opened /dev/console for us only if the initramfs had one; after devtmpfs it exists.
exec </dev/console >/dev/console 2>&1
# Console loglevel 4 (as with "quiet"): driver chatter would otherwise split our lines.
echo 4 >/proc/sys/kernel/printk

say() { echo "PIXIEBOX-TESTOS: $*"; }
uptime_s() { read -r up _ </proc/uptime && echo "${up%.*}"; }
stay_up() {
    # PID 1 must never exit (the kernel would panic); keep the console readable instead.
    if [ "$poweroff" = 1 ]; then
        say "powering off (pixiebox.poweroff=1)"
        poweroff -f
    fi
    while :; do sleep 3600; done
}

say started
set -f # the command line is data: no globbing
url="" name="" mac="" bootif="" poweroff=""
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
    pixiebox.url=*) url=${arg#*=} ;;
    pixiebox.name=*) name=${arg#*=} ;;
    pixiebox.mac=*) mac=${arg#*=} ;;
    pixiebox.poweroff=*) poweroff=${arg#*=} ;;
    BOOTIF=*) bootif=${arg#*=} ;; # pxelinux/iPXE style: 01-aa-bb-cc-dd-ee-ff (01 = Ethernet)
    esac
done
set +f
url=${url%/}
[ -n "$mac" ] || [ -z "$bootif" ] || mac=$(echo "${bootif#01-}" | tr - :)
mac=$(echo "$mac" | tr A-F a-f)
[ -z "$name" ] || hostname "$name"

# NIC drivers, dependencies first (order computed from modules.dep at build time).
while read -r module; do
    insmod "/lib/modules/$module" || say "insmod $module failed"
done </lib/modules/load.order

# Drivers probe asynchronously: wait (bounded) for the wanted interface to appear.
find_iface() {
    for dev in /sys/class/net/*; do
        i=${dev##*/}
        [ "$i" != lo ] || continue
        if [ -z "$mac" ] || [ "$(cat "$dev/address")" = "$mac" ]; then
            echo "$i"
            return 0
        fi
    done
    return 1
}
iface=""
tries=0
while [ -z "$iface" ] && [ $tries -lt 100 ]; do
    iface=$(find_iface) || { sleep 0.1; tries=$((tries + 1)); }
done
# Secure Boot as the firmware says: the SecureBoot variable (EFI global variable GUID) holds 4
# bytes of attributes, then 1 when on. Reported at phone-home: the appliance cannot see it on the
# wire. No EFI (BIOS), no efivarfs or no variable: off.
secure_boot_state() {
    efivars=/sys/firmware/efi/efivars
    # /sys/firmware/efi exists on UEFI; its efivars mount point only once efivarfs is loaded.
    [ -d /sys/firmware/efi ] || { echo off; return 0; }
    if ! grep -q " $efivars efivarfs " /proc/mounts; then
        [ ! -f /lib/modules/efivarfs.ko ] || insmod /lib/modules/efivarfs.ko 2>/dev/null
        mount -t efivarfs efivarfs "$efivars" 2>/dev/null || say "cannot mount efivarfs" >&2
    fi
    # All of it, then the 5th byte: efivarfs files cannot seek (no_llseek), so `od -j4` fails.
    # shellcheck disable=SC2046  # the words are od's numbers
    set -- $(od -An -tu1 "$efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c" 2>/dev/null)
    if [ "${5:-}" = 1 ]; then echo on; else echo off; fi
}
secure_boot=$(secure_boot_state)
say "secure boot $secure_boot"

if [ -z "$iface" ]; then
    say "no network interface${mac:+ with MAC $mac} after 10 s; staying up without network"
    stay_up
fi

ip link set lo up
ip link set "$iface" up
if ! udhcpc -i "$iface" -q -n -t 10 -T 2 -s /etc/udhcpc.script; then
    say "no DHCP lease on $iface after 10 tries; staying up without network"
    stay_up
fi
say "address $(ip -o -4 addr show dev "$iface" | awk '{print $4; exit}') via $iface"

if [ -z "$url" ]; then
    say "no pixiebox.url on the kernel command line; not fetching ssh.keys"
else
    # Retry with back-off (1, 2, 4, 8, then 15 s) for at most 60 s: the appliance may still be
    # starting. busybox 1.35's `wget -T SEC` segfaults (Debian's static and dynamic builds
    # alike), so the timeout applet bounds each try.
    got="" delay=1
    deadline=$(($(uptime_s) + 60))
    while :; do
        if timeout 10 wget -q -O /run/ssh.keys "$url/ssh.keys"; then
            got=1
            break
        fi
        left=$((deadline - $(uptime_s)))
        [ "$left" -gt 0 ] || break
        [ "$delay" -le "$left" ] || delay=$left
        sleep "$delay"
        delay=$((delay * 2))
        [ "$delay" -le 15 ] || delay=15
    done
    if [ -n "$got" ]; then
        while IFS= read -r line || [ -n "$line" ]; do
            [ -z "$line" ] || say "key $line"
        done </run/ssh.keys
    else
        say "could not fetch $url/ssh.keys for 60 s; no SSH keys"
    fi
fi
# For the appliance to mark the machine up, with what Secure Boot is; before "up" is said, so a
# test that sees "up" on the console finds the machine up in the API.
[ -z "$url" ] || timeout 10 wget -q -O /dev/null --header 'Content-Type: application/json' \
    --post-data "{\"state\": \"up\", \"secure_boot\": \"$secure_boot\"}" \
    "$url/api/v1/phone-home" 2>/dev/null || true
say "up ${name:-$(hostname)}"
stay_up
EOF
chmod 0755 "$ROOT/init" "$ROOT/etc/udhcpc.script"

# -- pack ---------------------------------------------------------------------------------------
step="packing the initrd"
cp "$WORK/kernel/boot/vmlinuz-$kver" "$WORK/vmlinuz"
# Fixed owner and mtimes, sorted names, gzip -n: the same inputs give the same bytes.
find "$ROOT" -exec touch -h -d @0 {} + || fail "touch (see $LOG)"
(cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --quiet | gzip -9n) >"$WORK/initrd" 2>>"$LOG" ||
    fail "cpio or gzip missing? apt-get install cpio (output: $LOG)"

step="installing into $OUT"
dtbs=$(compgen -G "$WORK/kernel/usr/lib/linux-image-*" | head -n1 || true)
if [ "$ARCH" != amd64 ] && [ -n "$dtbs" ]; then
    # The boards' device trees (vendor/board.dtb), for pxelinux `fdtdir` (QEMU's virt board needs
    # none: QEMU hands U-Boot and UEFI its own).
    rm -rf "$OUT/dtbs"
    cp -r "$dtbs" "$OUT/dtbs" || fail "cannot copy the device trees into $OUT"
fi
mv "$WORK/vmlinuz" "$OUT/vmlinuz"
mv "$WORK/initrd" "$OUT/initrd"
printf '%s\n' "$stamp" >"$OUT/stamp.part" && mv "$OUT/stamp.part" "$OUT/stamp"
echo "build-testos: built $OUT/vmlinuz ($kver) and $OUT/initrd ($(du -k "$OUT/initrd" | cut -f1) KiB)" >&2
