# -*- test-case-name: tests.test_tls -*-
"""
Tests for L{meshstream.tls}: the tracker over real TLS on loopback (an
C{ssl:} endpoint string), its clients verifying its certificate against a CA
made at test time (C{tests/_certs.py}), and the C{--tracker-ca} options of
the agent, C{meshstream publish} and C{meshstream fetch}.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from meshstream.agent.service import AgentConfig, AgentService, manifest_path_for
from meshstream.errors import TrackerError
from meshstream.manifest import Manifest, build_manifest, public_key_text
from meshstream.tap import agent as agent_tap
from meshstream.tls import TLSConfigError, check_tracker_ca, load_ca_bundle, tracker_http
from meshstream.tracker import auth
from meshstream.tracker.client import TrackerClient
from meshstream.tracker.service import build_tracker_service
from tests._accounts import make_user
from tests._certs import endpoint_path, make_ca

reactor: Any = _reactor
LOOPBACK = "tcp:0:interface=127.0.0.1"
BLOCK, SUB = 64 * 1024, 16 * 1024


def scratch(case: unittest.SynchronousTestCase) -> str:
    """A fresh directory, removed after the test."""
    path = os.path.abspath(case.mktemp())
    os.makedirs(path)
    case.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


class LoadCABundleTests(unittest.SynchronousTestCase):
    """Unusable CA files are refused with a L{TLSConfigError} naming the file."""

    def setUp(self) -> None:
        self.dir = scratch(self)
        self.ca = make_ca(self.dir, "ca")

    def assert_refused(self, path: str, why: str) -> None:
        e = self.assertRaises(TLSConfigError, load_ca_bundle, path)
        self.assertIn(path, str(e))
        self.assertIn(why, str(e))

    def test_unusable_files(self) -> None:
        self.assert_refused(os.path.join(self.dir, "missing.pem"), "No such file")
        self.assert_refused(self.dir, "Is a directory")
        self.assert_refused(write(os.path.join(self.dir, "empty.pem"), b""), "no valid PEM certificate")
        self.assert_refused(write(os.path.join(self.dir, "text.pem"), b"not a certificate\n"), "no valid PEM")
        key_only = os.path.join(self.dir, "key.pem")
        self.ca.issue(self.dir, "leaf", ["localhost"], [])
        shutil.copyfile(os.path.join(self.dir, "leaf.key"), key_only)
        self.assert_refused(key_only, "no valid PEM certificate")
        with open(self.ca.pem_path, "rb") as f:
            pem = f.read()
        broken = pem.replace(pem[100:140], b"A" * 40)
        self.assert_refused(write(os.path.join(self.dir, "broken.pem"), broken), "no valid PEM")
        self.assert_refused(write(os.path.join(self.dir, "huge.pem"), pem * 2000), "larger than")

    def test_bundle_with_other_blocks(self) -> None:
        """Certificates among other PEM blocks (a key, comments) load."""
        other = make_ca(self.dir, "other")
        with open(self.ca.pem_path, "rb") as a, open(other.pem_path, "rb") as b:
            text = b"# two CAs\n" + a.read() + b.read()
        with open(self.ca.issue(self.dir, "leaf", ["localhost"], [])[0], "rb") as k:
            text += k.read()
        self.assertIsNotNone(load_ca_bundle(write(os.path.join(self.dir, "bundle.pem"), text)))

    def test_check_tracker_ca(self) -> None:
        check_tracker_ca("http://t:7070", None)
        check_tracker_ca(None, None)
        check_tracker_ca("https://t:7443", self.ca.pem_path)
        for url in ("http://t:7070", None, "HTTP://t"):
            e = self.assertRaises(TLSConfigError, check_tracker_ca, url, self.ca.pem_path)
            self.assertIn("needs an https:// --tracker", str(e))
        self.assertRaises(TLSConfigError, check_tracker_ca, "https://t", os.path.join(self.dir, "missing"))


class AgentOptionsTests(unittest.SynchronousTestCase):
    """C{twistd meshstream-agent --tracker-ca}."""

    def parse(self, *argv: str) -> agent_tap.Options:
        self.patch(os, "environ", {**os.environ, "MESHSTREAM_PASSWORD": "pw"})
        options = agent_tap.Options()
        options.parseOptions([*argv, "--user=alice"])
        return options

    def test_tracker_ca(self) -> None:
        directory = scratch(self)
        ca = make_ca(directory, "ca")
        options = self.parse("--tracker=https://t:7443", f"--tracker-ca={ca.pem_path}")
        self.assertEqual(agent_tap.config_from_options(options).tracker_ca, ca.pem_path)
        self.assertIsNone(agent_tap.config_from_options(self.parse("--tracker=https://t")).tracker_ca)
        self.assertIsNone(AgentConfig(tracker="https://t", data_dir="d").tracker_ca)

    def test_missing_ca_file_refused(self) -> None:
        missing = os.path.join(scratch(self), "missing.pem")
        e = self.assertRaises(
            usage.UsageError, self.parse, "--tracker=https://t:7443", "--tracker-ca", missing
        )
        self.assertIn(missing, str(e))
        self.assertIn("No such file", str(e))

    def test_ca_needs_https(self) -> None:
        ca = make_ca(scratch(self), "ca")
        e = self.assertRaises(
            usage.UsageError, self.parse, "--tracker=http://t:7070", "--tracker-ca", ca.pem_path
        )
        self.assertIn("https://", str(e))


class TrackerOverTLSTests(unittest.TestCase):
    """
    A tracker listening with C{ssl:} endpoint strings on loopback: on one
    port with a certificate for localhost and 127.0.0.1, on another with a
    certificate (from the same CA) for another host name.
    """

    timeout = 60

    async def setUp(self) -> None:
        self.dir = scratch(self)
        self.ca = make_ca(self.dir, "ca")
        self.other_ca = make_ca(self.dir, "other-ca")
        key, cert = self.ca.issue(self.dir, "tracker", ["localhost"], ["127.0.0.1", "::1"])
        wrong_key, wrong_cert = self.ca.issue(self.dir, "elsewhere", ["tracker.example"], [])
        self.key = Ed25519PrivateKey.generate()
        self.service = build_tracker_service(
            reactor,
            [self.ssl(key, cert), self.ssl(wrong_key, wrong_cert)],
            f"sqlite:{os.path.join(self.dir, 'tracker.sqlite')}",
            self.key,
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        await self.service.ready()
        self.admin = await make_user(self.service.store, "admin", auth.ADMIN)
        ports = await self.service.listening()
        self.port, self.wrong_port = (p.getHost().port for p in ports)  # type: ignore[attr-defined]
        self.url = f"https://127.0.0.1:{self.port}"

    @staticmethod
    def ssl(key: str, cert: str) -> str:
        return f"ssl:0:interface=127.0.0.1:privateKey={endpoint_path(key)}:certKey={endpoint_path(cert)}"

    def client(self, url: str, ca_file: str | None, timeout: float = 10.0) -> TrackerClient:
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)  # runs before the tracker stops
        return TrackerClient(
            tracker_http(reactor, pool, ca_file), url, reactor, timeout=timeout, credentials=self.admin
        )

    async def refused(self, client: TrackerClient) -> TrackerError:
        try:
            await client.public_key()
        except TrackerError as e:
            self.assertNotEqual(e.code, "timeout")
            return e
        self.fail("the request succeeded")

    # -- tests -----------------------------------------------------------------

    async def test_right_ca(self) -> None:
        """With the tracker's CA, by IP address and by host name: health, key, a manifest."""
        for url in (self.url, f"https://localhost:{self.port}"):
            client = self.client(url, self.ca.pem_path)
            response = await client._http.get(url + "/api/v1/health")
            self.assertEqual(response.code, 200)
            self.assertEqual(json.loads(await response.content())["status"], "ok")
            key = await client.public_key()
            self.assertEqual(public_key_text(key), public_key_text(self.key.public_key()))
        src = write(os.path.join(self.dir, "c.bin"), os.urandom(100_000))
        manifest, _ = build_manifest(src, BLOCK, SUB)
        signed = await client.register_manifest(manifest)
        signed.verify(self.key.public_key())

    async def test_bundle(self) -> None:
        """A bundle file: the tracker's CA after an unrelated one is found."""
        with open(self.other_ca.pem_path, "rb") as a, open(self.ca.pem_path, "rb") as b:
            bundle = write(os.path.join(self.dir, "bundle.pem"), a.read() + b.read())
        key = await self.client(self.url, bundle).public_key()
        self.assertEqual(public_key_text(key), public_key_text(self.key.public_key()))

    async def test_wrong_ca(self) -> None:
        e = await self.refused(self.client(self.url, self.other_ca.pem_path))
        self.assertIn(f"GET {self.url}/api/v1/key failed: TLS handshake failed:", str(e))
        self.assertIn("certificate verify failed", str(e))

    async def test_platform_trust_refuses_private_ca(self) -> None:
        """Without --tracker-ca the system's CAs are used, and they do not know ours."""
        e = await self.refused(self.client(self.url, None))
        self.assertIn("certificate verify failed", str(e))

    async def test_wrong_host_name(self) -> None:
        """A certificate from the right CA, but for another host, is refused."""
        e = await self.refused(self.client(f"https://127.0.0.1:{self.wrong_port}", self.ca.pem_path))
        self.assertIn("TLS certificate is not for this host", str(e))
        self.assertIn("IPAddressMismatch", str(e))
        e = await self.refused(self.client(f"https://localhost:{self.wrong_port}", self.ca.pem_path))
        self.assertIn("TLS certificate is not for this host", str(e))
        self.assertIn("DNSMismatch", str(e))

    async def test_plain_http_to_tls_port(self) -> None:
        """Plain HTTP to the TLS port fails at once, not by timing out; the tracker keeps serving."""
        e = await self.refused(self.client(f"http://127.0.0.1:{self.port}", None, timeout=20.0))
        self.assertIsNone(e.status)
        self.assertIn("Connection was closed cleanly", str(e))
        key = await self.client(self.url, self.ca.pem_path).public_key()
        self.assertEqual(public_key_text(key), public_key_text(self.key.public_key()))

    # -- the agent and the command line ----------------------------------------

    async def agent(self, name: str, ca_file: str, **kw: Any) -> AgentService:
        config = AgentConfig(
            tracker=self.url,
            tracker_ca=ca_file,
            data_dir=os.path.join(self.dir, name),
            listen=[LOOPBACK],
            stream=None,
            node_id=name,
            credentials=await make_user(self.service.store, f"owner-of-{name}"),
            **kw,
        )
        agent = AgentService(config, reactor)
        agent.startService()
        self.addCleanup(lambda: agent.stopService() if agent.running else None)
        await agent.ready
        return agent

    async def meshstream(self, *argv: str) -> tuple[int, str, str]:
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "meshstream.cli", *argv, "--user", self.admin.user],
            env={**os.environ, "MESHSTREAM_PASSWORD": self.admin.password},
        )
        return code, out.decode(), err.decode()

    async def test_publish_seed_fetch_over_tls(self) -> None:
        """C{meshstream publish --tracker-ca}, an agent seeding, C{meshstream fetch --tracker-ca}."""
        src = write(os.path.join(self.dir, "content.bin"), os.urandom(600_000))
        code, out, err = await self.meshstream(
            "publish", src, "--tracker", self.url, "--tracker-ca", self.ca.pem_path, "--block-size", "64K"
        )
        self.assertEqual(code, 0, err)
        with open(manifest_path_for(src), "rb") as f:
            manifest = Manifest.from_json(f.read())
        manifest.verify(self.key.public_key())
        self.assertIn(manifest.content_id, out)

        # The agent gets the key over TLS (no --tracker-key), imports the seed, announces.
        seed = await self.agent("seed", self.ca.pem_path, seeds=[src])
        nodes = await self.client(self.url, self.ca.pem_path).nodes(manifest.content_id)
        self.assertEqual([n.node_id for n in nodes], ["seed"])
        self.assertEqual(seed.tracker_key, self.key.public_key())

        fetched = os.path.join(self.dir, "fetched.bin")
        argv = ["fetch", manifest.content_id, "--tracker", self.url, "-o", fetched, "--progress", "none"]
        code, _, err = await self.meshstream(*argv, "--tracker-ca", self.ca.pem_path)
        self.assertEqual(code, 0, err)
        with open(fetched, "rb") as a, open(src, "rb") as b:
            self.assertEqual(a.read(), b.read())

        # The wrong CA: a clear failure, nothing written.
        os.unlink(fetched)
        code, _, err = await self.meshstream(*argv, "--tracker-ca", self.other_ca.pem_path)
        self.assertEqual(code, 1)
        self.assertIn("certificate verify failed", err)
        self.assertFalse(os.path.exists(fetched))
        code, _, err = await self.meshstream(
            "publish", src, "--tracker", self.url, "--tracker-ca", self.other_ca.pem_path
        )
        self.assertEqual(code, 1)
        self.assertIn("registering with the tracker failed", err)
        self.assertIn("certificate verify failed", err)

    async def test_agent_with_wrong_ca_does_not_start(self) -> None:
        try:
            await self.agent("lost", self.other_ca.pem_path)
        except TrackerError as e:
            self.assertIn("certificate verify failed", str(e))
        else:
            self.fail("the agent started")
        self.assertEqual(len(self.flushLoggedErrors(TrackerError)), 1)

    async def test_cli_refuses_unusable_ca(self) -> None:
        missing = os.path.join(self.dir, "missing.pem")
        src = write(os.path.join(self.dir, "c.bin"), b"x" * 1000)
        for argv in (
            ["publish", src, "--tracker", self.url, "--tracker-ca", missing],
            ["fetch", "0" * 64, "--tracker", self.url, "--tracker-ca", missing, "-o", src + ".out"],
        ):
            code, _, err = await self.meshstream(*argv)
            self.assertEqual(code, 2, err)
            self.assertIn(f"cannot read the CA file {missing}", err)
        code, _, err = await self.meshstream(
            "publish", src, "--tracker", "http://127.0.0.1:9", "--tracker-ca", self.ca.pem_path
        )
        self.assertEqual(code, 2, err)
        self.assertIn("needs an https:// --tracker", err)
