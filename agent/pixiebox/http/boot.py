"""Boot HTTP: the URLs a machine fetches between DHCP and a running kernel.

- `/boot/{mac}.ipxe`: the machine's iPXE script (which image, or "move on" for ignored ones);
- `/assets/{path}`: kernels and initrds under [boot] assets, with Range and conditional GETs;
- `/ipxe/{name}`: iPXE builds for UEFI HTTP boot clients (arch 16 and 19);
- `/ssh.keys`: [boot] ssh_keys, for the OSIE;
- `/pxelinux.cfg/{01-mac | default}`: the same decision for U-Boot boards.

The decision itself is core.decision's (`Inventory.decide`): this module only turns it
into text and files. Every step is logged in one line that names the machine and says what comes
next, and reported to `on_event` as a `BootEvent`: its kind and fields (pixiebox.events), a
sentence, and `who`, the machine's MAC when known, else the client's address.

No boot URL redirects (docs/firmware-quirks.md#23: UEFI HTTP boot fails on a 301), so the router's
trailing-slash redirects are off and `//` inside an asset path is accepted as `/`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from pixiebox.boot.ipxe_script import ignore_script, ipxe_script
from pixiebox.boot.pxelinux import pxelinux_for
from pixiebox.config import LabConfig, normalize_mac
from pixiebox.core import wording
from pixiebox.core.decision import BootDecision, Silence
from pixiebox.core.firmware import DEFAULT_ARCH, ArchInfo, Assets, arch_info
from pixiebox.core.inventory import Inventory
from pixiebox.core.trust import Verdict
from pixiebox.core.urls import BootUrls
from pixiebox.events import Fields, Kind
from pixiebox.http.files import Outcome, TrackedFile, TransferDone, not_modified
from pixiebox.http.metadata import metadata_response
from pixiebox.http.phonehome import phone_home_response
from pixiebox.http.script_cache import KeptScript, ScriptCache, rendering
from pixiebox.net import paths
from pixiebox.net.limits import LogLimiter
from pixiebox.store.identity import IdentityStore

log = logging.getLogger("pixiebox.http")


@dataclass(frozen=True, slots=True)
class BootEvent:
    """A boot step seen over HTTP. `who` is the machine's MAC when the URL or the address told
    it, else the client's address (the agent looks the MAC up, as for TFTP)."""

    kind: Kind
    who: str
    message: str
    fields: Fields = field(default_factory=dict)


EventSink = Callable[[BootEvent], None]

#: U-Boot fetches pxelinux.cfg without saying its architecture; DHCP recorded the exact option-93
#: code a moment earlier (docs/firmware-quirks.md#30: 21 armv7, 22 armv8), most boards are armv8.

# ${buildarch} and ${platform} of the running iPXE build to the option-93 code of the firmware
# that runs it (RFC 4578 2.1): BIOS iPXE (undionly.kpxe) is an i386 build even on x86-64.
_BUILDARCH_CODES: dict[tuple[str, str | None], int] = {
    ("i386", "pcbios"): 0,
    ("x86_64", "pcbios"): 0,
    ("i386", "efi"): 6,
    ("x86_64", "efi"): 7,
    ("arm32", "efi"): 10,
    ("arm64", "efi"): 11,
    ("riscv64", "efi"): 27,
    ("i386", None): 0,
    ("x86_64", None): 7,
    ("arm32", None): 10,
    ("arm64", None): 11,
    ("riscv64", None): 27,
}

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
#: The fields of a boot.ignored event sent over HTTP ([boot] unknown = "ignore").
_IGNORED: Fields = {"reason": "unknown-ignored", "protocol": "http"}


def _no_events(event: BootEvent) -> None:
    return None


@dataclass
class BootHttpState:
    """What the boot HTTP app needs from the agent."""

    inventory: Inventory
    urls: BootUrls
    assets: Assets
    on_event: EventSink = _no_events
    #: SSH host keys and k3s node passwords for /metadata; None: /metadata answers 503.
    identities: IdentityStore | None = None
    #: Boot files sent, for /metrics: "bytes", and transfers by outcome.
    stats: Counter[str] = field(default_factory=Counter)

    def emit(self, kind: Kind, who: str, message: str, fields: Fields | None = None) -> None:
        try:
            self.on_event(BootEvent(kind, who, message, dict(fields or {})))
        except Exception:
            # A broken event consumer must not stop a machine from booting.
            log.exception("recording the %s event for %s failed", kind, who)


