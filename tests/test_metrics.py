"""Metrics: (sum, count) reduction, pass-rate stats, JSONL resume truncation, TensorBoard events."""

import glob
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboardX.proto.event_pb2 import Event, SessionLog

from jaxsd import metrics as M


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=0, max_size=6),
        min_size=1,
        max_size=5,
    )
)
def test_summed_pairs_give_the_mean_over_all_tokens(micro_batches):
    pairs = [{"x": (np.float32(sum(mb)), np.float32(len(mb)))} for mb in micro_batches]
    reduced = M.reduce_metric_pairs(M.sum_metric_pairs(pairs))
    tokens = [v for mb in micro_batches for v in mb]
    if not tokens:
        assert reduced == {}  # count 0: the metric is absent, never NaN
    else:
        np.testing.assert_allclose(reduced["x"], np.mean(tokens), rtol=1e-5, atol=1e-3)


def test_reduce_pairs_drops_zero_count_and_rejects_negative():
    out = M.reduce_metric_pairs({"a": (6.0, 4.0), "b": (0.0, 0.0)})
    assert out == {"a": 1.5}
    with pytest.raises(ValueError, match="'c'"):
        M.reduce_metric_pairs({"c": (1.0, -1.0)})


def test_pass_rate_stats_and_histogram_by_hand():
    rates = [0.0, 0.25, 1.0, 0.5, 0.0, 0.75, 1.0, 0.0]  # G = 4
    stats = M.pass_rate_stats(rates)
    assert stats[M.PASS_RATE] == pytest.approx(3.5 / 8)
    assert stats[M.FRAC_ALL_WRONG] == pytest.approx(3 / 8)
    assert stats[M.FRAC_INTERMEDIATE] == pytest.approx(3 / 8)
    assert stats[M.FRAC_ALL_RIGHT] == pytest.approx(2 / 8)
    assert M.pass_rate_histogram(rates, 4) == [3, 1, 1, 1, 2]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.pass_rate_stats([0.5, 1.2])
    with pytest.raises(ValueError, match="group_size=0"):
        M.pass_rate_histogram(rates, 0)


def test_distribution_stats_by_hand():
    stats = M.distribution_stats("weights", [1.0, 3.0, 2.0, 2.0])
    assert stats == {
        "weights/mean": 2.0,
        "weights/std": pytest.approx(np.sqrt(0.5)),
        "weights/min": 1.0,
        "weights/max": 3.0,
    }
    assert M.distribution_stats("len", []) == {}
    with pytest.raises(ValueError, match="len: values must be finite"):
        M.distribution_stats("len", [1.0, float("inf")])


def _lines(path):
    with open(path) as fh:
        return [json.loads(ln) for ln in fh if ln.strip()]


def test_jsonl_is_flushed_and_truncated_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = M.MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        writer.write(step, {"loss": 10.0 - step, "n": np.int64(step)})
        assert [r["step"] for r in _lines(path)] == list(range(1, step + 1))  # flushed
    writer.write(6, {"loss": float("nan")})
    writer.close()
    assert _lines(path)[-1]["loss"] is None  # strict JSON: NaN becomes null
    with open(path, "a") as fh:
        fh.write('{"step": 7, "loss": 1.')  # torn line from a killed process
    with pytest.raises(ValueError, match="resume_step"):
        M.MetricsWriter(tmp_path, tensorboard=False)
    with M.MetricsWriter(tmp_path, resume_step=3, tensorboard=False) as writer:
        assert [r["step"] for r in _lines(path)] == [1, 2, 3]
        writer.write(4, {"loss": -4.0})
    rows = M.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [9.0, 8.0, 7.0, -4.0]
    assert rows[0]["n"] == 1 and isinstance(rows[0]["n"], int)


def test_non_main_process_writes_nothing(tmp_path):
    with M.MetricsWriter(tmp_path / "run", is_main_process=False) as writer:
        writer.write(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "run")


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path):
    """Parse a TFRecord event file (length, masked crc, payload, masked crc) into Events."""
    events = []
    with open(path, "rb") as fh:
        data = fh.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert len_crc == _masked(_crc32c(header))
        payload = data[pos + 12 : pos + 12 + length]
        (data_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert data_crc == _masked(_crc32c(payload))
        events.append(Event.FromString(payload))
        pos += 16 + length
    return events


def _effective_scalars(event_files, tag):
    """TensorBoard's view: a SessionLog START at step s drops earlier-read points with step >= s."""
    points = {}
    for path in event_files:
        for ev in _read_events(path):
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                points = {s: v for s, v in points.items() if s < ev.step}
            for value in ev.summary.value:
                if value.tag == tag:
                    points[ev.step] = value.simple_value
    return points


def test_tensorboard_events_are_readable_and_purged_on_resume(tmp_path):
    with M.MetricsWriter(tmp_path) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"loss": float(step)}, histograms={"rollout/p": [0.0, 0.5, 1.0]})
    first = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert len(first) == 1
    events = _read_events(first[0])
    loss = {ev.step: v.simple_value for ev in events for v in ev.summary.value if v.tag == "loss"}
    assert loss == {1: 1.0, 2: 2.0, 3: 3.0}
    hist = [v.histo for ev in events for v in ev.summary.value if v.tag == "rollout/p"]
    assert len(hist) == 3 and hist[0].num == 3 and hist[0].sum == pytest.approx(1.5)
    assert hist[0].min == 0.0 and hist[0].max == 1.0

    with M.MetricsWriter(tmp_path, resume_step=1) as writer:
        writer.write(2, {"loss": 20.0})
    # MetricsWriter's file suffix ends in time_ns: order the files by it.
    files = sorted(
        glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")),
        key=lambda f: int(f.rsplit(".", 1)[1]),
    )
    assert len(files) == 2
    assert _effective_scalars(files, "loss") == {1: 1.0, 2: 20.0}
    assert [r["loss"] for r in M.read_metrics(tmp_path)] == [1.0, 20.0]


def test_progress_shows_headline_metrics():
    bar = M.Progress(10, initial_step=2)
    bar.update(5, {M.REWARD: 0.5, M.PASS_RATE: 0.25, M.TOKENS_PER_S: 1234.4, "other": 1.0})
    assert bar._bar.n == 5
    assert bar._bar.postfix == "reward=0.500, pass=0.250, tok/s=1234"
    bar.close()
    silent = M.Progress(10, is_main_process=False)
    silent.update(3, {M.REWARD: 1.0})  # no bar on other processes
    silent.close()
