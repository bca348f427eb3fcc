"""Power peers for the power-control tests, run inside a test namespace.

`plugs`: one HTTP server on port 80 that is a smart plug per local address, speaking exactly the
documented endpoints the drivers use:

- Tasmota (tasmota.github.io/docs/Commands): `GET /cm?cmnd=Power[N][ On|Off|Toggle|1|0]`
  answers `{"POWER": "ON"}`; `cmnd=Status 8` answers `{"StatusSNS": {"ENERGY": {"Power": W}}}`;
- Shelly Gen1: `GET /relay/0[?turn=on|off|toggle]` answers `{"ison": ...}`, `/meter/0` the power;
- Shelly Gen2+ RPC: `/rpc/Switch.Set?id=0&on=true|false` answers `{"was_on": ...}`,
  `/rpc/Switch.GetStatus?id=0` answers `{"id": 0, "output": ..., "apower": W}`;
- anything else (the generic `http` driver): `POST /on` and `POST /off`.

Each plug powers a fake machine: `--wire IP ON_CMD OFF_CMD` runs ON_CMD (a shell command, e.g.
"give the machine's namespace its address and phone home") when the relay at IP goes from off
to on, OFF_CMD when it goes off. A plug without a wire is one the machine is not plugged into:
its relay clicks, nothing comes up. Every request is appended to --log as a JSON line.

`wol MAC CMD`: a Wake-on-LAN "NIC" (a packet socket on eth0) that runs CMD when a frame carries
the magic packet for MAC (6 x 0xff, then the MAC 16 times).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from pixiebox.virtlab.wake import magic_macs

ON_WATTS = 9.5
ETH_P_ALL = 0x0003


class Plugs:
    def __init__(self, wires: dict[str, tuple[str, str]], log: str) -> None:
        self.wires = wires
        self.relays: dict[str, bool] = {}
        self.lock = threading.Lock()
        self.log = log

    def set(self, ip: str, on: bool) -> bool:
        """Switch the relay at `ip`; returns what it was."""
        with self.lock:
            was = self.relays.get(ip, False)
            self.relays[ip] = on
        if was != on and ip in self.wires:
            command = self.wires[ip][0 if on else 1]
            # The fake machine's power supply: bounded, and finished before the answer (a real
            # machine's power is on when the relay says so).
            subprocess.run(["sh", "-c", command], timeout=30, check=False)
        return was

    def get(self, ip: str) -> bool:
        with self.lock:
            return self.relays.get(ip, False)

    def record(self, ip: str, method: str, path: str) -> None:
        with self.lock, open(self.log, "a") as file:
            file.write(json.dumps({"plug": ip, "method": method, "path": path}) + "\n")


def handler_for(plugs: Plugs) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

        def _answer(self, body: object, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            ip = self.connection.getsockname()[0]
            plugs.record(ip, self.command, self.path)
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if url.path == "/cm" and "cmnd" in query:
                self._tasmota(ip, query["cmnd"])
            elif url.path == "/relay/0":
                turn = query.get("turn")
                if turn is not None:
                    plugs.set(ip, not plugs.get(ip) if turn == "toggle" else turn == "on")
                self._answer({"ison": plugs.get(ip), "has_timer": False, "source": "http"})
            elif url.path == "/meter/0":
                self._answer({"power": ON_WATTS if plugs.get(ip) else 0.0, "is_valid": True})
            elif url.path == "/rpc/Switch.Set" and query.get("id") == "0":
                was = plugs.set(ip, query.get("on") == "true")
                self._answer({"was_on": was})
            elif url.path == "/rpc/Switch.GetStatus" and query.get("id") == "0":
                on = plugs.get(ip)
                self._answer({"id": 0, "source": "http", "output": on,
                              "apower": ON_WATTS if on else 0.0})  # fmt: skip
            elif url.path in ("/on", "/off") and self.command == "POST":
                plugs.set(ip, url.path == "/on")
                self._answer({"ok": True})
            else:
                self._answer({"error": "not found"}, 404)

        def _tasmota(self, ip: str, command: str) -> None:
            words = command.split()
            if words[0].lower() == "status" and words[1:] == ["8"]:
                watts = ON_WATTS if plugs.get(ip) else 0.0
                self._answer({"StatusSNS": {"ENERGY": {"Power": watts}}})
                return
            if words[0].lower() not in ("power", "power1"):
                self._answer({"Command": "Unknown"})
                return
            if len(words) > 1:
                value = words[1].lower()
                on = not plugs.get(ip) if value in ("toggle", "2") else value in ("on", "1")
                plugs.set(ip, on)
            self._answer({"POWER": "ON" if plugs.get(ip) else "OFF"})

        do_GET = _handle
        do_POST = _handle

    return Handler


def serve_plugs(args: argparse.Namespace) -> None:
    wires = {ip: (on, off) for ip, on, off in args.wire or []}
    server = ThreadingHTTPServer(("0.0.0.0", 80), handler_for(Plugs(wires, args.log)))
    print("plugs listening", flush=True)
    server.serve_forever()


def serve_wol(args: argparse.Namespace) -> None:
    """A NIC armed for Wake-on-LAN scans every frame for the magic packet, at layer 2: the
    machine is off and has no IP address, so a UDP socket would never see the broadcast."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.bind((args.interface, 0))
    print("wol listening", flush=True)
    while True:
        frame = sock.recv(65535)
        if args.mac.lower() in magic_macs(frame):
            print(f"magic packet for {args.mac}: {frame.hex()}", flush=True)
            subprocess.run(["sh", "-c", args.command], timeout=30, check=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command_name", required=True)
    plugs = commands.add_parser("plugs")
    plugs.add_argument("--log", required=True)
    plugs.add_argument("--wire", nargs=3, action="append", metavar=("IP", "ON", "OFF"))
    plugs.set_defaults(func=serve_plugs)
    wol = commands.add_parser("wol")
    wol.add_argument("--interface", default="eth0")
    wol.add_argument("mac")
    wol.add_argument("command")
    wol.set_defaults(func=serve_wol)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
