# -*- test-case-name: tests.test_tracker_auth -*-
"""
C{meshstream tracker user ...}: user administration on the tracker's database.

    meshstream tracker user add NAME [--role user|server|admin] [--quota BYTES]
                                     [--password-file FILE | --generate-password]
    meshstream tracker user list
    meshstream tracker user disable NAME      (revokes the user's tokens)
    meshstream tracker user enable NAME
    meshstream tracker user passwd NAME [--password-file FILE | --generate-password]
    meshstream tracker user quota NAME (BYTES | none)

Every command takes C{--db URL} (the tracker's C{--db}; default the same
C{sqlite:meshstream-tracker.sqlite}).  They work on the database directly, so
the first admin can be made before any tracker runs, and they run the schema
migrations like a tracker would.  Without C{--password-file} or
C{--generate-password}, the password is read from C{MESHSTREAM_PASSWORD} or,
on a terminal, prompted for.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from meshstream.tracker import auth

if TYPE_CHECKING:
    from meshstream.tracker.store import TrackerStore

DEFAULT_DB = "sqlite:meshstream-tracker.sqlite"
T = TypeVar("T")


class AdminError(Exception):
    """A user command that cannot be done; its message is for the operator."""


def add_arguments(tracker: argparse.ArgumentParser) -> None:
    """Add C{user ...} to the C{meshstream tracker} parser."""
    what = tracker.add_subparsers(dest="tracker_command", required=True)
    user = what.add_parser("user", help="add, list, disable users of a tracker")
    cmds = user.add_subparsers(dest="user_command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help)
        p.add_argument("--db", default=DEFAULT_DB, help="the tracker's database URL")
        return p

    def password_source(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument("--password-file", help="read the password from the first line of FILE")
        group.add_argument(
            "--generate-password", action="store_true", help="make a random password and print it"
        )

    add = command("add", "create a user")
    add.add_argument("name")
    add.add_argument("--role", choices=auth.ROLES, default=auth.USER)
    add.add_argument("--quota", type=int, help="bytes per billing period (default: no quota)")
    password_source(add)
    command("list", "list users")
    for name, help in (("disable", "disable a user and revoke their tokens"), ("enable", "enable a user")):
        command(name, help).add_argument("name")
    passwd = command("passwd", "set a user's password (revokes their tokens)")
    passwd.add_argument("name")
    password_source(passwd)
    quota = command("quota", "set a user's byte quota per billing period")
    quota.add_argument("name")
    quota.add_argument("bytes", help="a number of bytes, or 'none'")


def _password(args: argparse.Namespace) -> tuple[str, bool]:
    """The new password, and whether it was generated (and must be shown)."""
    if args.generate_password:
        return secrets.token_urlsafe(18), True
    if args.password_file:
        # Here, not at the top: the tracker client pulls in twisted.web, and
        # every meshstream command imports this module for its options.
        from meshstream.tracker.client import read_password_file

        try:
            return read_password_file(args.password_file), False
        except ValueError as e:
            raise AdminError(str(e)) from None
    env = os.environ.get("MESHSTREAM_PASSWORD")
    if env:
        return env, False
    if not sys.stdin.isatty():
        raise AdminError("no password: use --password-file, --generate-password or MESHSTREAM_PASSWORD")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise AdminError("the passwords differ")
    if not first:
        raise AdminError("empty password")
    return first, False


def _check_password(password: str) -> str:
    if len(password) > auth.MAX_PASSWORD:
        raise AdminError(f"a password has at most {auth.MAX_PASSWORD} characters")
    return password


async def _run(args: argparse.Namespace, store: TrackerStore, out: Callable[[str], None]) -> None:
    await store.start()
    cmd = args.user_command
    if cmd == "list":
        users = await store.list_users()
        out(f"{'name':24} {'role':8} {'state':9} quota")
        for u in users:
            state = "disabled" if u.disabled else "enabled"
            quota = "-" if u.quota_bytes is None else str(u.quota_bytes)
            out(f"{u.name:24} {u.role:8} {state:9} {quota}")
        return
    name = args.name
    if not auth.valid_user_name(name):
        raise AdminError("a user name is 1 to 64 characters of [A-Za-z0-9._@-]")
    if cmd == "add":
        password, generated = _password(args)
        hashed = auth.hash_password(_check_password(password))
        if args.quota is not None and args.quota < 0:
            raise AdminError("a quota is a number of bytes, 0 or more")
        if not await store.add_user(name, hashed, args.role, time.time(), args.quota):
            raise AdminError(f"user {name} exists")
        out(f"added {args.role} {name}" + (f" with password {password}" if generated else ""))
        return
    changes: dict[str, object]
    if cmd in ("disable", "enable"):
        changes = {"disabled": cmd == "disable"}
    elif cmd == "passwd":
        password, generated = _password(args)
        changes = {"password": auth.hash_password(_check_password(password))}
    else:  # quota
        text = args.bytes.strip().lower()
        if text == "none":
            changes = {"quota_bytes": None}
        elif text.isdigit():
            changes = {"quota_bytes": int(text)}
        else:
            raise AdminError("a quota is a number of bytes or 'none'")
    if not await store.update_user(name, **changes):
        raise AdminError(f"no user {name}")
    shown = f" (password {password})" if cmd == "passwd" and generated else ""
    out(f"{cmd}: {name}{shown}")


def run_tracker_command(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Run a C{meshstream tracker ...} command; 0 on success, 1 with a message on failure."""
    # Here, not at the top: every meshstream command imports this module for
    # its options, and the store (with twisted.enterprise) is a tenth of a
    # fetch's start-up.
    from twisted.internet import defer, task

    from meshstream.tracker.store import StoreError, open_store

    errors: list[str] = []

    def main(reactor: Any) -> defer.Deferred[None]:
        try:
            store = open_store(args.db, reactor)
        except StoreError as e:
            errors.append(str(e))
            return defer.succeed(None)
        coro: Coroutine[Any, Any, None] = _run(args, store, out)
        d = defer.Deferred.fromCoroutine(coro)

        def failed(f: Any) -> None:
            if f.check(AdminError, StoreError):
                errors.append(f.getErrorMessage())
            else:
                errors.append(f"{f.type.__name__}: {f.getErrorMessage()}")

        d.addErrback(failed)
        d.addBoth(lambda _: store.close())
        return d

    try:
        task.react(main)
    except SystemExit as e:
        if e.code not in (0, None):
            errors.append(f"exited with {e.code}")
    if errors:
        print(f"meshstream tracker: {errors[0]}", file=sys.stderr)
        return 1
    return 0
