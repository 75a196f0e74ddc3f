"""The approximate-time synchroniser on synthetic stamps: message_filters semantics, jitter and
drops, dead and late cameras, and clock jumps (looped bags). No ROS needed."""

from __future__ import annotations

import itertools
import random

import pytest

from clip3d_ros import sync as sync_module
from clip3d_ros.sync import ApproximateTimeSynchronizer, CloudCameraSync, message_filters_available

MS = 1_000_000
SLOP = 0.05


def test_matches_within_slop_and_consumes_the_set() -> None:
    sync = ApproximateTimeSynchronizer(3, queue_size=5, slop=SLOP)
    assert sync.add(0, 1000 * MS, "a0") is None
    assert sync.add(1, 1020 * MS, "b0") is None
    assert sync.add(2, 1049 * MS, "c0") == ("a0", "b0", "c0")
    assert all(sync.queued(i) == [] for i in range(3))  # matched entries are removed
    # a set spanning >= slop does not match even when each is within slop of the newcomer
    sync.add(0, 2000 * MS, "a1")
    sync.add(1, 2060 * MS, "b1")
    assert sync.add(2, 2030 * MS, "c1") is None


def test_closest_candidates_win_and_callbacks_fire() -> None:
    got = []
    sync = ApproximateTimeSynchronizer(2, queue_size=5, slop=SLOP)
    sync.register_callback(lambda *m: got.append(m))
    sync.add(1, 960 * MS, "far")
    sync.add(1, 995 * MS, "near")
    assert sync.add(0, 1000 * MS, "cloud") == ("cloud", "near")
    assert got == [("cloud", "near")]
    assert sync.queued(1) == [960 * MS]


def test_queue_evicts_oldest() -> None:
    sync = ApproximateTimeSynchronizer(2, queue_size=3, slop=SLOP)
    for k in range(5):
        sync.add(0, k * 1000 * MS, k)
    assert sync.queued(0) == [2000 * MS, 3000 * MS, 4000 * MS]
    assert sync.add(1, 0, "late") is None  # its partner was evicted


def test_plain_policy_wedges_after_a_backward_jump_and_cloud_sync_does_not() -> None:
    """Why the reset exists: after a bag loops, message_filters' queues hold 'future' stamps and
    evict every new (older) message as the oldest, so nothing ever matches again."""
    plain = ApproximateTimeSynchronizer(2, queue_size=3, slop=SLOP)
    for k in range(3):  # clouds whose images were dropped stay queued
        plain.add(0, (50_000 + 100 * k) * MS, f"old{k}")
    matched = []
    for k in range(5):  # the bag loops back to t = 0
        matched.append(plain.add(0, k * 100 * MS, f"new{k}"))  # evicted at once as the "oldest"
        matched.append(plain.add(1, k * 100 * MS + 5 * MS, f"img{k}"))
    assert all(m is None for m in matched)
    assert plain.queued(0) == [50_000 * MS, 50_100 * MS, 50_200 * MS]

    sync = CloudCameraSync(1, queue_size=3, slop=SLOP, camera_timeout=10.0, jump_threshold=1.0)
    out = []
    for k in range(3):
        out += sync.add_cloud(f"old{k}", (50_000 + 100 * k) * MS, k)
    for k in range(5):  # the bag loops back to t = 0
        out += sync.add_cloud(f"new{k}", k * 100 * MS, 100 + k)
        out += sync.add_image(0, f"img{k}", k * 100 * MS + 5 * MS, 100 + k)
    assert sync.resets == 1
    new = [f for f in out if str(f.cloud).startswith("new")]
    assert [f.cloud for f in new] == [f"new{k}" for k in range(5)]
    assert all(f.matched and f.images == (f"img{k}",) for k, f in enumerate(new))
    assert {f.cloud for f in out} >= {"old0", "old1", "old2"}  # pending clouds were released, not lost


