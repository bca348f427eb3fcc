"""Pixiebox benchmarks against Kea, dnsmasq, tftpd-hpa and nginx (`sudo ./build.sh bench`)."""
