"""nsqd's limits that values are checked against (nsq_sync.set_nsqd_limits): the defaults,
raising them, the messages that point there, and bad input to the setter itself."""

from __future__ import annotations

from typing import Iterator

import pytest

import nsq_sync
from nsq_sync import AsyncConn, ConfigError
from nsq_sync.protocol import commands
from nsq_sync.protocol.limits import DEFAULT_NSQD_LIMITS


@pytest.fixture(autouse=True)
def restore_limits() -> Iterator[None]:
    before = nsq_sync.nsqd_limits()
    yield
    nsq_sync.set_nsqd_limits(**before)
    assert nsq_sync.nsqd_limits() == before


def test_defaults_are_nsqd_v1_3_0s() -> None:
    assert nsq_sync.nsqd_limits() == DEFAULT_NSQD_LIMITS == {
        "max_heartbeat_interval": 60.0,
        "max_msg_timeout": 900.0,
        "max_req_timeout": 3600.0,
        "max_output_buffer_size": 65536,
        "min_output_buffer_timeout": 0.025,
        "max_output_buffer_timeout": 30.0,
    }


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(msg_timeout=1800), "max_msg_timeout"),
        (dict(heartbeat_interval=90), "max_heartbeat_interval"),
        (dict(output_buffer_size=131072), "max_output_buffer_size"),
        (dict(output_buffer_timeout=40000), "max_output_buffer_timeout"),
        (dict(output_buffer_timeout=10), "min_output_buffer_timeout"),
        (dict(requeue_delay=3601), "max_req_timeout"),
        (dict(max_requeue_delay=7200), "max_req_timeout"),
    ],
)
def test_out_of_default_range_names_the_limit_and_the_way_to_raise_it(kwargs, flag) -> None:
    with pytest.raises(ConfigError) as info:
        AsyncConn("127.0.0.1", 4150, **kwargs)
    assert f"nsqd's default --{flag.replace('_', '-')}" in str(info.value)
    assert f"nsq_sync.set_nsqd_limits({flag}=...)" in str(info.value)
    (param,) = kwargs
    assert info.value.param == param and info.value.value == kwargs[param]


def test_raised_limits_let_the_values_through_in_nsqds_units() -> None:
    previous = nsq_sync.set_nsqd_limits(
        max_msg_timeout=3600, max_heartbeat_interval=120, max_output_buffer_size=1 << 20, min_output_buffer_timeout=0.005, max_req_timeout=7200
    )
    assert previous == DEFAULT_NSQD_LIMITS
    conn = AsyncConn("127.0.0.1", 4150, msg_timeout=1800, heartbeat_interval=90, output_buffer_size=131072, output_buffer_timeout=10, requeue_delay=7200, max_requeue_delay=7200)
    assert (conn.requeue_delay, conn.max_requeue_delay) == (7200, 7200)
    sent = conn._identify_data
    assert (sent["msg_timeout"], sent["heartbeat_interval"], sent["output_buffer_size"], sent["output_buffer_timeout"]) == (1800000, 90000, 131072, 10)
    assert commands.dpub("t", 7_200_000, b"x").startswith(b"DPUB t 7200000\n")
    with pytest.raises(ConfigError, match=r"between 0 and 7200000 \(--max-req-timeout as set by nsq_sync.set_nsqd_limits\)"):
        commands.dpub("t", 7_200_001, b"x")
    # A lowered limit holds too (an nsqd started with smaller ones).
    nsq_sync.set_nsqd_limits(max_msg_timeout=60)
    with pytest.raises(ConfigError, match="msg_timeout=61"):
        AsyncConn("127.0.0.1", 4150, msg_timeout=61)


def test_the_writers_dpub_follows_the_limit() -> None:
    writer = nsq_sync.Writer("127.0.0.1:1", reconnect_interval=60)
    try:
        with pytest.raises(ConfigError, match="max_req_timeout"):
            writer.dpub("t", 3_600_001, b"x", timeout=0.1)
    finally:
        writer.close(1)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(max_msg_timeouts=10), TypeError),
        (dict(max_msg_timeout="900"), TypeError),
        (dict(max_msg_timeout=True), TypeError),
        (dict(max_output_buffer_size=65536.5), TypeError),
        (dict(max_msg_timeout=0), ConfigError),
        (dict(max_msg_timeout=-1), ConfigError),
        (dict(max_msg_timeout=float("nan")), ConfigError),
        (dict(max_msg_timeout=float("inf")), ConfigError),
        (dict(min_output_buffer_timeout=31), ConfigError),
        (dict(max_req_timeout=2**80), ConfigError),
        (dict(max_heartbeat_interval=0.5), ConfigError),
        (dict(max_msg_timeout=0.5), ConfigError),
        (dict(max_output_buffer_size=32), ConfigError),
        (dict(min_output_buffer_timeout=0.0001), ConfigError),
        (dict(max_output_buffer_timeout=0.01), ConfigError),
    ],
)
def test_bad_limits_are_refused_and_change_nothing(kwargs, error) -> None:
    before = nsq_sync.nsqd_limits()
    with pytest.raises(error):
        nsq_sync.set_nsqd_limits(**kwargs)
    assert nsq_sync.nsqd_limits() == before


def test_limits_are_a_copy() -> None:
    nsq_sync.nsqd_limits()["max_msg_timeout"] = 1
    assert nsq_sync.nsqd_limits()["max_msg_timeout"] == 900.0