def arch_from_query(arch: str | None, platform: str | None = None) -> ArchInfo | None:
    """The firmware behind `?arch=` (iPXE's ${buildarch}, or an option-93 code) and
    `?platform=` (${platform}: pcbios or efi); DEFAULT_ARCH when absent, None when unknown."""
    if arch is None or not arch.strip():
        return DEFAULT_ARCH
    text = arch.strip().lower()
    if text.isascii() and text.isdigit() and len(text) <= 5:  # "²" is a digit int() refuses
        return arch_info(int(text))
    key = (text, platform.strip().lower() if platform else None)
    code = _BUILDARCH_CODES.get(key)
    if code is None:
        code = _BUILDARCH_CODES.get((text, None))
    return None if code is None else arch_info(code)


def client_ip(request: Request) -> IPv4Address | None:
    client = request.client
    if client is None:
        return None
    try:
        return IPv4Address(client.host)
    except ValueError:
        return None


def bearer_token(request: Request) -> str | None:
    """The boot token an OS presents (`Authorization: Bearer <token>`, core.trust)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


#: net.paths' refusals as (HTTP status, the log's words): a name that cannot mean a file is a
#: 404, one that tries to reach beyond the assets or cannot be read a 403.
_REFUSALS: dict[paths.Reason, tuple[int, str]] = {
    "no-name": (404, "names no file"),
    "climbs-out": (403, "climbs out of the assets directory"),
    "outside": (403, "leads outside the assets directory (to {target})"),
    "not-a-file": (404, "is not a file ({target})"),
    "unreadable": (403, "cannot be read: {error}"),
}


class Refused(Exception):
    """An asset request that names no servable file: `status` and a reason for the log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def resolve_asset(root: Path, requested: str) -> tuple[Path, os.stat_result]:
    """The real path and stat of `requested` under `root`, or Refused.

    net.paths decides, by the rule TFTP follows too: neither `..` (also when sent as %2e%2e,
    which the server decodes before routing) nor a symlink can reach outside the root."""
    try:
        target, result = paths.stat_file(root, requested)
    except paths.PathRefused as refused:
        status, words = _REFUSALS[refused.reason]
        raise Refused(status, words.format(target=refused.target, error=refused.error)) from None
    if result is None:
        raise Refused(404, f"does not exist ({target})")
    return target, result


def _file_role(config: LabConfig, path: str) -> tuple[str, str] | None:
    """("kernel" | "initrd", what comes next) when some image boots the asset at `path`."""
    wanted = paths.split(path)
    images = config.images.values()
    builds = [[i.kernel, *i.initrd] for i in images]  # and each architecture's build:
    builds += [[a.kernel, *a.initrd] for i in images for a in i.arch.values()]
    for files in builds:
        for index, candidate in enumerate(files):
            if paths.split(candidate) != wanted:
                continue
            role = "kernel" if index == 0 else "initrd"
            following = files[index + 1 :]
            return role, f"initrd {following[0]}" if following else "starting the kernel"
    return None


def _script(text: str | bytes, status_code: int = 200) -> Response:
    # A script is a decision made now (enrollment, policy): no client may keep an old one (the
    # agent itself hands one out again only as http.script_cache says).
    return PlainTextResponse(text, status_code, headers={"Cache-Control": "no-store"})


def _request_target(request: Request) -> bytes:
    """The request's target as the client sent it (path and query, undecoded): what
    http.script_cache keeps scripts by, the same bytes the server's protocol sees."""
    scope = request.scope
    query: bytes = scope.get("query_string", b"")
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    return raw + b"?" + query if query else raw


