#!/bin/sh
# dhclient hook script for Pixiebox integration tests (used with `dhclient -sf`).
#
# Replaces ISC's /sbin/dhclient-script: it only ever touches the interface it is
# called for (inside the test's network namespace) and NEVER /etc/resolv.conf,
# routes or any other host configuration.
#
# BOUND/RENEW/REBIND/REBOOT: put new_ip_address/new_subnet_mask on $interface
#   (flushing any other IPv4 address first).
# PREINIT: bring the link up.
# Anything else (EXPIRE, FAIL, RELEASE, STOP, TIMEOUT, ...): only logged.
# TIMEOUT exits 1 so that dhclient does not treat a stale cached lease as bound.
#
# Every invocation appends one JSON line to $PIXIEBOX_EVENTS (if set; pass it with
# `dhclient -e PIXIEBOX_EVENTS=/path`) and logs one line to stderr.

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

log() {
    echo "dhclient-script: $*" >&2
}

# JSON string body: drop control characters, escape backslash and double quote.
json_str() {
    printf '%s' "$1" | tr -d '\000-\037' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'
}

write_event() {
    [ -n "${PIXIEBOX_EVENTS:-}" ] || return 0
    line="{\"reason\":\"$(json_str "${reason:-}")\""
    for var in interface new_ip_address new_subnet_mask new_routers \
        new_domain_name_servers new_domain_name new_host_name new_dhcp_lease_time \
        new_dhcp_server_identifier new_next_server new_filename old_ip_address; do
        eval "val=\${$var:-}"
        line="$line,\"$var\":\"$(json_str "$val")\""
    done
    line="$line,\"time\":\"$(date +%s)\"}"
    printf '%s\n' "$line" >>"$PIXIEBOX_EVENTS"
}

mask_to_prefix() {
    bits=0
    for octet in $(echo "$1" | tr '.' ' '); do
        case "$octet" in
            255) bits=$((bits + 8)) ;;
            254) bits=$((bits + 7)) ;;
            252) bits=$((bits + 6)) ;;
            248) bits=$((bits + 5)) ;;
            240) bits=$((bits + 4)) ;;
            224) bits=$((bits + 3)) ;;
            192) bits=$((bits + 2)) ;;
            128) bits=$((bits + 1)) ;;
        esac
    done
    echo "$bits"
}

apply_address() {
    if [ -z "${new_ip_address:-}" ] || [ -z "${interface:-}" ]; then
        log "$reason without new_ip_address/interface; nothing applied"
        return 0
    fi
    prefix=$(mask_to_prefix "${new_subnet_mask:-255.255.255.255}")
    wanted="$new_ip_address/$prefix"
    current=$(ip -4 -o addr show dev "$interface" | awk '{print $4}')
    if [ -n "$current" ] && [ "$current" != "$wanted" ]; then
        log "flushing $current from $interface"
        ip -4 addr flush dev "$interface"
    fi
    ip -4 addr replace "$wanted" broadcast + dev "$interface"
}

status=0
case "${reason:-}" in
    BOUND | RENEW | REBIND | REBOOT)
        log "$reason $interface ${old_ip_address:-none} -> $new_ip_address/${new_subnet_mask:-}"
        apply_address || status=1
        ;;
    PREINIT)
        log "$reason $interface"
        ip link set dev "$interface" up || status=1
        ;;
    TIMEOUT)
        log "$reason $interface (cached lease not used)"
        status=1
        ;;
    *)
        log "${reason:-<no reason>} ${interface:-}"
        ;;
esac
write_event
exit "$status"