def _stream(
    seconds: float, cameras: int, drop: float, jitter_ms: float, seed: int
) -> tuple[list[tuple[int, str, int, object]], dict[int, dict[int, int]]]:
    """Arrival-ordered events (arrival_ns, kind, camera, (name, stamp)) of a 10 Hz rig, and per
    cloud tick the stamps of the images that exist."""
    rng = random.Random(seed)
    events, existing = [], {}
    for k in range(int(seconds * 10)):
        t = 1_000_000 * MS + k * 100 * MS
        events.append((t + rng.uniform(0, 30) * MS, "cloud", -1, (f"cloud{k}", t)))
        existing[t] = {}
        for c in range(cameras):
            if rng.random() < drop:
                continue
            s = int(t + rng.uniform(-jitter_ms, jitter_ms) * MS)
            existing[t][c] = s
            events.append((s + rng.uniform(0, 60) * MS, "image", c, (f"img{c}_{k}", s)))
    events.sort(key=lambda e: e[0])
    return [(int(a), kind, c, payload) for a, kind, c, payload in events], existing


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jittered_stream_with_drops(seed: int) -> None:
    events, existing = _stream(seconds=6, cameras=3, drop=0.1, jitter_ms=15, seed=seed)
    sync = CloudCameraSync(3, queue_size=10, slop=SLOP, camera_timeout=0.15)
    frames = []
    now = 0
    for now, kind, cam, (name, stamp) in events:
        frames += sync.poll(now)
        frames += (
            sync.add_cloud(name, stamp, now) if kind == "cloud" else sync.add_image(cam, name, stamp, now)
        )
    frames += sync.poll(now + 10**9)
    # every cloud exactly once, in order
    assert [f.stamp_ns for f in frames] == sorted(existing)
    assert len({f.cloud for f in frames}) == len(existing)
    used_in_matches = [img for f in frames if f.matched for img in f.images]
    assert len(used_in_matches) == len(set(used_in_matches))  # an image is matched to one cloud only
    for f in frames:
        k = (f.stamp_ns - 1_000_000 * MS) // (100 * MS)
        for c, img in enumerate(f.images):
            if c in existing[f.stamp_ns]:
                assert img == f"img{c}_{k}", (f.cloud, c, img)  # the same tick's image, never a neighbour's
            else:
                assert img is None  # a dropped image leaves the camera missing (neighbours are > slop away)
        assert f.complete == (len(existing[f.stamp_ns]) == 3)
    assert sum(f.complete for f in frames) >= 0.6 * len(frames)


def test_dead_camera_never_stalls_clouds() -> None:
    sync = CloudCameraSync(2, queue_size=10, slop=SLOP, camera_timeout=0.15)
    out = []
    for k in range(10):
        t = k * 100 * MS
        out += sync.add_image(0, f"img{k}", t, t + 5 * MS)
        out += sync.add_cloud(f"cloud{k}", t, t + 10 * MS)
        out += sync.poll(t + 80 * MS)
    out += sync.poll(10**12)
    assert [f.cloud for f in out] == [f"cloud{k}" for k in range(10)]
    assert all(not f.matched and f.missing == [1] and f.images[0] is not None for f in out)
    # released by the timeout (camera 1 never spoke), i.e. 150 ms after arrival, not later
    sync2 = CloudCameraSync(2, queue_size=10, slop=SLOP, camera_timeout=0.15)
    assert sync2.add_cloud("c", 0, 1000 * MS) == []
    assert sync2.poll(1149 * MS) == []
    assert [f.cloud for f in sync2.poll(1150 * MS)] == ["c"]


def test_decided_cameras_release_before_the_timeout() -> None:
    """A camera whose newest image is already past stamp + slop can no longer match: the cloud goes
    out as soon as every camera is decided, without waiting for the timeout."""
    sync = CloudCameraSync(2, queue_size=10, slop=SLOP, camera_timeout=5.0)
    assert sync.add_cloud("c0", 0, 0) == []
    assert sync.add_image(0, "a0", 2 * MS, 1 * MS) == []  # camera 1 still undecided
    out = sync.add_image(1, "b1", 100 * MS, 2 * MS)  # camera 1 skipped this tick
    assert [(f.cloud, f.images, f.matched) for f in out] == [("c0", ("a0", None), False)]


def test_late_images_within_timeout_still_match() -> None:
    sync = CloudCameraSync(1, queue_size=10, slop=SLOP, camera_timeout=0.15)
    assert sync.add_cloud("c", 1000 * MS, 1000 * MS) == []
    assert sync.poll(1100 * MS) == []
    out = sync.add_image(0, "img", 1010 * MS, 1120 * MS)  # 120 ms late, inside the timeout
    assert [(f.cloud, f.images, f.matched) for f in out] == [("c", ("img",), True)]


def test_pending_overflow_releases_oldest_and_slop_is_live() -> None:
    sync = CloudCameraSync(1, queue_size=2, slop=SLOP, camera_timeout=100.0)
    out = []
    for k in range(4):
        out += sync.add_cloud(f"c{k}", k * 10 * MS, 0)  # no image yet: camera 0 undecided
    assert [f.cloud for f in out] == ["c0", "c1"]  # beyond queue_size the oldest go out
    sync.slop = 0.2
    assert sync.slop == 0.2
    out = sync.add_image(0, "img", 120 * MS, 0)  # 90 ms off c3: a match only with the wider slop
    assert [(f.cloud, f.matched, f.images) for f in out] == [("c2", False, ("img",)), ("c3", True, ("img",))]


