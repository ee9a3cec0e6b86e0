"""The twistd plugins: options parse as documented and build the right services."""

from __future__ import annotations

import os

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from meshstream.agent.service import AgentConfig, AgentService
from meshstream.tap import agent as agent_tap
from meshstream.tracker.client import Credentials


class PluginTests(unittest.SynchronousTestCase):
    def test_both_plugins_discoverable(self) -> None:
        import twisted.plugins

        names = {p.tapname: p for p in getPlugins(IServiceMaker, twisted.plugins)}
        self.assertIn("meshstream-tracker", names)
        self.assertIn("meshstream-agent", names)
        self.assertIsInstance(names["meshstream-agent"].options(), agent_tap.Options)


class AgentOptionsTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.patch(os, "environ", {**os.environ, "MESHSTREAM_PASSWORD": "pw"})

    def parse(self, *argv: str) -> agent_tap.Options:
        options = agent_tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        options = self.parse("--tracker", "http://t:7070", "--user", "alice")
        config = agent_tap.config_from_options(options)
        self.assertEqual(
            config,
            AgentConfig(
                tracker="http://t:7070",
                data_dir="meshstream-agent",
                listen=["tcp:7071"],
                stream="tcp:7080:interface=127.0.0.1",
                seeds=[],
                node_id=None,
                advertise=None,
                upload_rate=None,
                max_peers=4,
                max_uploads=32,
                tracker_key=None,
                credentials=Credentials("alice", "pw"),
                window=16,
            ),
        )

    def test_repeatable_and_rates(self) -> None:
        options = self.parse(
            "--tracker=http://t",
            "--user=alice",
            "--listen=tcp:1",
            "--listen=ssl:2:privateKey=k.pem",
            "--seed=a.mp4",
            "--seed=b.mp4",
            "--upload-rate=4M",
            "--stream=",
            "--window=1",
        )
        config = agent_tap.config_from_options(options)
        self.assertEqual(config.listen, ["tcp:1", "ssl:2:privateKey=k.pem"])
        self.assertEqual(config.seeds, ["a.mp4", "b.mp4"])
        self.assertEqual(config.upload_rate, 4 * 1024 * 1024)
        self.assertIsNone(config.stream)
        self.assertEqual(config.window, 1)

    def test_content_server_options(self) -> None:
        config = agent_tap.config_from_options(self.parse("--tracker=http://t", "--user=cdn", "--server"))
        self.assertEqual((config.server, config.use_servers), (True, "beside"))
        for mode in ("beside", "instead", "off"):
            options = self.parse("--tracker=http://t", "--user=a", f"--use-servers={mode}")
            config = agent_tap.config_from_options(options)
            self.assertEqual((config.server, config.use_servers), (False, mode))
        with self.assertRaises(usage.UsageError) as e:
            self.parse("--tracker=http://t", "--user=a", "--use-servers=only")
        self.assertIn("beside, instead, off", str(e.exception))

    def test_parse_rate(self) -> None:
        self.assertEqual(agent_tap.parse_rate("512K"), 512 * 1024)
        self.assertEqual(agent_tap.parse_rate("1.5MiB/s"), 1.5 * 1024 * 1024)
        self.assertEqual(agent_tap.parse_rate("1000"), 1000)
        for bad in ("", "fast", "-1M", "0", "4T"):
            self.assertRaises(usage.UsageError, agent_tap.parse_rate, bad)

    def test_errors(self) -> None:
        self.assertRaises(usage.UsageError, self.parse)
        user = "--user=alice"
        self.assertRaises(usage.UsageError, self.parse, "--tracker=http://t", user, "--max-peers=0")
        self.assertRaises(usage.UsageError, self.parse, "--tracker=http://t", user, "--upload-rate=lots")

    def test_credentials(self) -> None:
        """The password comes from --password-file, else $MESHSTREAM_PASSWORD; --user is required."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("from the file\nsecond line ignored\n")
        options = self.parse("--tracker=http://t", "--user=bob", f"--password-file={path}")
        self.assertEqual(options["credentials"], Credentials("bob", "from the file"))
        self.assertNotIn("from the file", repr(options["credentials"]))
        with self.assertRaises(usage.UsageError) as e:
            self.parse("--tracker=http://t")
        self.assertIn("--user is required", str(e.exception))
        with self.assertRaises(usage.UsageError) as e:
            self.parse("--tracker=http://t", "--user=bob", "--password-file=/nonexistent/pw")
        self.assertIn("cannot read the password file", str(e.exception))
        self.patch(os, "environ", {})
        with self.assertRaises(usage.UsageError) as e:
            self.parse("--tracker=http://t", "--user=bob")
        self.assertIn("MESHSTREAM_PASSWORD", str(e.exception))

    def test_make_service(self) -> None:
        service = agent_tap.makeService(self.parse("--tracker=http://t", "--user=a", "--node-id=n1"))
        self.assertIsInstance(service, AgentService)
        assert isinstance(service, AgentService)
        self.assertEqual(service.config.node_id, "n1")
        self.assertFalse(service.running)
