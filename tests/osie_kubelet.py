"""A stand-in for the kubelet's health endpoint (http://127.0.0.1:10248/healthz answers "ok"),
for pixiebox-joined's test where no k3s binary exists. Usage: osie_kubelet.py HOST PORT"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Healthz(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok" if self.path == "/healthz" else b"not found"
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    HTTPServer((sys.argv[1], int(sys.argv[2])), Healthz).serve_forever()
