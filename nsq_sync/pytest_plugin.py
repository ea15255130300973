"""pytest fixtures that run real NSQ brokers for your tests.

Installing nsq_sync registers this module as a pytest plugin (entry point
``pytest11: nsq_sync = nsq_sync.pytest_plugin``), so these fixtures are
available in any project that has nsq_sync installed:

``nsqd``
    A fresh :class:`nsq_sync.testing.NsqdProcess` per test, started on
    127.0.0.1 with kernel-assigned ports and a temporary data directory
    (removed afterwards). Use ``nsqd.tcp_address`` (``"127.0.0.1:PORT"``) for
    your producer/consumer, ``nsqd.publish(topic, body)`` to feed it and
    ``nsqd.topic_depth(topic)`` / ``nsqd.channel_depth(topic, channel)`` /
    ``nsqd.stats()`` to inspect it.

``nsqlookupd``
    A fresh :class:`nsq_sync.testing.NsqlookupdProcess` per test
    (``.tcp_address`` for nsqd's ``--lookupd-tcp-address``, ``.http_address``
    for consumers).

``nsq_cluster``
    A fresh :class:`nsq_sync.testing.LocalCluster` per test: one nsqlookupd
    and two nsqd registered with it (``.nsqds``, ``.nsqd_tcp_addresses``,
    ``.lookupd_http_addresses``, ``.add_nsqd()``, ``.wait_for_producers()``).

Example::

    import nsq_sync

    def test_a_publish_lands(nsqd):
        with nsq_sync.Writer(nsqd.tcp_address) as writer:
            writer.pub("events", b"payload")
        assert nsqd.topic_depth("events") == 1

The broker executables are located with :func:`nsq_sync.testing.find_binary`
(``$NSQ_SYNC_BIN_DIR``, a checkout's ``.cache/nsq-1.3.0/bin``, then ``PATH``).
If they are missing, pytest reports the test as an ERROR at setup (never a
skip), with instructions on how to get them.

For other configurations build your own fixture around :func:`started`, which
turns a missing executable into the same setup ERROR, e.g.::

    import pytest

    from nsq_sync.pytest_plugin import started
    from nsq_sync.testing import NsqdProcess

    @pytest.fixture
    def disk_only_nsqd():
        with started(NsqdProcess(extra_args=["--mem-queue-size=0"])) as nsqd:
            yield nsqd

    def test_messages_go_to_disk(disk_only_nsqd):
        disk_only_nsqd.publish("events", b"payload")
        assert disk_only_nsqd.topic_stats("events")["backend_depth"] == 1

(``with NsqdProcess(...) as nsqd:`` starts and closes it too, but a missing
executable is then a ``BrokerNotFoundError`` traceback.)
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, TypeVar

import pytest

if TYPE_CHECKING:  # imported lazily: keeps plugin loading light (and gevent-friendly)
    from nsq_sync.testing import LocalCluster, NsqdProcess, NsqlookupdProcess

__all__ = ["nsqd", "nsqlookupd", "nsq_cluster", "started"]

_T = TypeVar("_T")


@contextlib.contextmanager
def started(broker: _T) -> Iterator[_T]:
    """Start ``broker`` (anything with ``start()``/``close()``), yield it, close it.

    A missing broker executable becomes ``pytest.fail()`` with the
    :class:`~nsq_sync.testing.BrokerNotFoundError` instructions instead of a
    traceback: in a fixture pytest reports an ERROR at the test's setup, in a
    test body a FAILURE. Other start errors propagate.
    """
    from nsq_sync.testing import BrokerNotFoundError

    try:
        missing = None
        try:
            broker.start()  # type: ignore[attr-defined]
        except BrokerNotFoundError as exc:
            missing = str(exc)
        if missing is not None:  # outside the except block: no chained traceback
            pytest.fail(missing, pytrace=False)
        yield broker
    finally:
        broker.close()  # type: ignore[attr-defined]


@pytest.fixture
def nsqd() -> Iterator["NsqdProcess"]:
    """A running nsqd (fresh per test, own temp data dir).

    The test errors at setup if the nsqd executable cannot be found.
    """
    from nsq_sync.testing import NsqdProcess

    with started(NsqdProcess()) as proc:
        yield proc


@pytest.fixture
def nsqlookupd() -> Iterator["NsqlookupdProcess"]:
    """A running nsqlookupd (fresh per test).

    The test errors at setup if the nsqlookupd executable cannot be found.
    """
    from nsq_sync.testing import NsqlookupdProcess

    with started(NsqlookupdProcess()) as proc:
        yield proc


@pytest.fixture
def nsq_cluster() -> Iterator["LocalCluster"]:
    """A running LocalCluster: one nsqlookupd and two nsqd registered with it.

    The test errors at setup if an executable cannot be found.
    """
    from nsq_sync.testing import LocalCluster

    with started(LocalCluster(nsqd_count=2)) as cluster:
        yield cluster
