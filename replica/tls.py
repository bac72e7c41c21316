"""Mutual TLS for every gRPC link: a cluster CA, node and admin certificates, credentials, identities.

The security model. One CA per cluster (`vmft ca init DIR`) signs two kinds of certificate:
- a **node** certificate (`vmft ca issue node NAME --address A`): CN=NAME, OU=node, SAN DNS:NAME and the
  node's addresses, usable to serve and to connect (serverAuth + clientAuth). Nodes present it to each
  other (replication, re-protection) and to clients.
- an **admin** certificate (`vmft ca issue admin NAME`): CN=NAME, OU=admin, clientAuth only (it cannot
  serve as a node). Control operations (protect, stop, fault, reprotect, migrate) require it.
Every server requires a client certificate from the cluster CA (`require_client_auth=True`): a client
without one, or with one from another CA, does not get past the handshake (it sees UNAVAILABLE, the
server logs why). A servicer reads the caller's identity from the handshake (`peer_identity`) and
checks the role (`require_role` / the `requires` decorator). A client can insist that the server is a
given node (`expect_node`): the server's certificate must name it, so an address taken over by someone
else is refused. Plaintext exists only behind an explicit insecure flag and only on loopback (and Unix
sockets): `bind`/`open_channel` refuse it on any other address.

Files. `DIR/ca.crt` and `DIR/ca.key` (0600) are the CA; each identity gets its own directory
`DIR/nodes/NAME/` or `DIR/admins/NAME/` holding `cert.pem`, `key.pem` (0600) and a copy of `ca.crt`: the
one directory to copy to the machine (or hand to the person) that uses it. The CA key never leaves DIR.
"""

from __future__ import annotations

import datetime
import enum
import functools
import inspect
import ipaddress
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from monitor.errors import ConfigError, VmftError

log = logging.getLogger(__name__)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
CERT, KEY = "cert.pem", "key.pem"
ORG = "vmft cluster"
CA_DAYS, CERT_DAYS = 3650, 825


class TlsError(VmftError):
    """A certificate, key or CA that cannot be made or used, or plaintext where it is not allowed."""

    hint = "make the cluster CA with `vmft ca init DIR` and certificates with `vmft ca issue`"


class Role(enum.Enum):
    NODE = "node"
    ADMIN = "admin"


@dataclass(frozen=True)
class Identity:
    """The files one node or admin uses: its certificate and key, and the cluster CA's certificate."""

    name: str
    role: Role
    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / CERT

    @property
    def key(self) -> Path:
        return self.directory / KEY

    @property
    def ca(self) -> Path:
        return self.directory / CA_CERT

    @classmethod
    def load(cls, directory: str | Path) -> Identity:
        """The identity whose files are in `directory` (name and role read from its certificate)."""
        d = Path(directory)
        try:
            cert = x509.load_pem_x509_certificate((d / CERT).read_bytes())
        except (OSError, ValueError) as e:
            raise TlsError(f"no usable certificate in {d}: {e}") from e
        peer = _peer_from_cert(cert)
        return cls(peer.name, peer.role, d)


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a mutually authenticated connection."""

    name: str
    role: Role


# --- the CA ---------------------------------------------------------------------------------------------
def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init_ca(directory: str | Path, cluster: str = "vmft") -> Path:
    """Create a new cluster CA in `directory` (refused if one is there already)."""
    d = Path(directory)
    if (d / CA_KEY).exists() or (d / CA_CERT).exists():
        raise TlsError(f"{d} already holds a CA")
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster} CA"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(d / CA_KEY, key)
    _write_cert(d / CA_CERT, cert)
    log.info("cluster CA created in %s", d)
    return d


def _check_name(name: str) -> None:
    if not name or len(name) > 63 or not all(c.isalnum() or c in "-_." for c in name) or name[0] in "-.":
        raise ConfigError(f"bad identity name {name!r} (letters, digits, - _ ., at most 63)")


def issue(
    ca_dir: str | Path, role: Role, name: str, addresses: Sequence[str] = (), *, days: int = CERT_DAYS
) -> Identity:
    """Issue a certificate of `role` for `name`, signed by the CA in `ca_dir`, into
    ca_dir/nodes/NAME or ca_dir/admins/NAME. A node's `addresses` (IPs or DNS names) go into its SAN
    beside its name; loopback is added so a node can be reached locally."""
    _check_name(name)
    d = Path(ca_dir)
    try:
        ca_cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise TlsError(f"no usable CA in {d}: {e}") from e
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TlsError(f"the CA key in {d} is not an EC key")
    out = d / ("nodes" if role is Role.NODE else "admins") / name
    if out.exists():
        raise TlsError(f"{out} exists: a certificate for {role.value} {name} was issued already")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
        x509.NameAttribute(NameOID.COMMON_NAME, name),
    ])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if role is Role.NODE:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        ).add_extension(x509.SubjectAlternativeName(_san(name, addresses)), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        ).add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out.mkdir(parents=True)
    _write_key(out / KEY, key)
    _write_cert(out / CERT, cert)
    (out / CA_CERT).write_bytes((d / CA_CERT).read_bytes())
    log.info("issued %s certificate for %s in %s", role.value, name, out)
    return Identity(name, role, out)


def _san(name: str, addresses: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName("localhost")]
    ips = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
    for a in addresses:
        try:
            ips.add(ipaddress.ip_address(a))
        except ValueError:
            names.append(x509.DNSName(a))
    return names + [x509.IPAddress(ip) for ip in sorted(ips, key=str)]


# --- identities from certificates ------------------------------------------------------------------------
def _peer_from_cert(cert: x509.Certificate) -> Peer:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:
        raise TlsError("certificate without exactly one CN and one OU")
    try:
        role = Role(str(ous[0].value))
    except ValueError as e:
        raise TlsError(f"certificate with an unknown role {ous[0].value!r}") from e
    return Peer(str(cns[0].value), role)


@functools.lru_cache(maxsize=256)
def _peer_from_pem(pem: bytes) -> Peer:
    return _peer_from_cert(x509.load_pem_x509_certificate(pem))


def peer_identity(context: Any) -> Peer | None:
    """The authenticated caller of a servicer method (grpc or grpc.aio context): None on a plaintext
    connection. The certificate was verified against the cluster CA by the handshake; this only reads
    the name and role it carries."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    pems = auth.get("x509_pem_cert")
    if not pems:
        return None
    try:
        return _peer_from_pem(pems[0])
    except (TlsError, ValueError):
        return None


