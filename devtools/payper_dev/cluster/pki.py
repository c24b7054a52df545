"""Certificates and keys for the local control plane.

A real cluster's security model must hold on the laptop too: TLS to the API server,
client certificates per component (so RBAC sees who is calling), and a service-account
signing key pair (so projected tokens and TokenReview work). Everything is generated
fresh for each cluster directory with ``cryptography``; nothing is shared between
clusters.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Identity:
    """A client certificate subject: CN is the user, O the groups."""

    file_stem: str
    common_name: str
    organizations: tuple[str, ...] = ()


REAL_NODE_NAME = "payper-node"
"""The real node's name (payper_dev.cluster.node); its credential is issued with the rest."""
REAL_NODE_IP = "198.18.0.1"
"""The real node's address: its CNI bridge's gateway, in 198.18.0.0/15 (network tests)."""

CLIENTS = (
    Identity("admin", "payper-admin", ("system:masters",)),
    Identity("controller-manager", "system:kube-controller-manager"),
    Identity("scheduler", "system:kube-scheduler"),
    Identity("kwok", "payper-kwok", ("system:masters",)),
    # The API server's client identity towards kubelets (logs, exec, port-forward).
    Identity("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)),
    # The real node: a proper node credential, so the Node authorizer and NodeRestriction
    # treat it as they treat any kubelet. Fresh with every cluster's PKI.
    Identity("node", f"system:node:{REAL_NODE_NAME}", ("system:nodes",)),
    Identity("kube-proxy", "system:kube-proxy"),
    Identity("coredns", "payper:coredns"),
    Identity("kube-router", "payper:kube-router"),
)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


@dataclass(frozen=True)
class _Authority:
    key: ec.EllipticCurvePrivateKey
    name: x509.Name
    cert: x509.Certificate

    @classmethod
    def create(cls, common_name: str) -> _Authority:
        key = _key()
        name = _name(common_name)
        cert = (
            _builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, name, cert)

    def issue(
        self,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        dns_names: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A fresh key and its certificate for ``usage`` (server or client auth)."""
        key = _key()
        builder = _builder(subject, self.name, key.public_key()).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())


def generate(directory: Path, service_ip: str) -> None:
    """Write ca, apiserver, one client pair per CLIENTS entry, and the sa signing pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _Authority.create("payper-local-ca")
    _write_key(directory / "ca.key", ca.key)
    _write_cert(directory / "ca.crt", ca.cert)

    server_key, server_cert = ca.issue(
        _name("kube-apiserver"),
        ExtendedKeyUsageOID.SERVER_AUTH,
        dns_names=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        ips=("127.0.0.1", service_ip),
    )
    _write_key(directory / "apiserver.key", server_key)
    _write_cert(directory / "apiserver.crt", server_cert)

    for identity in CLIENTS:
        key, cert = ca.issue(
            _name(identity.common_name, identity.organizations), ExtendedKeyUsageOID.CLIENT_AUTH
        )
        _write_key(directory / f"{identity.file_stem}.key", key)
        _write_cert(directory / f"{identity.file_stem}.crt", cert)

    # The kubelet's serving certificate, for the node IP the API server reaches it on.
    key, cert = ca.issue(
        _name(f"system:node:{REAL_NODE_NAME}", ("system:nodes",)),
        ExtendedKeyUsageOID.SERVER_AUTH,
        dns_names=(REAL_NODE_NAME,),
        ips=(REAL_NODE_IP,),
    )
    _write_key(directory / "kubelet-serving.key", key)
    _write_cert(directory / "kubelet-serving.crt", cert)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(directory / "sa.key", sa_key)
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def serving_certificate(
    directory: Path, common_name: str, ips: tuple[str, ...] = ("127.0.0.1",)
) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for ``ips`` (ca.crt, tls.crt, tls.key), e.g. for the
    operator's API in local runs, as the chart generates one in a cluster."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _Authority.create(f"{common_name}-ca")
    key, cert = ca.issue(
        _name(common_name), ExtendedKeyUsageOID.SERVER_AUTH, dns_names=("localhost",), ips=ips
    )
    paths = (directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    _write_cert(paths[0], ca.cert)
    _write_cert(paths[1], cert)
    _write_key(paths[2], key)
    return paths
