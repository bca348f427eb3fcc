"""The machines' syslog: UDP datagrams on port 514 become messages of the machine that sent them.

The OSIE forwards its journal here, so a machine that fails to join Kubernetes says why in its
own event log instead of on a screen nobody is looking at. Each datagram is one message (RFC 5426
3.1); octet-counted framing (RFC 6587) exists only on TCP and is not spoken here.

The senders are not trusted: `parse` decodes leniently, makes control characters visible and
bounds every field; `limits` gives each source a token bucket so that a machine logging in a
loop cannot flood the agent or its storage; `server` is the receiver on the lab interface.

May import: pixiebox.net (UDP sockets and the batched listener); nothing else of pixiebox: what
becomes of a message is the `on_message` callback's business.
"""

from pixiebox.syslog.limits import SourceLimiter
from pixiebox.syslog.parse import (
    FACILITY_NAMES,
    MAX_TEXT,
    SEVERITY_NAMES,
    SyslogMessage,
    parse_syslog,
    visible,
)
from pixiebox.syslog.server import SYSLOG_PORT, SyslogReceiver

__all__ = [
    "FACILITY_NAMES",
    "MAX_TEXT",
    "SEVERITY_NAMES",
    "SYSLOG_PORT",
    "SourceLimiter",
    "SyslogMessage",
    "SyslogReceiver",
    "parse_syslog",
    "visible",
]
