"""HTTP: boot HTTP and the API, on uvicorn.

`boot`: what machines fetch between DHCP and a running OS (iPXE scripts rendered from the boot
decision, kernels and initrds with Range, `/ssh.keys`, `/metadata`, the phone-home);
`metadata`: the document a booted node becomes itself from, released only to its proven owner
with its boot token (core.trust); `phonehome`: the booted OS reporting up/joined, attributed by
evidence; `api`: the JSON API under /api/v1 (machines, events with kind/fields/message, the
doctor, enroll, power, lab up/down, the SSE stream; `api_machines`: the paged listing);
`dashboard`: the web page at `/` (the files in `ui/`, served from memory, no external request);
`metrics`: /metrics; `server`: the uvicorn wrapper both listen on, with `connlimit`'s limits.

May import config, core, events, store, net, boot, doctor, power; no other protocol package
but syslog's port number.
"""
