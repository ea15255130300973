"""nsqd TCP addresses: "host:port" strings (IPv6 as "[::1]:4150"), checked once for Reader and Writer."""

from __future__ import annotations

from typing import Iterable, List, Tuple

from .errors import ConfigError

__all__ = ["parse_address", "parse_addresses", "address_key"]


def parse_address(address: object, param: str = "nsqd_tcp_addresses") -> Tuple[str, int]:
    """Split "host:port" into (host, port); a (host, port) tuple passes through.

    Raises ConfigError naming *param* for anything else (a scheme, a path, spaces, a bad port).
    """
    if isinstance(address, tuple) and len(address) == 2:
        host, port = address
    elif isinstance(address, str):
        if "/" in address or any(ch.isspace() for ch in address):
            raise ConfigError(param, address, 'must be "host:port" (no scheme, path or spaces)')
        host, sep, port_text = address.rpartition(":")
        if not sep or not host or not port_text.isdigit():
            raise ConfigError(param, address, 'must be "host:port"')
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        port = int(port_text)
    else:
        raise ConfigError(param, address, 'must be "host:port" strings')
    if not isinstance(host, str) or not host or isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(param, address, 'must be "host:port" with a port from 1 to 65535')
    return host, port


def parse_addresses(addresses: object, param: str = "nsqd_tcp_addresses") -> List[Tuple[str, int]]:
    """Accept None, one "host:port" string or an iterable of them; duplicates are dropped, order kept."""
    if addresses is None:
        return []
    if isinstance(addresses, (str, tuple)):
        addresses = [addresses]
    if isinstance(addresses, (bytes, bytearray)) or not isinstance(addresses, Iterable):
        raise ConfigError(param, addresses, 'must be a "host:port" string or a list of them')
    result: List[Tuple[str, int]] = []
    for address in addresses:
        parsed = parse_address(address, param)
        if parsed not in result:
            result.append(parsed)
    return result


def address_key(host: str, port: int) -> str:
    """The "host:port" spelling of an address ("[::1]:4150" for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
