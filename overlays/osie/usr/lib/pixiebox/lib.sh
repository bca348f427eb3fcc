# Shared by the OSIE's scripts (sourced, not run). Bash; the OSIE has no Python.
#
# Every path the scripts read or write goes through root(), so tests run the real scripts on a
# development machine against a scratch directory:
#
#   PIXIEBOX_ROOT=/tmp/x     prefix of every file read or written (default "": the real root)
#   PIXIEBOX_SANDBOX=1       touch only files: no kernel hostname, no udevadm
#   PIXIEBOX_METADATA=FILE   use this metadata document instead of fetching it (tests, and
#                            re-applying a hand-edited document on a node while debugging)
#   PIXIEBOX_RETRY_CAP=30    longest wait between two tries at the appliance, in seconds
#   PIXIEBOX_MAX_TRIES=0     give up after this many tries (0: never; the lab powers on at
#                            once and the appliance may come up last)

PIXIEBOX_ROOT=${PIXIEBOX_ROOT:-}
PIXIEBOX_SANDBOX=${PIXIEBOX_SANDBOX:-0}
PIXIEBOX_RETRY_CAP=${PIXIEBOX_RETRY_CAP:-30}
PIXIEBOX_MAX_TRIES=${PIXIEBOX_MAX_TRIES:-0}

#: Where pixiebox-osie keeps the fetched document for the units after it (0600: it holds
#: secrets; /run is RAM, like everything here).
METADATA_FILE=/run/pixiebox/metadata.json

root() { printf '%s%s' "$PIXIEBOX_ROOT" "$1"; }

# One human sentence per line on the console and in the journal (the units send stdout to
# both); systemd-netlogd forwards the journal to the appliance, so these sentences also land in
# the machine's event log there.
say() { printf 'pixiebox: %s\n' "$*"; }
warn() { printf 'pixiebox: warning: %s\n' "$*" >&2; }

sandboxed() { [ "$PIXIEBOX_SANDBOX" = 1 ]; }

# cmdline_arg NAME: the value of NAME= on the kernel command line (the agent's iPXE script puts
# pixiebox.url=, pixiebox.mac= and pixiebox.name= there), empty when absent.
cmdline_arg() {
    local word
    local -a words
    read -r -a words <"$(root /proc/cmdline)" || true
    for word in "${words[@]}"; do
        case $word in
            "$1="*) printf '%s' "${word#*=}"; return 0 ;;
        esac
    done
    return 0
}

# md FILTER: a jq filter over the metadata document, raw output ("" for null).
md() { jq -r "($1) // empty" "$(root "$METADATA_FILE")"; }

# write_file PATH MODE: stdin to PATH (under the root) whole: a temporary file in the same
# directory, then a rename, so a unit reading it never sees half a file.
write_file() {
    local path dir tmp
    path=$(root "$1")
    dir=$(dirname "$path")
    mkdir -p "$dir"
    tmp=$(mktemp "$dir/.pixiebox.XXXXXX")
    if ! cat >"$tmp" || ! chmod "$2" "$tmp" || ! mv -f "$tmp" "$path"; then
        rm -f "$tmp"
        warn "cannot write $1"
        return 1
    fi
}

# backoff_wait TRY: how long to wait after failed try number TRY: 1, 2, 4, 8, 16 s, then
# PIXIEBOX_RETRY_CAP s for every later try. The caller says what failed and sleeps.
backoff_wait() {
    local try=$1 wait=1
    while [ "$try" -gt 1 ] && [ "$wait" -lt "$PIXIEBOX_RETRY_CAP" ]; do
        wait=$((wait * 2))
        try=$((try - 1))
    done
    [ "$wait" -gt "$PIXIEBOX_RETRY_CAP" ] && wait=$PIXIEBOX_RETRY_CAP
    printf '%s' "$wait"
}

# gave_up TRY: true when PIXIEBOX_MAX_TRIES is set and TRY reached it.
gave_up() { [ "$PIXIEBOX_MAX_TRIES" -gt 0 ] && [ "$1" -ge "$PIXIEBOX_MAX_TRIES" ]; }

# curl_problem EXIT: why curl failed, in words.
curl_problem() {
    case $1 in
        6) printf 'its name does not resolve' ;;
        7) printf 'the connection was refused or the address is unreachable (the appliance is not up yet?)' ;;
        28) printf 'no answer in time' ;;
        52|56) printf 'the connection broke' ;;
        *) printf 'curl failed with exit code %s' "$1" ;;
    esac
}

#: The firmware's SecureBoot variable (EFI global variable GUID) in efivarfs, which systemd mounts.
SECURE_BOOT_VAR=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c

# secure_boot_state: "on" when the firmware says Secure Boot is on (the variable's 4 bytes of
# attributes, then 1), else "off" (BIOS, no efivarfs, no variable). The phone-home reports it:
# the appliance cannot see it on the wire (shim and GRUB fetch the same files either way).
# The whole variable is read and its 5th byte taken: efivarfs files cannot seek (no_llseek),
# so `od -j4` fails on them.
secure_boot_state() {
    local bytes
    read -r -a bytes < <(od -An -tu1 "$(root "$SECURE_BOOT_VAR")" 2>/dev/null)
    if [ "${bytes[4]:-}" = 1 ]; then printf on; else printf off; fi
}

# post_phone_home URL MAC STATE: POST {"state": STATE, "secure_boot": on|off} to the appliance.
# Sets PHONE_HOME_STATUS (the HTTP status, "000" when nothing answered), PHONE_HOME_EXIT (curl's
# exit code) and PHONE_HOME_BODY (the start of the answer: the agent explains a refusal in a
# sentence).
post_phone_home() {
    local out body
    out=$(mktemp)
    body="{\"state\": \"$3\", \"secure_boot\": \"$(secure_boot_state)\"}"
    PHONE_HOME_EXIT=0
    PHONE_HOME_STATUS=$(curl -sS --connect-timeout 5 --max-time 20 -o "$out" -w '%{http_code}' \
        -H 'Content-Type: application/json' --data "$body" \
        "$1/api/v1/phone-home?mac=$2" 2>/dev/null) || PHONE_HOME_EXIT=$?
    PHONE_HOME_STATUS=${PHONE_HOME_STATUS:-000}
    PHONE_HOME_BODY=$(head -c 300 "$out" | tr -d '\r' | tr '\n' ' ')
    rm -f "$out"
}

# phone_home STATE WHAT: post_phone_home until the appliance says ok, with the back-off of
# backoff_wait; WHAT is the sentence said on success. Returns 1 only when PIXIEBOX_MAX_TRIES
# ran out.
phone_home() {
    local url mac try=1 wait why
    url=$(md .appliance.url)
    mac=$(md .mac)
    while :; do
        post_phone_home "$url" "$mac" "$1"
        if [ "$PHONE_HOME_STATUS" = 200 ]; then
            say "$2"
            return 0
        fi
        if [ "$PHONE_HOME_STATUS" = 000 ]; then
            why=$(curl_problem "$PHONE_HOME_EXIT")
        else
            why="it answered $PHONE_HOME_STATUS: ${PHONE_HOME_BODY:-no reason given}"
        fi
        if gave_up "$try"; then
            warn "could not tell the appliance at $url that this machine is $1 ($why); giving up after $try tries"
            return 1
        fi
        wait=$(backoff_wait "$try")
        say "could not tell the appliance at $url that this machine is $1 ($why); try $try, trying again in $wait s"
        sleep "$wait"
        try=$((try + 1))
    done
}
