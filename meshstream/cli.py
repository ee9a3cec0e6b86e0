# -*- test-case-name: tests.test_cli -*-
"""
The C{meshstream} command.

    meshstream publish FILE [--tracker URL] [--origin URL]... [--title TITLE] [-o MANIFEST]
    meshstream fetch (CONTENT_ID | --manifest FILE) [--source URL]... [--tracker URL] -o OUT
    meshstream demo [--file FILE] [--size 32M] [--rates 2M,4M,8M] [--kill-at 0.5]
    meshstream tracker user (add|list|disable|enable|passwd|quota) ... [--db URL]

Both run the reactor themselves (L{twisted.internet.task.react}); this is an
entry point, like the taps, so it may read the global reactor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from meshstream.manifest import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_SUB_BLOCK_SIZE,
    Manifest,
    ManifestError,
    build_manifest,
)


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2}
    t = text.strip().lower().rstrip("b").rstrip("i")
    mult = units.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _title(text: str) -> str:
    from meshstream.tracker.catalog import MAX_TITLE, clean_text

    title = clean_text(text, MAX_TITLE)
    if title is None:
        raise argparse.ArgumentTypeError(
            f"a title is 1 to {MAX_TITLE} characters, without control characters"
        )
    return title


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshstream", description="Peer-assisted streaming.")
    sub = p.add_subparsers(dest="command", required=True)

    pub = sub.add_parser("publish", help="hash a file into a manifest and register it with a tracker")
    pub.add_argument("file")
    pub.add_argument("--tracker", help="tracker base URL; without it the manifest is written unsigned")
    pub.add_argument("--tracker-ca", help="PEM file of the CAs to trust for an https:// tracker")
    pub.add_argument("--origin", action="append", default=[], help="HTTP URL of the whole file (repeatable)")
    pub.add_argument("-o", "--output", help="manifest path (default FILE.manifest.json)")
    pub.add_argument("--block-size", type=_size, default=DEFAULT_BLOCK_SIZE)
    pub.add_argument("--sub-block-size", type=_size, default=DEFAULT_SUB_BLOCK_SIZE)
    pub.add_argument("--name", help="content name (default: the file's name)")
    pub.add_argument(
        "--title",
        type=_title,
        help="title to list and search the content by (default: the container's title tag, else the"
        " file name without extension)",
    )
    pub.add_argument(
        "--no-probe",
        action="store_true",
        help="do not run ffprobe: MIME type from the file name, no duration or bitrate",
    )
    from meshstream.fetch import add_login_arguments

    add_login_arguments(pub)

    fetch = sub.add_parser("fetch", help="download a content from peers and HTTP sources into a file")
    from meshstream.fetch import add_arguments

    add_arguments(fetch)

    demo = sub.add_parser("demo", help="run a tracker, an origin and agents on loopback and stream a file")
    demo.add_argument("--file", help="file to stream (default: a generated one)")
    demo.add_argument("--size", type=_size, default=32 * 1024**2, help="size of the generated file")
    demo.add_argument("--rates", default="2M,4M,8M", help="upload limit of each seeding agent")
    demo.add_argument(
        "--kill-at", type=float, default=0.5, help="stop the fastest seed at this fraction (0 = never)"
    )
    demo.add_argument("--keep", action="store_true", help="keep the working directory")

    tracker = sub.add_parser("tracker", help="administer a tracker's database (users)")
    from meshstream.tracker.admin import add_arguments as add_tracker_arguments

    add_tracker_arguments(tracker)
    return p


def publish(args: argparse.Namespace) -> int:
    path = args.file
    if not os.path.isfile(path):
        print(f"meshstream publish: no such file: {path}", file=sys.stderr)
        return 2
    from meshstream.probe import describe, find_ffprobe
    from meshstream.tracker.client import load_credentials

    try:
        credentials = load_credentials(args.user, args.password_file)
    except ValueError as e:
        print(f"meshstream publish: {e}", file=sys.stderr)
        return 2
    try:
        meta = describe(path, args.title, None if args.no_probe else find_ffprobe())
        manifest, _ = build_manifest(
            path,
            args.block_size,
            args.sub_block_size,
            origins=args.origin,
            name=args.name,
            meta=meta,
        )
    except (ManifestError, OSError) as e:
        print(f"meshstream publish: {e}", file=sys.stderr)
        return 2
    if args.tracker:
        from twisted.internet import task

        from meshstream.tls import TLSConfigError, check_tracker_ca, tracker_http

        try:
            check_tracker_ca(args.tracker, args.tracker_ca)
        except TLSConfigError as e:
            print(f"meshstream publish: {e}", file=sys.stderr)
            return 2

        result: list[Manifest] = []
        errors: list[str] = []

        def register(reactor: Any) -> Any:
            from meshstream.tracker.client import TrackerClient

            client = TrackerClient(
                tracker_http(reactor, ca_file=args.tracker_ca), args.tracker, reactor, credentials=credentials
            )
            d = client.register_manifest(manifest)
            d.addCallbacks(result.append, lambda f: errors.append(f.getErrorMessage()))
            return d

        try:
            task.react(register)
        except SystemExit:
            pass
        if not result:
            why = errors[0] if errors else "no answer"
            print(f"meshstream publish: registering with the tracker failed: {why}", file=sys.stderr)
            return 1
        manifest = result[0]
    out = args.output or path + ".manifest.json"
    with open(out, "wb") as f:
        f.write(manifest.to_json())
    signed = "signed" if manifest.signature else "unsigned"
    print(f"{manifest.content_id}  {manifest.size} bytes, {manifest.num_blocks} blocks, {signed}: {out}")
    print(f"  {_describe_meta(manifest.meta)}")
    return 0


def _describe_meta(meta: dict[str, Any]) -> str:
    """One line about what the file is: C{"Title" video/mp4, 3.0 s, 350 kbit/s}."""
    parts = [f"{json.dumps(meta.get('title'), ensure_ascii=False)} {meta.get('mime_type')}"]
    if "duration" in meta:
        parts.append(f"{meta['duration']:.1f} s")
    if "bitrate" in meta:
        parts.append(f"{meta['bitrate'] / 1000:.0f} kbit/s")
    if len(parts) == 1:
        parts.append("no media information")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "publish":
        return publish(args)
    if args.command == "fetch":
        from meshstream.fetch import run_fetch

        return run_fetch(args)
    if args.command == "demo":
        from meshstream.demo import run_demo

        return run_demo(args)
    if args.command == "tracker":
        from meshstream.tracker.admin import run_tracker_command

        return run_tracker_command(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
