"""Fixed values of the NSQ V2 TCP protocol."""

from __future__ import annotations

MAGIC_V2 = b"  V2"

FRAME_TYPE_RESPONSE = 0
FRAME_TYPE_ERROR = 1
FRAME_TYPE_MESSAGE = 2

HEARTBEAT = b"_heartbeat_"
OK = b"OK"
CLOSE_WAIT = b"CLOSE_WAIT"

#: b"HTTP" read as a big-endian int32: the first bytes of an HTTP answer, i.e. someone dialed nsqd's HTTP port
HTTP_SNIFF = 0x48545450

#: timestamp (int64 ns) + attempts (uint16) + 16-byte id
MESSAGE_HEADER_SIZE = 26
MESSAGE_ID_SIZE = 16

#: The default cap on one frame from the server. nsqd's default --max-msg-size is 1 MiB;
#: the cap leaves room for servers configured larger and still bounds memory.
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024

#: nsqd's defaults, used where the client checks ranges before sending
MAX_RDY_COUNT_DEFAULT = 2500
MAX_REQ_TIMEOUT_MS = 60 * 60 * 1000
