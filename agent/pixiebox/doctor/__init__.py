"""`pixiebox doctor`: why did (or didn't) a machine boot?

Reads a machine's event log the way someone who knows PXE would: splits it into boot attempts
(attempts), finds how far the last attempt got and says in plain words what happened, the
likely cause and what to do next (verdict; where Secure Boot or the signed chain is the likely
cause: secure_boot, which also names it as a code), and shows the attempts as a timeline
(render); the API's report and query parameters are in report. Pure logic, no I/O: the caller
hands in the events and the clock. It decides from event kinds and fields only
(pixiebox.events), never from the sentences, so rewording a log line cannot change a diagnosis.

May import: core (events, lifecycle states, wording), config (MAC spelling), store (how many
events a machine keeps). Imported by the API, the CLI and `lab up`.
"""

from __future__ import annotations

from pixiebox.doctor.attempts import ATTEMPT_GAP, split_attempts
from pixiebox.doctor.render import render, render_text, timeline
from pixiebox.doctor.report import (
    EVENTS,
    QUERY_PARAMETERS,
    DoctorReport,
    report,
    seconds_parameter,
    unknown_machine,
)
from pixiebox.doctor.secure_boot import CAUSES
from pixiebox.doctor.verdict import (
    DEFAULT_BOOT_TIMEOUT,
    DEFAULT_SETTLE,
    KEPT_ATTEMPTS,
    Diagnosis,
    diagnose,
)

__all__ = [
    "ATTEMPT_GAP",
    "CAUSES",
    "DEFAULT_BOOT_TIMEOUT",
    "DEFAULT_SETTLE",
    "EVENTS",
    "KEPT_ATTEMPTS",
    "QUERY_PARAMETERS",
    "Diagnosis",
    "DoctorReport",
    "diagnose",
    "render",
    "render_text",
    "report",
    "seconds_parameter",
    "split_attempts",
    "timeline",
    "unknown_machine",
]
