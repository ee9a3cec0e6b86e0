"""
Certificates made at test time: a CA and the server certificates it signs,
written as PEM files for C{ssl:} endpoint strings and C{--tracker-ca}.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


@frozen
class CA:
    """A certificate authority: its key, its certificate and the file holding it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem_path: str

    def issue(self, directory: str, name: str, dns: list[str], ips: list[str]) -> tuple[str, str]:
        """
        A server certificate for C{dns} and C{ips} (subjectAltName), as
        C{(key_path, cert_path)} files named after C{name} in C{directory}.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        alt_names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        alt_names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DAY)
            .not_valid_after(now + _DAY)
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_path = os.path.join(directory, f"{name}.key")
        cert_path = os.path.join(directory, f"{name}.pem")
        _write(key_path, _key_pem(key))
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return key_path, cert_path


def make_ca(directory: str, name: str) -> CA:
    """A self-signed CA, its certificate written to C{directory/name.pem}."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshstream test CA {name}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = os.path.join(directory, f"{name}.pem")
    _write(path, cert.public_bytes(serialization.Encoding.PEM))
    return CA(key, cert, path)


def endpoint_path(path: str) -> str:
    """C{path} quoted for an endpoint string (C{:} and C{=} are separators)."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
