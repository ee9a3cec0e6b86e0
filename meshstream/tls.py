# -*- test-case-name: tests.test_tls -*-
"""
TLS towards the tracker: an HTTP client that verifies the tracker's
certificate against a configured CA bundle.

The tracker serves TLS through its endpoint strings
(C{--listen ssl:7443:privateKey=key.pem:certKey=cert.pem}); its clients (the
agent, C{meshstream fetch}, C{meshstream publish}) take C{--tracker
https://host:7443} and, for a tracker whose certificate comes from a private
CA, C{--tracker-ca ca.pem}.  Without a CA file the platform's trust store is
used, as treq does by default.

Either way the certificate chain is checked by OpenSSL and the host name (or
IP address) of the URL against the certificate's subjectAltName by
service_identity, through L{optionsForClientTLS}.

The CA file is read when the client is built, synchronously: call
L{load_ca_bundle}, L{check_tracker_ca} and L{tracker_http} at start-up only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from treq.client import HTTPClient
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS

from meshstream.errors import MeshstreamError

if TYPE_CHECKING:
    # The interface optionsForClientTLS takes; Twisted defines it in a private module.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

#: A CA bundle is a handful of certificates; anything bigger is not one.
MAX_CA_FILE = 1024 * 1024


class TLSConfigError(MeshstreamError):
    """A TLS setting cannot be used: a CA file that is missing, unreadable or
    holds no certificate, or a CA file given for a plain-HTTP URL."""


def load_ca_bundle(path: str) -> IOpenSSLTrustRoot:
    """
    Trust the certificates of the PEM file at C{path} (one or several
    C{CERTIFICATE} blocks; other blocks are ignored).

    @raise TLSConfigError: the file cannot be read or holds no valid
        certificate.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CA_FILE + 1)
    except OSError as e:
        raise TLSConfigError(f"cannot read the CA file {path}: {e.strerror or e}") from None
    if len(data) > MAX_CA_FILE:
        raise TLSConfigError(f"the CA file {path} is larger than {MAX_CA_FILE} bytes")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(f"the CA file {path} holds no valid PEM certificate: {e}") from None
    return trustRootFromCertificates(
        [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates]
    )


def check_tracker_ca(tracker_url: str | None, ca_file: str | None) -> None:
    """
    Check a client's tracker TLS options at start-up: a CA file is only
    meaningful for an C{https://} tracker, and must be usable.

    @raise TLSConfigError: with a message fit for the command line.
    """
    if ca_file is None:
        return
    if tracker_url is None or urlsplit(tracker_url).scheme != "https":
        raise TLSConfigError("--tracker-ca needs an https:// --tracker URL")
    load_ca_bundle(ca_file)


def https_policy(ca_file: str | None = None) -> IPolicyForHTTPS:
    """
    Verify servers against the CA bundle C{ca_file}, or against the
    platform's trust store if it is L{None}; host names always.

    @raise TLSConfigError: see L{load_ca_bundle}.
    """
    trust = load_ca_bundle(ca_file) if ca_file is not None else None
    return BrowserLikePolicyForHTTPS(trustRoot=trust)


def tracker_http(
    reactor: Any, pool: HTTPConnectionPool | None = None, ca_file: str | None = None
) -> HTTPClient:
    """
    A treq L{HTTPClient} for L{meshstream.tracker.client.TrackerClient}.

    @param reactor: for the connections.
    @param pool: keeps connections open between requests.  Give the tracker
        a pool of its own: L{HTTPConnectionPool} keys connections by scheme,
        host and port only, so an L{Agent} with another TLS policy sharing it
        could hand the tracker a connection it verified differently.  L{None}:
        a new connection per request (enough for one-shot commands).
    @param ca_file: PEM bundle of the CAs to trust; L{None} for the platform's.

    @raise TLSConfigError: see L{load_ca_bundle}.
    """
    agent = Agent(reactor, contextFactory=https_policy(ca_file), pool=pool)
    return HTTPClient(agent)
