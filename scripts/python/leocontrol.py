"""The broker's side of the gateway control protocol (docs/CONTROL-PROTOCOL.md),
for the benchmarks and end-to-end tests: a keep-alive HTTP connection to a
gateway's control endpoint that signs each request broker-to-gateway.
Standard library only; the key is read from a file and never printed."""
import base64
import hashlib
import hmac
import http.client
import json
import os
import secrets
import ssl
import time


def control_connection(host, port, timeout=30):
    """The control endpoint speaks TLS with its own certificate (issue 14):
    LEOCONTROL_CA names that certificate (the gateway's state directory holds
    it as control-tls.crt) and only it is trusted, as the broker does; without
    LEOCONTROL_CA the endpoint is taken to be plain HTTP (control_plain_http)."""
    ca = os.environ.get("LEOCONTROL_CA")
    if not ca:
        return http.client.HTTPConnection(host, port, timeout=timeout)
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def read_key(path: str) -> bytes:
    text = open(path).read().strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ControlClient:
    """Signed requests to one gateway's control endpoint."""

    def __init__(self, host, port, gateway_id, key):
        self.host, self.port, self.gateway_id, self.key = host, port, gateway_id, key
        self.conn = control_connection(host, port)

    def request(self, method, path, body=b""):
        ts = str(int(time.time()))
        nonce = secrets.token_hex(16)
        text = "\n".join(["LEO-HMAC-SHA256", "broker-to-gateway", method, path, ts, nonce,
                          hashlib.sha256(body).hexdigest()])
        sig = b64url(hmac.new(self.key, text.encode(), hashlib.sha256).digest())
        headers = {"Authorization": f"LEO-HMAC-SHA256 gw={self.gateway_id}, ts={ts}, nonce={nonce}, sig={sig}"}
        if body:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body or None, headers=headers)
                reply = self.conn.getresponse()
                return reply.status, reply.read()
            except (http.client.HTTPException, ConnectionError):
                self.conn.close()
                self.conn = control_connection(self.host, self.port)
                if attempt:
                    raise

    def put(self, rule_id, push):
        """PUT a rule; returns (status, parsed answer or raw bytes)."""
        status, data = self.request("PUT", f"/control/v1/rules/{rule_id}", json.dumps(push).encode())
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data

    def put_rule(self, rule_id, target, **fields):
        push = {"protocol": "tcp", "method": 0, "target": target}
        push.update(fields)
        status, answer = self.put(rule_id, push)
        if status not in (200, 201):
            raise RuntimeError(f"PUT rule: HTTP {status}: {str(answer)[:200]}")
        return answer["port"]

    def delete_rule(self, rule_id):
        status, data = self.request("DELETE", f"/control/v1/rules/{rule_id}")
        if status != 204:
            raise RuntimeError(f"DELETE rule: HTTP {status}: {data[:200]!r}")

    def rules(self):
        status, data = self.request("GET", "/control/v1/rules")
        if status != 200:
            raise RuntimeError(f"GET rules: HTTP {status}: {data[:200]!r}")
        return json.loads(data)
