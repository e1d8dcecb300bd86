"""Web origins and the names a listener answers to.

A web page whose own name its attacker makes resolve to 127.0.0.1 (DNS rebinding) is, to the
browser, of the same origin as a service listening there: the Origin checks (gateway.cors) cannot
tell it apart, and the page could read and send what a local client can. Its requests carry its
own name in ``Host``, though. So a listener bound to loopback answers only to loopback names
(``localhost``, ``*.localhost``), to IP addresses (a rebinding page has a name, never an address)
and to the names an operator lists; a listener on any other address answers to any name unless
names are listed (its clients reach it by Service names, addresses, Ingress hosts).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def normal_origin(origin: str) -> str:
    """``scheme://host[:port]`` as browsers send an Origin: scheme and host in lower case, without
    the scheme's default port."""
    origin = origin.strip().rstrip("/")
    scheme, sep, rest = origin.partition("://")
    if not sep:
        return origin.lower()
    scheme, rest = scheme.lower(), rest.lower()
    return f"{scheme}://{rest.removesuffix(DEFAULT_PORTS.get(scheme, ':'))}"


def host_name(host: str) -> str:
    """A ``Host`` header's name: without its port, brackets or final dot, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 address, [::1]:8000
        return host[1 : host.find("]")] if "]" in host else host
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        host = name
    return host.removesuffix(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(address: str) -> bool:
    """Whether a listener's bind address is the machine's own (a browser's rebinding target): an
    address, or a name all of whose addresses are (``localhost``; Debian's host name, 127.0.1.1)."""
    name = host_name(address)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in found)


@dataclass(frozen=True, slots=True)
class HostRule:
    """The names a listener answers to, besides loopback names and IP addresses."""

    names: frozenset[str]
    domains: tuple[str, ...]  # ".example.com": the domain and every name under it

    def allows(self, host: str) -> bool:
        """Whether a request whose ``Host`` is ``host`` may be served (no Host: not a browser's)."""
        name = host_name(host)
        if not name or name == "localhost" or name.endswith(".localhost") or name in self.names:
            return True
        if any(name.endswith(d) or name == d[1:] for d in self.domains):
            return True
        return _is_address(name)


def allowed_names(value: str) -> list[str]:
    """The names of an ``allowed_hosts`` setting (comma-separated), checked: names, ``.domain``, ``*``."""
    names = [n.strip().lower().removesuffix(".") for n in value.split(",") if n.strip()]
    for name in names:
        if name.startswith("*."):
            raise ValueError(f"`{name}`: list a domain and every name under it as `{name[1:]}`")
        if name != "*" and not all(c.isalnum() or c in "-._" for c in name):
            raise ValueError(f"`{name}` is not a host name (list names without scheme or port)")
    return names


def host_rule(listener: str, allowed: str) -> HostRule | None:
    """The rule for a listener bound to ``listener`` with ``allowed_hosts`` = ``allowed``; None:
    any name (``*`` listed, or no names listed for a listener not on loopback)."""
    names = allowed_names(allowed)
    if "*" in names or (not names and not is_loopback(listener)):
        return None
    exact = frozenset(n for n in names if not n.startswith("."))
    return HostRule(exact, tuple(n for n in names if n.startswith(".")))
