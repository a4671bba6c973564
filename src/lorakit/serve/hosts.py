"""Which `Host` headers the server answers: a guard against DNS rebinding.

A web page on a name its author controls can make that name resolve to 127.0.0.1 and
then read a keyless server on this machine as if it were its own origin; the browser
still sends the page's name in `Host`. So a request is answered only when its Host
names this server:

- bound to a loopback address (the default 127.0.0.1): that address, `localhost`,
  `127.0.0.1` and `::1`;
- bound to one other address or name: that address or name;
- bound to every interface (0.0.0.0 or ::): any IP address (a rebinding page always
  comes under a name, never an address), `localhost`, and this machine's host name and
  fully qualified name;

plus every `--allow-host NAME` (the names a proxy or DNS gives the server). `--allow-host '*'`
turns the check off. The port in Host is not checked; a request without Host (HTTP/1.0)
is answered, since no browser sends one. Others get 400 and an OpenAI-shaped error.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lorakit.serve.guards import send_error

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class HostPolicy:
    """The Host names a server answers; `any_ip`: any IP address too; `anything`: no check."""

    names: frozenset[str]
    any_ip: bool = False
    anything: bool = False

    def allows(self, host: str) -> bool:
        if self.anything:
            return True
        name = host_name(host)
        if name in self.names:
            return True
        return self.any_ip and _is_ip(name)


def host_policy(bind: str, allow: Iterable[str] = ()) -> HostPolicy:
    """The Host names a server bound to `bind` answers, with the `--allow-host` names `allow`."""
    extra = {host_name(a) for a in allow}
    if "*" in extra:
        return HostPolicy(frozenset(extra), anything=True)
    bind = host_name(bind)
    if bind in WILDCARDS:
        local = {"localhost", *LOOPBACK_NAMES, socket.gethostname().lower(), socket.getfqdn().lower()}
        return HostPolicy(frozenset(local | extra), any_ip=True)
    names = {bind, *extra}
    if bind == "localhost" or (_is_ip(bind) and ipaddress.ip_address(bind).is_loopback):
        names |= set(LOOPBACK_NAMES)
    return HostPolicy(frozenset(names))


def host_name(host: str) -> str:
    """The name or address in a Host header value, without its port, lower case:
    "Example.COM:8000" -> "example.com", "[::1]:8000" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """ASGI middleware: answer 400 to a request whose Host header `policy` does not allow."""

    def __init__(self, app: Any, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            raw = dict(scope.get("headers") or []).get(b"host")
            host = raw.decode("latin-1") if raw is not None else None
            if host is not None and not self.policy.allows(host):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                shown = host if len(host) <= 100 else host[:100] + "..."
                message = (
                    f"this server does not answer to Host {shown!r} (a guard against DNS rebinding); "
                    f"start it with --allow-host {host_name(shown) or 'NAME'} to accept that name"
                )
                await send_error(send, 400, message, param="host", close=True)
                return
        await self.app(scope, receive, send)
