"""
The request path's shortcuts, without a network: static routes found by one
lookup give what trying the routes in order gives, and a cached token is
accepted without waiting only when L{TrackerAPI.authenticate} would accept it.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock
from twisted.trial import unittest

from meshstream.tracker import api, auth
from meshstream.tracker.api import (
    _ROUTES,
    _STATIC_ROUTES,
    API_PREFIX,
    Route,
    TrackerAPI,
    _match,
    _static_routes,
    find_route,
)
from meshstream.tracker.http1 import ApiRequest


def _in_order(method: bytes, rest: list[str]) -> Route | None:
    for route in _ROUTES:
        if route.method == method and _match(route.pattern, rest) is not None:
            return route
    return None


class StaticRouteTests(unittest.SynchronousTestCase):
    def test_same_as_in_order(self) -> None:
        """Every route's own path, and its HEAD, find what the in-order scan finds."""
        self.assertGreater(len(_STATIC_ROUTES), 10)
        for route in _ROUTES:
            rest = ["ab" * 32 if s is None else s for s in route.pattern]
            found, captured = find_route(route.method, [*API_PREFIX, *rest])
            self.assertIs(found, _in_order(route.method, rest))
            self.assertIs(found, route)
            self.assertEqual(captured, [s for s, p in zip(rest, route.pattern, strict=True) if p is None])
            if route.method == b"GET":
                self.assertIs(find_route(b"HEAD", [*API_PREFIX, *rest])[0], route)

    def test_wrong_method_still_405(self) -> None:
        with self.assertRaises(api.ApiError) as e:
            find_route(b"GET", [*API_PREFIX, "announce"])
        self.assertEqual((e.exception.status, e.exception.headers), (405, {"Allow": "POST"}))

    def test_shadowing_refused(self) -> None:
        """A route with a variable that would match a static route's path is an error."""
        routes = (
            Route(b"GET", ("contents", None), TrackerAPI.content),
            Route(b"GET", ("contents", "latest"), TrackerAPI.contents),
        )
        with self.assertRaises(ValueError) as e:
            _static_routes(routes)
        self.assertIn("contents/latest", str(e.exception))


class KnownPrincipalTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.api = TrackerAPI(None, Ed25519PrivateKey.generate(), self.clock)  # type: ignore[arg-type]
        self.alice = auth.Principal("alice", auth.USER)
        self.api.tokens.put(auth.token_digest("tok"), self.alice, expires=2000.0, now=1000.0)

    def request(self, header: bytes | None) -> ApiRequest:
        headers = {} if header is None else {b"authorization": header}
        return ApiRequest(b"GET", b"/api/v1/me", headers)

    def test_cached(self) -> None:
        request = self.request(b"Bearer tok")
        self.assertEqual(self.api.known_principal(request, auth.ANYONE), self.alice)
        self.assertEqual(request.principal, self.alice)

    def test_otherwise_none(self) -> None:
        """Unknown, missing, expired or not allowed: no answer, L{TrackerAPI.authenticate} decides."""
        for header, roles in (
            (b"Bearer other", auth.ANYONE),
            (None, auth.ANYONE),
            (b"Basic tok", auth.ANYONE),
            (b"Bearer tok", auth.ADMINS),
        ):
            request = self.request(header)
            self.assertIsNone(self.api.known_principal(request, roles), header)
            self.assertIsNone(request.principal)
        self.clock.advance(1000)  # the token expires (the cache entry is still fresh)
        self.api.tokens.put(auth.token_digest("tok"), self.alice, expires=2000.0, now=2000.0)
        self.assertIsNone(self.api.known_principal(self.request(b"Bearer tok"), auth.ANYONE))