class _Handlers:
    def __init__(self, state: BootHttpState) -> None:
        self.state = state
        #: For lines any client on the lab segment can cause at will (a URL naming no MAC, a
        #: missing or refused file): one a kind every few seconds, the rest counted.
        self.outsider_lines = LogLimiter(log)
        #: Scripts handed out again as they are to a machine that fetches its own again at once.
        self.scripts = ScriptCache(state.inventory)

    @property
    def inventory(self) -> Inventory:
        return self.state.inventory

    def _describe(self, ip: IPv4Address | None) -> str:
        return self.inventory.describe_address(ip) if ip is not None else "a client"

    def _who_id(self, ip: IPv4Address | None) -> str:
        if ip is None:
            return "unknown"
        return self.inventory.mac_at(ip) or str(ip)

    # /boot/{mac}.ipxe

    async def boot_script(self, request: Request) -> Response:
        raw = str(request.path_params["mac"])
        ip = client_ip(request)
        target = _request_target(request)
        if ip is not None:
            again = self.scripts.find(target, str(ip))
            if again is not None:
                # The same boot step fetched again (http.script_cache): nothing new to record.
                return _script(again.body)
        try:
            mac = normalize_mac(raw)
        except ValueError:
            self.outsider_lines.log(
                "not-a-mac", logging.INFO,
                "%s asked for /boot/%s.ipxe, which names no MAC address",
                ip, paths.printable(raw[:64]),
            )  # fmt: skip
            return PlainTextResponse(
                f"{raw!r} is not a MAC address: ask for /boot/<mac>.ipxe, "
                "e.g. /boot/f4:4d:30:64:7a:3a.ipxe\n",
                400,
            )
        query = request.query_params
        # No ?arch=: DHCP already recorded the firmware (option 93), keep that (None below).
        arch = arch_from_query(query.get("arch"), query.get("platform"))
        if "arch" not in query:
            arch = None
        elif arch is None:
            self.outsider_lines.log(
                "unknown-arch", logging.WARNING,
                "%s sent arch=%r, which Pixiebox does not know; treating it as %s",
                mac, query.get("arch", "")[:64], DEFAULT_ARCH.label,
            )  # fmt: skip
            arch = DEFAULT_ARCH
        # The URL's MAC is only a claim: the script is public (which kernel, which initrds),
        # but only the machine itself, proven by its neighbour entry, is recorded as booting
        # and gets a boot token (core.trust): a client naming another MAC moves nothing.
        owner = self.inventory.prove(ip, mac)
        if not owner.proven:
            return self._script_for_a_bystander(mac, arch, ip, owner)
        verdict = self.inventory.decide(mac, arch)
        self.inventory.seen(mac, arch)
        if verdict.silent is Silence.UNKNOWN_IGNORED:
            reason = (
                f"unknown machine {mac} is not booted ([boot] unknown = ignore); "
                f"enroll it with: pixiebox enroll {mac} --name NAME"
            )
            log.info(
                "%s fetched its iPXE script; told it to move on to its next boot device "
                "([boot] unknown = ignore); enroll it with: pixiebox enroll %s --name NAME",
                verdict.who,
                mac,
            )
            self.state.emit(Kind.BOOT_IGNORED, mac, reason, _IGNORED)
            return self._kept(target, mac, ip, arch, verdict, None, ignore_script(mac, reason))
        booted, image_name = verdict.image, verdict.image_name
        if booted is None:
            reason = (
                f"{verdict.who} should boot image {image_name}, but lab.toml has no "
                f"[images.{image_name}]; add it, or give the machine another image"
            )
            log.error("%s", reason)
            self.state.emit(Kind.HTTP_FAILED, mac, reason, {"file": request.url.path,
                            "reason": "no-image", "image": image_name, "status": 200})  # fmt: skip
            return self._kept(target, mac, ip, arch, verdict, None, ignore_script(mac, reason))
        image, image_name = booted.section, booted.name
        name = verdict.name
        default = "" if verdict.known else f" (default image {image_name})"
        log.info(
            "%s fetched its iPXE script%s; next: kernel %s", verdict.who, default, image.kernel
        )
        self.state.emit(
            Kind.HTTP_SCRIPT,
            mac,
            f"fetched its iPXE script for image {image_name}; next: kernel {image.kernel}",
            {"file": request.url.path, "image": image_name, "kernel": image.kernel,
             "initrds": ",".join(image.initrd)},
        )  # fmt: skip
        # The token is on disk before the script that carries it leaves (an appliance restarted
        # mid-boot still knows it), in the one COMMIT of this loop turn's requests.
        token = self.inventory.tokens.issue(mac)
        text = ipxe_script(
            self.state.urls, image, mac=mac, name=name, image_name=image_name, token=token
        )
        response = _script(text)
        # What the script was made from is read now, with this fetch's writes; it is kept for
        # a repeated fetch only once its token is stored.
        kept = self._keeping(mac, ip, arch, verdict, token, response) if ip is not None else None
        await self.inventory.tokens.committed()
        if kept is not None:
            self.scripts.keep(target, kept)
        return response

    def _kept(
        self,
        target: bytes,
        mac: str,
        ip: IPv4Address | None,
        arch: ArchInfo | None,
        decision: BootDecision,
        token: str | None,
        text: str,
    ) -> Response:
        """The script answer to the machine itself, kept for a repeated fetch."""
        response = _script(text)
        if ip is not None:
            self.scripts.keep(target, self._keeping(mac, ip, arch, decision, token, response))
        return response

    def _keeping(
        self,
        mac: str,
        ip: IPv4Address,
        arch: ArchInfo | None,
        decision: BootDecision,
        token: str | None,
        response: Response,
    ) -> KeptScript:
        return KeptScript(
            mac=mac, source=str(ip), address=ip, arch=arch,
            lab=self.inventory.lab, rendering=rendering(decision), token=token,
            last_seen=self.scripts.last_seen(mac), made=self.scripts.now(),
            head=b"".join(name + b": " + value + b"\r\n" for name, value in response.raw_headers),
            body=bytes(response.body),
        )  # fmt: skip

    def _script_for_a_bystander(
        self, mac: str, arch: ArchInfo | None, ip: IPv4Address | None, owner: Verdict
    ) -> Response:
        """`mac`'s script for a client the evidence does not show to be `mac`: what the script
        boots is no secret, so it is served, but without a boot token and without recording
        anything in `mac`'s name; the refusal of the token is recorded."""
        self.inventory.refuse(mac, "boot-token", ip, owner)
        decision = self.inventory.decide(mac, arch)
        booted = decision.image
        if booted is None:
            return _script(ignore_script(mac, "no image is booted for this machine here"))
        return _script(ipxe_script(
            self.state.urls, booted.section, mac=mac, name=decision.name, image_name=booted.name
        ))  # fmt: skip

    # /assets/{path}

    async def asset(self, request: Request) -> Response:
        requested = str(request.path_params["path"])
        ip = client_ip(request)
        root = self.state.assets.root
        try:
            path, stat_result = resolve_asset(root, requested)
        except Refused as refused:
            role = _file_role(self.inventory.config, requested)
            shown = paths.printable(requested)
            what = f"the {role[0]} {shown}" if role else f"assets/{shown}"
            if refused.status == 404:
                self.outsider_lines.log(
                    f"missing-{'role' if role else 'asset'}", logging.WARNING,
                    "%s asked for %s, which %s; put the file in %s or fix lab.toml",
                    self._describe(ip), what[:200], refused.reason, root,
                )  # fmt: skip
                if role:
                    self.state.emit(
                        Kind.HTTP_FAILED, self._who_id(ip), f"{what} {refused.reason}",
                        {"file": request.url.path, "reason": "missing", "status": 404},
                    )  # fmt: skip
            else:
                # One kind per refusal rule (the fixed words before any detail): a bounded set.
                self.outsider_lines.log(
                    "refused " + refused.reason.partition(" (")[0].partition(":")[0],
                    logging.WARNING,
                    "refused %s's request for %s: the path %s",
                    self._describe(ip), what[:200], refused.reason,
                )  # fmt: skip
            # The reason (with server paths) goes to the log, not to the client.
            text = "not found\n" if refused.status == 404 else "access denied\n"
            return PlainTextResponse(text, refused.status)
        role = _file_role(self.inventory.config, requested)
        label = f"the {role[0]} {requested}" if role else f"assets/{requested}"
        started = time.monotonic()

        def done(status: int, complete: bool, sent: int, error: BaseException | None) -> None:
            outcome = Outcome(status, complete, sent, error, time.monotonic() - started)
            self._transfer_done(request, ip, label, role, stat_result.st_size, outcome)

        return self._file(request, path, stat_result, done)

    def _file(
        self, request: Request, path: Path, stat_result: os.stat_result, done: TransferDone
    ) -> Response:
        response = TrackedFile(path, stat_result, done)
        etag = response.headers.get("etag", "")
        if request.method in ("GET", "HEAD") and not_modified(
            request.headers, etag, stat_result.st_mtime
        ):
            headers = {"etag": etag, "last-modified": response.headers["last-modified"]}
            return Response(status_code=304, headers=headers)
        return response

    def _transfer_done(
        self,
        request: Request,
        ip: IPv4Address | None,
        label: str,
        role: tuple[str, str] | None,
        size: int,
        outcome: Outcome,
    ) -> None:
        if request.method == "HEAD":
            return
        status, complete, sent, error = (outcome.status, outcome.complete, outcome.sent,
                                         outcome.error)  # fmt: skip
        stats = self.state.stats
        stats["bytes"] += sent if sent else (size if complete else 0)
        stats["complete" if complete else "broken"] += 1
        who = self._describe(ip)
        if status != 200:
            # Range requests (206) are pieces by design; errors were answered by FileResponse.
            log.debug("%s: %s for %s, %d bytes", who, status, label, sent)
            return
        if complete:
            if role is None:
                log.debug("%s received %s (%s)", who, label, wording.size(size))
                return
            took = wording.span(outcome.seconds)
            log.info("%s received %s (%s in %s); next: %s", who, label, wording.size(size), took,
                     role[1])  # fmt: skip
            self.state.emit(
                Kind.HTTP_KERNEL if role[0] == "kernel" else Kind.HTTP_INITRD,
                self._who_id(ip),
                f"received {label} ({wording.size(size)} in {took})",
                {"file": request.url.path, "bytes": size, "seconds": round(outcome.seconds, 3)},
            )
            return
        how = f": {error}" if error is not None else ""
        # A failed sendfile does not say how far it got: then only "before the end" is known.
        part = (
            f"after {wording.size(sent)} of {wording.size(size)}"
            if 0 < sent < size
            else "before the end"
        )
        log.warning("%s broke off the download of %s %s%s", who, label, part, how)
        if role is not None:
            self.state.emit(
                Kind.HTTP_FAILED,
                self._who_id(ip),
                f"broke off the download of {label} {part}",
                {"file": request.url.path, "reason": "broken", "bytes": sent, "status": status},
            )

    # /ipxe/{name}

    async def ipxe_binary(self, request: Request) -> Response:
        name = str(request.path_params["name"])
        ip = client_ip(request)
        found = self.state.assets.ipxe_binary(name) if _SAFE_NAME.fullmatch(name) else None
        if found is None:
            shown = paths.printable(name[:100])
            self.outsider_lines.log(
                "missing-ipxe", logging.WARNING,
                "%s asked for the iPXE build %s, which this appliance does not have; copy it to %s",
                self._describe(ip), shown, self.state.assets.root / "ipxe" / shown,
            )  # fmt: skip
            return PlainTextResponse("not found\n", 404)  # the hint names a server path
        real = Path(os.path.realpath(found))
        stat_result = real.stat()
        label = f"the iPXE build {name}"

        def done(status: int, complete: bool, sent: int, error: BaseException | None) -> None:
            if request.method != "HEAD" and status == 200 and complete:
                log.info("%s received %s; next: its iPXE script", self._describe(ip), label)
            elif request.method != "HEAD" and status == 200:
                log.warning("%s broke off the download of %s", self._describe(ip), label)

        return self._file(request, real, stat_result, done)

    # /ssh.keys

    async def ssh_keys(self, request: Request) -> Response:
        keys = [key.strip() for key in self.inventory.config.boot.ssh_keys if key.strip()]
        log.info("%s fetched the SSH keys (%d)", self._describe(client_ip(request)), len(keys))
        return PlainTextResponse("".join(f"{key}\n" for key in keys))

    # /api/v1/phone-home: the booted OS says it is up (http.phonehome)

    async def phone_home(self, request: Request) -> Response:
        return await phone_home_response(self.inventory, request, client_ip(request))

    # /metadata: the calling machine's own metadata, found by its source address

    async def metadata(self, request: Request) -> Response:
        return await metadata_response(
            self.inventory, self.state.urls, self.state.identities, client_ip(request),
            bearer_token(request),
        )  # fmt: skip

    # /pxelinux.cfg/{name}

    async def pxelinux(self, request: Request) -> Response:
        text = pxelinux_for(
            self.inventory, self.state.urls, str(request.path_params["name"]),
            client_ip(request), self.state.emit,
        )  # fmt: skip
        return PlainTextResponse("not found\n", 404) if text is None else _script(text)


def boot_app(state: BootHttpState) -> Starlette:
    """The boot HTTP application (served by `BootHttpServer`)."""
    handlers = _Handlers(state)
    routes = [
        Route("/boot/{mac}.ipxe", handlers.boot_script, methods=["GET"]),
        Route("/assets/{path:path}", handlers.asset, methods=["GET", "HEAD"]),
        Route("/ipxe/{name}", handlers.ipxe_binary, methods=["GET", "HEAD"]),
        Route("/ssh.keys", handlers.ssh_keys, methods=["GET"]),
        Route("/pxelinux.cfg/{name}", handlers.pxelinux, methods=["GET"]),
        Route("/api/v1/phone-home", handlers.phone_home, methods=["POST"]),
        Route("/metadata", handlers.metadata, methods=["GET"]),
    ]
    app = Starlette(routes=routes)
    # docs/firmware-quirks.md#23: UEFI HTTP boot fails on a redirect (the router's slash one).
    app.router.redirect_slashes = False
    app.state.boot = state
    # A machine's own script fetched again is answered by the server's protocol from here
    # (BootHttpServer reads it: http.connlimit's FastAnswer).
    app.state.scripts = handlers.scripts
    app.state.fast_answer = handlers.scripts.answer
    return app
