"""Publish a rosbag2 (sqlite3 or MCAP) with its original timing through rclpy.

Messages go out as the bag's own CDR bytes (rclpy's serialized publishing), so nothing is
deserialised on the way; each topic is re-offered with the QoS it was recorded with (transient
local for /tf_static). `--clock` also publishes /clock (rosgraph_msgs/Clock) in bag time: exactly
each message's bag timestamp before that message, and ticks at the given rate in between. `--loop`
restarts from the first message, so bag time (and /clock) jumps back.

On a full ROS 2 install the same is `ros2 bag play BAG --rate R [--loop] [--clock HZ] [--topics ...]`.
A topic whose message package this Python cannot import is skipped with a warning: tf2_msgs is not
among the pip ROS wheels, so /tf_static is skipped there and the node takes the LiDAR->camera
extrinsic from its parameters; with a ROS install (or tf2_msgs built) it is played like any topic.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rclpy
from builtin_interfaces.msg import Time
from rclpy.duration import Duration
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rosbags.interfaces import QosDurability, QosHistory, QosReliability
from rosgraph_msgs.msg import Clock

from clip3d_ros import bag

log = logging.getLogger(__name__)

CLOCK_TOPIC = "/clock"


class ReplayError(ValueError):
    """Invalid replay options (rate, clock rate, --wait-for spec)."""


@dataclass
class ReplayOptions:
    rate: float = 1.0
    loop: bool = False
    clock_hz: float | None = None  # None: no /clock
    topics: Sequence[str] | None = None  # None: all
    # Topics that need subscribers before playing starts: "TOPIC" (one) or "TOPIC:N" (N of them).
    wait_for: Sequence[str] = ()
    wait_timeout: float = 30.0
    delay: float = 0.0  # seconds between setup (and waiting) and the first message
    max_loops: int | None = None  # with `loop`: stop after this many passes (None: until stopped)

    def __post_init__(self) -> None:
        for spec in self.wait_for:
            parse_wait_for(spec)
        if not self.rate > 0:
            raise ReplayError(f"rate must be > 0, got {self.rate}")
        if self.clock_hz is not None and not self.clock_hz > 0:
            raise ReplayError(f"clock rate must be > 0 Hz, got {self.clock_hz}")


@dataclass
class ReplayStats:
    published: Counter[str] = field(default_factory=Counter)
    skipped_topics: list[str] = field(default_factory=list)
    loops: int = 0
    clock_messages: int = 0
    wall_s: float = 0.0


def message_class(msgtype: str) -> type | None:
    """rclpy's class for 'pkg/msg/Name', or None when the package is not importable here."""
    pkg, _, name = msgtype.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.msg"), name)
    except (ImportError, AttributeError):
        return None


def qos_profile(recorded: Any | None, topic: str) -> Any:
    """rclpy QoSProfile from a recorded rosbags Qos (unknown/system-default parts: ROS defaults;
    no record: transient-local depth 1 for /tf_static, the ROS default otherwise)."""
    if recorded is None:
        if topic == "/tf_static":
            return QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        return QoSProfile(depth=10)
    history = HistoryPolicy.KEEP_ALL if recorded.history == QosHistory.KEEP_ALL else HistoryPolicy.KEEP_LAST
    reliability = (
        ReliabilityPolicy.BEST_EFFORT
        if recorded.reliability == QosReliability.BEST_EFFORT
        else ReliabilityPolicy.RELIABLE
    )
    durability = (
        DurabilityPolicy.TRANSIENT_LOCAL
        if recorded.durability == QosDurability.TRANSIENT_LOCAL
        else DurabilityPolicy.VOLATILE
    )
    return QoSProfile(
        history=history,
        depth=max(1, int(recorded.depth or 10)),
        reliability=reliability,
        durability=durability,
    )


