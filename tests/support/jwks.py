"""A JSON Web Key Set served on loopback, with an RSA key (RS256) and an EC P-256 key
(ES256), and helpers that sign tokens with them. The server is the standard library's
`http.server` in a thread: PyJWKClient fetches keys with blocking urllib anyway."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

RSA_KID = "rsa-key-1"
EC_KID = "ec-key-1"


def _jwk(public_key: Any, kid: str, alg: str) -> dict[str, Any]:
    codec = RSAAlgorithm if alg.startswith("RS") else ECAlgorithm
    jwk: dict[str, Any] = json.loads(codec.to_jwk(public_key))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


class JwksServer:
    """Serves `{"keys": [...]}` at `url`; counts the requests it answered."""

    def __init__(self) -> None:
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.keys = [
            _jwk(self.rsa_key.public_key(), RSA_KID, "RS256"),
            _jwk(self.ec_key.public_key(), EC_KID, "ES256"),
        ]
        self.requests = 0
        body = json.dumps({"keys": self.keys}).encode()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                if self.path != "/.well-known/jwks.json":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        port = self._httpd.server_address[1]
        return f"http://127.0.0.1:{port}/.well-known/jwks.json"

    @property
    def rsa_public_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def rs256(self, claims: dict[str, Any], *, kid: str = RSA_KID) -> str:
        return jwt.encode(claims, self.rsa_key, algorithm="RS256", headers={"kid": kid})

    def es256(self, claims: dict[str, Any], *, kid: str = EC_KID) -> str:
        return jwt.encode(claims, self.ec_key, algorithm="ES256", headers={"kid": kid})


@contextmanager
def serve_jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def claims_for(subject: str, *, ttl: int = 3600, **extra: Any) -> dict[str, Any]:
    """Claims of a Supabase-like token for `subject` that expires in `ttl` seconds."""
    now = int(time.time())
    return {"sub": subject, "iat": now, "exp": now + ttl, "role": "authenticated", **extra}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    """A JWS built by hand: PyJWT itself refuses to HMAC-sign with a PEM public key."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"
