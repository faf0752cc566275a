"""gRPC channel and server arguments every Baton process uses: message limits and keepalive.

Keepalive is what notices a dead, frozen (SIGSTOP) or partitioned peer in seconds: each side
pings an idle connection every `keepalive_s` and drops it when a ping goes unanswered for
`timeout_s`, failing its calls with UNAVAILABLE. Servers accept pings that often (the gRPC
default would answer a frequent pinger with GOAWAY "too_many_pings"). Channels reconnect
within a couple of seconds of a worker coming back rather than after gRPC's default backoff
of up to two minutes.
"""

from __future__ import annotations


def _common(max_message_bytes: int, keepalive_s: float, timeout_s: float) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        # Newer gRPC cores bound a ping's answer by this too (one minute by default).
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_message_bytes: int, keepalive_s: float = 10.0, timeout_s: float = 5.0) -> list[tuple[str, int]]:
    return [
        *_common(max_message_bytes, keepalive_s, timeout_s),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(keepalive_s * 500)),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def channel_options(max_message_bytes: int, keepalive_s: float = 10.0, timeout_s: float = 5.0) -> list[tuple[str, int]]:
    return [
        *_common(max_message_bytes, keepalive_s, timeout_s),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