def parse_wait_for(spec: str) -> tuple[str, int]:
    """A `--wait-for` spec: `TOPIC` -> (TOPIC, 1), `TOPIC:N` -> (TOPIC, N) (ROS names have no ':')."""
    topic, _, count = spec.partition(":")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise ReplayError(f"--wait-for {spec!r}: expected TOPIC or TOPIC:COUNT") from None
    if n < 1:
        raise ReplayError(f"--wait-for {spec!r}: COUNT must be >= 1")
    return topic, n


class BagPlayer:
    """Plays one bag through publishers on `node` (no executor needed: publishing only)."""

    def __init__(self, node: Any, bag_path: str | Path, options: ReplayOptions | None = None) -> None:
        self.node = node
        self.options = options or ReplayOptions()
        self.reader = bag.open_reader(bag_path)
        self.stats = ReplayStats()
        self._publishers: dict[int, Any] = {}  # connection id -> publisher
        for conn in bag.connections_for(self.reader, self.options.topics):
            cls = message_class(conn.msgtype)
            if cls is None:
                log.warning("skipping %s: message type %s is not importable here", conn.topic, conn.msgtype)
                self.stats.skipped_topics.append(conn.topic)
                continue
            profile = qos_profile(bag.offered_qos(conn), conn.topic)
            self._publishers[conn.id] = node.create_publisher(cls, conn.topic, profile)
        self._connections = [c for c in self.reader.connections if c.id in self._publishers]
        self._clock_pub = None
        if self.options.clock_hz is not None:
            self._clock_pub = node.create_publisher(Clock, CLOCK_TOPIC, QoSProfile(depth=10))

    def wait_for_acks(self, timeout: float = 5.0) -> bool:
        """Until every reliable subscriber acknowledged what was published (like `ros2 bag play
        --wait-for-all-acked`): a process that exits right after its last message would otherwise
        take samples still waiting for retransmission with it."""
        deadline = time.monotonic() + timeout
        ok = True
        for pub in self._publishers.values():
            left = max(0.0, deadline - time.monotonic())
            ok &= pub.wait_for_all_acked(Duration(nanoseconds=int(left * 1e9)))
        return ok

    def close(self) -> None:
        for pub in [*self._publishers.values(), self._clock_pub]:
            if pub is not None:
                self.node.destroy_publisher(pub)
        self.reader.close()

    # ------------------------------------------------------------------------------------ playing
    def wait_for_subscribers(self, stop: threading.Event) -> None:
        """Return once every `wait_for` topic has its subscribers (or on stop); `TimeoutError`
        after `wait_timeout` seconds. With reliable QoS a subscriber matched here gets every
        message, even one it matches itself only later (the publisher resends until acknowledged)."""
        by_topic = {c.topic: self._publishers[c.id] for c in self._connections}
        wanted = dict(parse_wait_for(spec) for spec in self.options.wait_for)
        missing = sorted(set(wanted) - set(by_topic))
        if missing:
            raise bag.BagError(f"--wait-for topics {missing} are not played from {self.reader.path}")
        deadline = time.monotonic() + self.options.wait_timeout
        while not stop.is_set():
            waiting = [t for t, n in wanted.items() if by_topic[t].get_subscription_count() < n]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no subscriber on {waiting} after {self.options.wait_timeout:.1f} s")
            stop.wait(0.05)

    def play(self, stop: threading.Event | None = None) -> ReplayStats:
        """Blocking; returns after the last pass, or soon after `stop` is set."""
        stop = stop or threading.Event()
        t_start = time.monotonic()
        if self.options.wait_for:
            self.wait_for_subscribers(stop)
        if self.options.delay > 0:
            stop.wait(self.options.delay)
        while not stop.is_set() and self._play_once(stop):
            self.stats.loops += 1
            if not self.options.loop or (
                self.options.max_loops is not None and self.stats.loops >= self.options.max_loops
            ):
                break
        self.stats.wall_s = time.monotonic() - t_start
        return self.stats

    def _messages(self) -> Iterator[tuple[int, int, bytes]]:
        for conn, timestamp, data in self.reader.messages(self._connections):
            yield conn.id, timestamp, data

    def _play_once(self, stop: threading.Event) -> bool:
        """One pass over the bag; False when stopped before its end."""
        rate = self.options.rate
        tick = None if self.options.clock_hz is None else 1.0 / self.options.clock_hz
        bag_t0: int | None = None
        wall_t0 = 0.0
        for conn_id, timestamp, data in self._messages():
            if bag_t0 is None:
                bag_t0, wall_t0 = timestamp, time.monotonic()
            due = wall_t0 + (timestamp - bag_t0) * 1e-9 / rate
            # Sleep in clock ticks (publishing bag time as it passes) or in one go.
            while (now := time.monotonic()) < due:
                if stop.is_set():
                    return False
                if tick is None:
                    stop.wait(due - now)
                    continue
                stop.wait(min(tick, due - now))
                if time.monotonic() < due:
                    self._publish_clock(bag_t0 + int((time.monotonic() - wall_t0) * rate * 1e9))
            if stop.is_set():
                return False
            if tick is not None:
                self._publish_clock(timestamp)
            pub = self._publishers[conn_id]
            pub.publish(data)
            self.stats.published[pub.topic_name] += 1
        return True

    def _publish_clock(self, ns: int) -> None:
        self._clock_pub.publish(Clock(clock=Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)))
        self.stats.clock_messages += 1


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bag", help="rosbag2 folder (sqlite3 or MCAP)")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (2 = twice as fast)")
    parser.add_argument("--loop", action="store_true", help="restart from the beginning at the end")
    parser.add_argument(
        "--clock",
        type=float,
        nargs="?",
        const=100.0,
        default=None,
        metavar="HZ",
        help="publish /clock in bag time, ticking at HZ between messages (default 100)",
    )
    parser.add_argument("--topics", nargs="+", default=None, help="only these topics (default: all)")
    parser.add_argument(
        "--wait-for",
        nargs="+",
        default=[],
        metavar="TOPIC[:N]",
        help="start only once these topics have a subscriber (N subscribers)",
    )
    parser.add_argument("--wait-timeout", type=float, default=30.0, help="seconds to wait for --wait-for")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep before the first message")
    parser.add_argument(
        "--ack-timeout",
        type=float,
        default=5.0,
        help="at the end, seconds to wait for reliable subscribers to acknowledge everything",
    )
    parser.add_argument("--node-name", default="clip3d_replay")


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT / SIGTERM set an event instead of killing the loop, so publishers close cleanly."""
    stop = threading.Event()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run(args: argparse.Namespace) -> int:
    try:
        options = ReplayOptions(
            rate=args.rate,
            loop=args.loop,
            clock_hz=args.clock,
            topics=args.topics,
            wait_for=args.wait_for,
            wait_timeout=args.wait_timeout,
            delay=args.delay,
        )
    except ReplayError as exc:
        log.error("%s", exc)
        return 2
    context = rclpy.Context()
    rclpy.init(context=context, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node(args.node_name, context=context)
    player: BagPlayer | None = None
    try:
        player = BagPlayer(node, args.bag, options)
        with _stop_on_signals() as stop:
            stats = player.play(stop)
            if not stop.is_set() and not player.wait_for_acks(args.ack_timeout):
                log.warning("some subscribers did not acknowledge everything within %.1f s", args.ack_timeout)
    except bag.BagError as exc:
        log.error("%s", exc)
        return 2
    except TimeoutError as exc:
        log.error("%s", exc)
        return 1
    finally:
        if player is not None:
            player.close()
        node.destroy_node()
        rclpy.try_shutdown(context=context)
    log.info(
        "published %s in %.2f s (%d pass(es), %d /clock)",
        dict(stats.published),
        stats.wall_s,
        stats.loops,
        stats.clock_messages,
    )
    return 0
