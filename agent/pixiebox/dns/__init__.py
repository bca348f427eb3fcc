"""DNS for the lab: `<machine>.<domain>` and its reverse record answered here, the rest forwarded.

So nobody has to read the home router's client list to learn which address a node got. The
appliance is authoritative (AA set) for the lab domain: A for a known name, PTR for its
address, NODATA (NOERROR, no answer, SOA in authority: RFC 2308 section 2.2) for another type
of a known name, NXDOMAIN with the SOA (RFC 2308 section 2.1) for an unknown name under the
domain. Everything else, including reverse names of addresses no machine has, goes to the
upstream resolvers in order, over UDP, and over TCP for TCP clients and truncated answers
(RFC 7766 section 5); when every upstream fails the client gets SERVFAIL instead of silence.
Lab names are answered to any source that reaches the server (it listens on the lab interface
only); forwarding is only for sources in `forward_for` (lab.toml `[dns] forward_for`, the lab
subnet by default), anyone else gets REFUSED: the appliance is no open resolver.

dnslib (pinned in pyproject.toml) is only the codec: parse, reply, pack. The sockets are the
asyncio loop's; no threads. A malformed packet is counted and logged at debug level and never
stops the server.

Modules: `wire` (RFC numbers, names as bytes, replies), `zone` (the lab's names and PTRs, their
answers packed in advance), `forward` (who may have names forwarded, the upstreams over UDP and
TCP, the in-flight bound),
`server` (the sockets, the fast path and the dnslib path, TCP clients).

May import: pixiebox.net (UDP sockets and the batched listener) and dnslib; nothing else of
pixiebox: the records come in as a callable.
"""

from pixiebox.dns.forward import MAX_FORWARDS
from pixiebox.dns.server import MAX_TCP_CLIENTS, TCP_IDLE, DnsServer
from pixiebox.dns.wire import CLASSIC_UDP_SIZE, DNS_PORT, EDNS_UDP_SIZE, question_end

__all__ = [
    "CLASSIC_UDP_SIZE",
    "DNS_PORT",
    "EDNS_UDP_SIZE",
    "MAX_FORWARDS",
    "MAX_TCP_CLIENTS",
    "TCP_IDLE",
    "DnsServer",
    "question_end",
]