def test_frames_leave_in_stamp_order() -> None:
    sync = CloudCameraSync(2, queue_size=10, slop=SLOP, camera_timeout=5.0)
    sync.add_cloud("c0", 0, 0)
    sync.add_image(0, "a0", -30 * MS, 0)  # camera 1 missed tick 0; camera 0 is not decided yet
    sync.add_cloud("c1", 60 * MS, 0)
    sync.add_image(1, "b1", 60 * MS, 0)
    out = sync.add_image(0, "a1", 61 * MS, 0)  # completes c1, which must not overtake c0
    assert [(f.cloud, f.matched) for f in out] == [("c0", False), ("c1", True)]
    assert out[0].images == ("a0", None)


def test_lidar_only_emits_immediately() -> None:
    sync = CloudCameraSync(0)
    out = sync.add_cloud("c", 5, 5)
    assert len(out) == 1 and out[0].complete and out[0].images == ()


def test_receipt_clock_jump_back_does_not_freeze_timeouts() -> None:
    sync = CloudCameraSync(1, queue_size=10, slop=SLOP, camera_timeout=0.1)
    sync.add_cloud("c", 0, 5000 * MS)
    assert sync.poll(10 * MS) == []  # ROS clock jumped back (sim time loop): re-anchored...
    assert [f.cloud for f in sync.poll(110 * MS)] == ["c"]  # ...and times out from there


def test_two_clouds_with_one_stamp_both_come_out() -> None:
    sync = CloudCameraSync(1, queue_size=10, slop=SLOP, camera_timeout=5.0)
    assert sync.add_cloud("first", 1000 * MS, 0) == []
    out = sync.add_cloud("second", 1000 * MS, 0)  # a driver or bag repeating a stamp
    assert [(f.cloud, f.matched) for f in out] == [("first", False)]
    assert [(f.cloud, f.matched) for f in sync.add_image(0, "img", 1000 * MS, 0)] == [("second", True)]


def test_steady_backstop_releases_clouds_when_the_ros_clock_stands_still(monkeypatch) -> None:
    steady = [0]
    monkeypatch.setattr(sync_module.time, "monotonic_ns", lambda: steady[0])
    sync = CloudCameraSync(1, queue_size=10, slop=SLOP, camera_timeout=0.15)
    sync.add_cloud("last", 20_000 * MS, 20_000 * MS)  # the bag's last cloud; its image never comes
    steady[0] = round((sync_module.STEADY_BACKSTOP_S - 0.01) * 1e9)
    assert sync.poll(20_000 * MS) == []  # /clock has stopped: sim time stands at the last message
    steady[0] = round(sync_module.STEADY_BACKSTOP_S * 1e9)
    assert [(f.cloud, f.matched) for f in sync.poll(20_000 * MS)] == [("last", False)]


@pytest.mark.skipif(not message_filters_available(), reason="message_filters not installed (ROS apt only)")
def test_same_matches_as_message_filters() -> None:
    import builtin_interfaces.msg
    from std_msgs.msg import Header

    from clip3d_ros.sync import MessageFiltersSynchronizer

    class Msg:
        def __init__(self, name: str, ns: int) -> None:
            self.name = name
            self.header = Header(stamp=builtin_interfaces.msg.Time(sec=ns // 10**9, nanosec=ns % 10**9))

    events, _ = _stream(seconds=4, cameras=2, drop=0.1, jitter_ms=20, seed=3)
    ours = ApproximateTimeSynchronizer(3, 10, SLOP)
    theirs = MessageFiltersSynchronizer(3, 10, SLOP)
    for _, kind, cam, (name, stamp) in events:
        idx = 0 if kind == "cloud" else cam + 1
        m = Msg(name, stamp)
        a, b = ours.add(idx, stamp, m), theirs.add(idx, stamp, m)
        assert (a is None) == (b is None)
        if a is not None:
            assert [x.name for x in a] == [x.name for x in b]


def test_events_cover_arrival_reordering() -> None:
    # the jitter stream really delivers images before and after their cloud (guards the tests above)
    events, _ = _stream(seconds=3, cameras=3, drop=0.0, jitter_ms=15, seed=0)
    order = [kind for _, kind, _, _ in events]
    assert any(a == "image" and b == "cloud" for a, b in itertools.pairwise(order))
    assert any(a == "cloud" and b == "image" for a, b in itertools.pairwise(order))


def test_frame_queue_keeps_the_newest_per_sensor_and_serves_in_arrival_order() -> None:
    from clip3d_ros.frame_queue import FrameQueue

    q = FrameQueue(2)
    assert q.put("a", 1) == 0 and q.put("b", 2) == 0 and q.put("a", 3) == 0
    assert q.put("a", 4) == 1  # a full: its oldest (1) goes, b is untouched
    assert len(q) == 3 and q.high_water == 3
    assert [q.pop(), q.pop(), q.pop(), q.pop()] == [2, 3, 4, None]
    assert not q
    with pytest.raises(ValueError):
        FrameQueue(0)
