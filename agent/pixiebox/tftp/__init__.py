"""TFTP for boot files: read-only, rooted, on the agent's asyncio loop.

- `packets`: parsing and building packets, option negotiation (RFC 1350, 2347-2349, 7440);
- `engine`: the request port and what a request becomes; it knows no files, only a Handler;
- `transfers`: the transfers under way (windows, timers, resends): the hot path; `transfer`
  one transfer's state;
- `limits`: what a client may cost ([tftp] in lab.toml), who gives way when the server is
  full, and the quota on what an outsider can make it log;
- `sockets`: the request socket and each transfer's two sockets;
- `files`: the Handler for boot files: which file a name means (net.paths' confinement);
- `outcome`: TftpEvent, the outcome of a request, and the log's sentences;
- `server`: TftpServer, the engine serving boot files, as the agent starts it.

May import `pixiebox.net` (path confinement) and `pixiebox.core.wording`; nothing else of
pixiebox, and nothing imports it but the agent.
"""

from pixiebox.tftp.engine import TFTP_PORT, Handler, NotFound, TftpEngine
from pixiebox.tftp.limits import TftpLimits
from pixiebox.tftp.outcome import EventKind, TftpEvent, next_step
from pixiebox.tftp.server import TftpServer
from pixiebox.tftp.transfers import RESEND_AFTER, RESENDS, Source

__all__ = [
    "RESENDS",
    "RESEND_AFTER",
    "TFTP_PORT",
    "EventKind",
    "Handler",
    "NotFound",
    "Source",
    "TftpEngine",
    "TftpEvent",
    "TftpLimits",
    "TftpServer",
    "next_step",
]
