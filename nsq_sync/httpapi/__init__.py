"""HTTP clients for nsqd and nsqlookupd, built only on the standard library.

They use :mod:`http.client`, so they work unchanged under gevent monkey-patching, keep
connections open between requests (HTTP keep-alive) and can be shared between threads.
"""

from .base import ACCEPT_V1, HTTPClient, HTTPResponse
from .lookupd import LookupdClient, nsqd_http_address
from .nsqd import NSQDHTTPClient, NsqdHTTPClient

__all__ = [
    "HTTPClient",
    "HTTPResponse",
    "ACCEPT_V1",
    "NsqdHTTPClient",
    "NSQDHTTPClient",
    "LookupdClient",
    "nsqd_http_address",
]
