"""Certificates and keys for a secure Flower deployment (TLS + SuperNode authentication).

    python server/flower_app/make_certs.py FOLDER [--host NAME_OR_IP ...] [--node NAME ...]

writes into FOLDER (created with mode 0700; a file already there is kept, never replaced):

    ca.crt, ca.key          a private certificate authority. ca.crt goes to every machine
                            (SuperLink --ssl-ca-certfile, SuperNode --root-certificates, the
                            flwr CLI's root-certificates); ca.key stays with the operator.
    server.pem, server.key  the SuperLink's TLS certificate (signed by the CA) and its key,
                            valid for 127.0.0.1, localhost and every --host.
    NAME.key, NAME.pub      one EC P-384 key pair per --node (default: node0 node1), in
                            OpenSSH format as Flower 1.41 reads them: NAME.key goes to that
                            SuperNode only (--auth-supernode-private-key), NAME.pub is what
                            the operator registers (`flwr supernode register NAME.pub`).
    .gitignore              "*", so git never picks the folder up.

Rerun with new --node names to add SuperNodes (the CA and server files are reused); delete
server.pem and server.key and rerun to add --host names.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()  # Flower's node auth wants a NIST curve; P-384 is the one its docs use
CA_DAYS = 3650
SERVER_DAYS = 365
ALWAYS_HOSTS = ("127.0.0.1", "localhost")  # the SuperLink's own executors connect over loopback


def write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start, so the key is never readable by others, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_public(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def san_entry(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def new_ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gankit federation CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def new_server_cert(ca_key, ca_cert: x509.Certificate, hosts: list[str],
                    now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName([san_entry(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    return key, cert


def make_certs(folder: Path, hosts: list[str], nodes: list[str]) -> list[Path]:
    """Writes what is missing in `folder`; returns the files it wrote."""
    for node in nodes:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", node) or node in ("ca", "server"):
            raise ValueError(f"bad node name {node!r}: letters, digits, '_', '.', '-'; not 'ca' or 'server'")
    hosts = list(dict.fromkeys([*hosts, *ALWAYS_HOSTS]))  # the first named host is the CN
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    written: list[Path] = []
    ignore = folder / ".gitignore"
    if not ignore.exists():
        write_public(ignore, b"*\n")
        written.append(ignore)
    now = datetime.datetime.now(datetime.timezone.utc)

    ca_crt, ca_key_path = folder / "ca.crt", folder / "ca.key"
    if ca_crt.exists() != ca_key_path.exists():
        raise ValueError(f"{folder} holds only one of ca.crt and ca.key")
    if ca_crt.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    else:
        ca_key, ca_cert = new_ca(now)
        write_private(ca_key_path, pem_key(ca_key))
        write_public(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM))
        written += [ca_crt, ca_key_path]

    server_pem, server_key = folder / "server.pem", folder / "server.key"
    if server_pem.exists() != server_key.exists():
        raise ValueError(f"{folder} holds only one of server.pem and server.key")
    if not server_pem.exists():
        key, cert = new_server_cert(ca_key, ca_cert, hosts, now)
        write_private(server_key, pem_key(key))
        write_public(server_pem, cert.public_bytes(serialization.Encoding.PEM))
        written += [server_pem, server_key]

    for node in nodes:
        private, public = folder / f"{node}.key", folder / f"{node}.pub"
        if private.exists() or public.exists():
            continue
        key = ec.generate_private_key(CURVE)
        write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                 serialization.NoEncryption()))
        write_public(public, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                           serialization.PublicFormat.OpenSSH) + b"\n")
        written += [private, public]
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("folder", type=Path, help="where to write (keep it out of version control)")
    parser.add_argument("--host", action="append", default=[],
                        help="a name or IP the SuperNodes use to reach the SuperLink (repeatable); "
                             "127.0.0.1 and localhost are always included")
    parser.add_argument("--node", action="append", default=None,
                        help="a SuperNode name, one key pair each (repeatable; default: node0 node1)")
    args = parser.parse_args(argv)
    try:
        written = make_certs(args.folder, args.host, args.node or ["node0", "node1"])
    except (ValueError, OSError) as err:
        print(f"make_certs: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    if not written:
        print(f"nothing to do: everything asked for is already in {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