async def require_role(context: Any, *roles: Role) -> Peer:
    """The caller, if its certificate carries one of `roles`; otherwise the call ends PERMISSION_DENIED
    (UNAUTHENTICATED on a plaintext connection). For grpc.aio servicers."""
    peer = peer_identity(context)
    if peer is None:
        log.warning("refused %s: no client certificate", context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        raise AssertionError("abort returned")  # abort always raises
    if peer.role not in roles:
        log.warning("refused %s (%s %s): needs %s", context.peer(), peer.role.value, peer.name,
                    "/".join(r.value for r in roles))
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{peer.role.value} {peer.name} may not do this (needs {'/'.join(r.value for r in roles)})",
        )
    return peer


F = TypeVar("F", bound=Callable[..., Any])


def requires(*roles: Role) -> Callable[[F], F]:
    """Decorate a grpc.aio servicer method (unary: a coroutine; streaming: an async generator) so that
    only callers with one of `roles` reach it. On a plaintext (insecure, loopback) server every caller
    is let through: there is nobody to check, which is why plaintext is loopback-only."""

    def decorate(method: F) -> F:
        if inspect.isasyncgenfunction(method):
            @functools.wraps(method)
            async def stream(self: Any, request: Any, context: Any) -> Any:
                if _secure(context):
                    await require_role(context, *roles)
                async for item in method(self, request, context):
                    yield item

            return stream  # type: ignore[return-value]

        @functools.wraps(method)
        async def unary(self: Any, request: Any, context: Any) -> Any:
            if _secure(context):
                await require_role(context, *roles)
            return await method(self, request, context)

        return unary  # type: ignore[return-value]

    return decorate


def _secure(context: Any) -> bool:
    return bool(context.auth_context().get("transport_security_type") == [b"ssl"])


# --- credentials -----------------------------------------------------------------------------------------
def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsError(f"cannot read {path}: {e}") from e


def server_credentials(identity: Identity) -> grpc.ServerCredentials:
    """A server that proves it is `identity` and requires every client to prove itself (same CA)."""
    return grpc.ssl_server_credentials(
        [(_read(identity.key), _read(identity.cert))],
        root_certificates=_read(identity.ca),
        require_client_auth=True,
    )


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    """A client that proves it is `identity` and accepts only servers certified by the same CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(identity.ca),
        private_key=_read(identity.key),
        certificate_chain=_read(identity.cert),
    )


def is_loopback(address: str) -> bool:
    """True for HOST:PORT on a loopback address (or `localhost`), and for Unix sockets; False for
    wildcard binds (0.0.0.0, [::]) and everything else."""
    if address.startswith("unix:") or address.startswith("unix-abstract:"):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plaintext(address: str, insecure: bool) -> None:
    if not insecure:
        raise TlsError(f"{address}: no certificate given (plaintext needs the explicit insecure flag)")
    if not is_loopback(address):
        raise TlsError(f"{address}: plaintext is refused on any address but loopback")


def bind(server: Any, address: str, identity: Identity | None, *, insecure: bool = False) -> int:
    """Add a listening port to a grpc(.aio) server: mutual TLS as `identity`, or plaintext if
    `insecure` and `address` is loopback. Returns the bound port."""
    if identity is not None:
        port = server.add_secure_port(address, server_credentials(identity))
    else:
        check_plaintext(address, insecure)
        log.warning("serving plaintext on %s (--insecure)", address)
        port = server.add_insecure_port(address)
    if not port and not address.startswith("unix"):
        raise TlsError(f"cannot listen on {address}")
    return int(port)


def open_channel(
    address: str,
    identity: Identity | None,
    *,
    insecure: bool = False,
    expect_node: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`: mutual TLS as `identity`, or plaintext if `insecure` and the
    address is loopback. With `expect_node` the server's certificate must name that node (whatever
    address it is reached at)."""
    opts = list(options)
    if identity is not None:
        if expect_node is not None:
            opts.append(("grpc.ssl_target_name_override", expect_node))
        return grpc.aio.secure_channel(address, channel_credentials(identity), options=opts)
    check_plaintext(address, insecure)
    return grpc.aio.insecure_channel(address, options=opts)
