"""Throwaway certificates for the TLS tests, made with the `openssl` command at test time
(nothing secret is checked in): a CA, a server certificate for 127.0.0.1/localhost and a
client certificate signed by it, and a client certificate from another CA."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

import pytest

EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclasses.dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA
    stranger_key: Path


def make_certs(folder: Path) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    _make_ca(folder, "ca")
    _make_ca(folder, "other-ca")
    _make_leaf(folder, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
               "extendedKeyUsage=serverAuth\n")
    _make_leaf(folder, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _make_leaf(folder, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    return Certs(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem", server_key=folder / "server.key",
        client_cert=folder / "client.pem", client_key=folder / "client.key",
        stranger_cert=folder / "stranger.pem", stranger_key=folder / "stranger.key",
    )


def _make_ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN=Tandem test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _make_leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + extensions)
    _openssl(folder, "req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}")
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
             "-extfile", f"{name}.ext")


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)
