"""nsqd TCP addresses: "host:port" strings (IPv6 as "[::1]:4150"), checked once for Reader and Writer."""

from __future__ import annotations

import ipaddress
from typing import Iterable, List, Tuple, Union

from .errors import ConfigError

__all__ = ["Address", "Addresses", "parse_address", "parse_addresses", "address_key", "check_host"]

#: one nsqd TCP address: a "host:port" string (IPv6 as "[::1]:4150") or a (host, port) pair
#: with an int port
Address = Union[str, Tuple[str, int]]
#: what :func:`parse_addresses` takes, and so Writer's and Reader's ``nsqd_tcp_addresses``: one
#: address, or an iterable (list, tuple, ...) of them
Addresses = Union[Address, Iterable[Address]]

_ASCII_DIGITS = frozenset("0123456789")


def _is_pair(value: object) -> bool:
    """A (host, port) pair: a 2-tuple whose second item is an int (a tuple of strings is a list of addresses)."""
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def check_host(param: str, address: object, host: str) -> None:
    """A host name (ASCII letters, digits, "-", ".", "_"; at most 253 characters, 63 between
    dots), an IPv4 or an IPv6 address; else ConfigError."""
    if "," in host or ";" in host:
        raise ConfigError(param, address, 'is several addresses in one string: give them as a list, e.g. ["a:4150", "b:4150"]')
    if ":" in host:
        if not _is_ipv6(host):
            raise ConfigError(param, address, 'the host holds a ":" but is no IPv6 address (write IPv6 as "[::1]:4150")')
        return
    if not host.isascii():
        # (str.isalnum() takes any script's letters and digits: "１２７.０.０.１" resolves to
        # 127.0.0.1, a second key for the same nsqd)
        raise ConfigError(param, address, "the host holds non-ASCII characters: write an internationalised name in its ASCII (xn--) form")
    bad = sorted({ch for ch in host if not (ch.isalnum() or ch in "-._")})
    if bad:
        raise ConfigError(param, address, f"the host holds {''.join(bad)!r}, which no host name or IP address has")
    if len(host) > 253 or any(len(label) > 63 for label in host.split(".")):
        raise ConfigError(param, address, "is longer than a host name can be (253 characters, 63 between dots)")


def parse_address(address: object, param: str = "nsqd_tcp_addresses") -> Tuple[str, int]:
    """Split "host:port" into (host, port); a (host, port) pair (an int port) passes through.

    Raises ConfigError naming *param* for anything else (a scheme, a path, spaces, a missing
    host or port, a port that is not ASCII digits or not in 1..65535, a host with characters
    no host name or IP address has, such as "a:4150,b:4150": a list in one string).
    """
    if _is_pair(address):
        host, port = address  # type: ignore[misc]
        if not isinstance(host, str) or not host:
            raise ConfigError(param, address, "a (host, port) pair needs a non-empty str host")
        if host.startswith("[") and host.endswith("]") and _is_ipv6(host[1:-1]):
            host = host[1:-1]
        if ":" in host and not _is_ipv6(host):
            raise ConfigError(param, address, 'the host of a (host, port) pair holds a ":" but is no IPv6 address (give "host:port" strings as a list)')
        check_host(param, address, host)
    elif isinstance(address, str):
        if "/" in address or any(ch.isspace() for ch in address):
            raise ConfigError(param, address, 'must be "host:port" (no scheme, path or spaces)')
        host, sep, port_text = address.rpartition(":")
        if not sep or not port_text or address.endswith("]"):
            raise ConfigError(param, address, 'must be "host:port": the port is missing')
        if not host or host == "[]":
            raise ConfigError(param, address, 'must be "host:port": the host is missing')
        if not _ASCII_DIGITS.issuperset(port_text):
            raise ConfigError(param, address, f'must be "host:port" with the port in ASCII digits 0-9, not {port_text!r}')
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # (Go's SplitHostPort takes any host in brackets, "[127.0.0.1]:4150" too)
        check_host(param, address, host)
        port = int(port_text)
    elif isinstance(address, tuple):
        raise ConfigError(param, address, 'a tuple inside the list must be a (host, port) pair with an int port; give addresses as "host:port" strings')
    else:
        raise ConfigError(param, address, f'each address must be a "host:port" string or a (host, port) pair, not {type(address).__name__}')
    if isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(param, address, "the port must be from 1 to 65535" if isinstance(address, str) else "the port must be an int from 1 to 65535")
    return host, port


def parse_addresses(addresses: object, param: str = "nsqd_tcp_addresses") -> List[Tuple[str, int]]:
    """Accept None, one "host:port" string or (host, port) pair, or an iterable (list, tuple, ...)
    of them; duplicates are dropped, order kept.

    A tuple is a (host, port) pair only when its second item is an int: ``("a:4150", "b:4150")``
    is two addresses.
    """
    if addresses is None:
        return []
    if isinstance(addresses, str) or _is_pair(addresses):
        addresses = [addresses]
    if isinstance(addresses, (bytes, bytearray)) or not isinstance(addresses, Iterable):
        raise ConfigError(param, addresses, 'must be a "host:port" string or a list of them')
    items = list(addresses)
    if (
        isinstance(addresses, tuple)
        and len(items) == 2
        and all(isinstance(item, str) for item in items)
        and ":" not in items[0]
        and items[1]
        and _ASCII_DIGITS.issuperset(items[1])
    ):
        # ("127.0.0.1", "4150"): meant as a (host, port) pair, read as two addresses.
        raise ConfigError(param, addresses, 'a (host, port) pair needs an int port, e.g. ("127.0.0.1", 4150); or give "127.0.0.1:4150"')
    result: List[Tuple[str, int]] = []
    for address in items:
        parsed = parse_address(address, param)
        if parsed not in result:
            result.append(parsed)
    return result


def address_key(host: str, port: int) -> str:
    """The "host:port" spelling of an address ("[::1]:4150" for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
