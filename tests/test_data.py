"""Streams: the synthetic stream's determinism and non-stationarity; Criteo TSV parsing."""

from __future__ import annotations

import gzip
import logging
import math
import random
import tracemalloc

import numpy as np
import pytest
import torch

from adsparse.data import (
    CRITEO_LIKE_SIZES,
    Batch,
    CriteoStream,
    Stream,
    SyntheticCTRStream,
    hash_category,
)
from adsparse.data.criteo import _parse_lines_slow, parse_lines

# ----------------------------------------------------------------------------- synthetic


# drift="regimes", seed 3, 6 periods (the drift_stream fixture): its first regime's pairs and
# period 0's clicks, as computed before "rewire" existed.
REGIMES_SEED3_PAIRS = [(4, 7), (4, 12), (7, 12), (10, 17)]
REGIMES_SEED3_P0_CLICKS = 535.0


def _collect(stream, p: int) -> Batch:
    batches = list(stream.period(p))
    return Batch(*(torch.cat(parts) for parts in zip(*batches)))


@pytest.fixture(scope="module")
def drift_stream() -> SyntheticCTRStream:
    # 6 periods, regimes start at periods 2 and 4; one big batch per period keeps it fast.
    return SyntheticCTRStream(num_periods=6, samples_per_period=8192, seed=3, batch_size=8192)


def test_batches_have_the_model_ready_format():
    s = SyntheticCTRStream(num_periods=3, samples_per_period=1000, seed=1, batch_size=300)
    assert isinstance(s, Stream)
    batches = list(s.period(2))
    assert [b.labels.numel() for b in batches] == [300, 300, 300, 100]
    for b in batches:
        assert b.dense.dtype == torch.float32 and b.dense.shape[1] == s.num_dense == 13
        assert b.sparse.dtype == torch.int64 and b.sparse.shape[1] == len(s.embedding_sizes) == 26
        assert b.labels.dtype == torch.float32
        assert set(b.labels.unique().tolist()) <= {0.0, 1.0}
        assert torch.isfinite(b.dense).all() and (b.dense >= 0).all()
        assert (b.sparse >= 0).all()
        assert (b.sparse < torch.tensor(s.embedding_sizes)).all()
    with pytest.raises(IndexError):
        next(iter(s.period(3)))


def test_deterministic_random_access_and_batch_size_independent():
    kwargs = {"num_periods": 5, "samples_per_period": 5000, "seed": 11}
    a = SyntheticCTRStream(batch_size=256, **kwargs)
    b = SyntheticCTRStream(batch_size=999, **kwargs)
    late_first = _collect(a, 4)  # read period 4 before any other
    for p in (0, 4):
        ref, other = _collect(a, p), _collect(b, p)
        for x, y in zip(ref, other):
            assert torch.equal(x, y)
    assert torch.equal(late_first.sparse, _collect(a, 4).sparse)
    c = SyntheticCTRStream(batch_size=256, **{**kwargs, "seed": 12})
    assert not torch.equal(_collect(c, 0).sparse, _collect(a, 0).sparse)
    assert not torch.equal(_collect(a, 0).dense, _collect(a, 1).dense)


@pytest.mark.parametrize("seed", [0, 7])
def test_base_ctr_in_range(seed):
    s = SyntheticCTRStream(num_periods=12, samples_per_period=4096, seed=seed, batch_size=4096)
    ctrs = [float(_collect(s, p).labels.mean()) for p in range(12)]
    assert all(0.03 <= c <= 0.30 for c in ctrs), ctrs


def test_regimes(drift_stream):
    s = drift_stream
    assert s.regime_boundaries == [2, 4]
    assert [s.regime_of(p) for p in range(6)] == [0, 0, 1, 1, 2, 2]
    pairs = [set(s.interaction_pairs(p)) for p in (0, 2, 4)]
    assert pairs[0] != pairs[1] and pairs[1] != pairs[2]


def _pair_correlations(s: SyntheticCTRStream, p: int, pairs) -> dict:
    """|corr(label, true latent dot of the pair)| over period p's samples."""
    batch = _collect(s, p)
    out = {}
    for f, g in pairs:
        dot = (s.latent_factors(f, batch.sparse[:, f], p + 0.5)
               * s.latent_factors(g, batch.sparse[:, g], p + 0.5)).sum(1).double()
        out[(f, g)] = abs(float(torch.corrcoef(torch.stack([dot, batch.labels.double()]))[0, 1]))
    return out


def test_the_interactions_that_drive_clicks_change_with_the_regime(drift_stream):
    s = drift_stream
    all_pairs = sorted({pair for p in (0, 2, 4) for pair in s.interaction_pairs(p)})
    for p in (1, 3, 5):
        corr = _pair_correlations(s, p, all_pairs)
        active = [corr[q] for q in s.interaction_pairs(p)]
        inactive = [corr[q] for q in all_pairs if q not in s.interaction_pairs(p)]
        # The labels follow this regime's pairs and not the other regimes' ones.
        assert np.mean(active) > 3 * np.mean(inactive), (p, active, inactive)
        assert min(active) > max(np.mean(inactive), 0.02)


def test_dense_statistics_shift_at_regime_changes(drift_stream):
    means = [_collect(drift_stream, p).dense.double().mean(0) for p in range(6)]
    def gap(a: int, b: int) -> float:
        return float((means[a] - means[b]).abs().mean())

    within = max(gap(0, 1), gap(2, 3))  # same regime, next period
    across = min(gap(1, 2), gap(3, 4))  # across a regime change
    assert across > 2 * within, (within, across)


def test_new_ids_appear_and_popularity_shifts():
    s = SyntheticCTRStream(num_periods=8, samples_per_period=8192, seed=5, batch_size=8192)
    f = max(range(len(s.embedding_sizes)), key=lambda i: s.embedding_sizes[i])  # a 10k table
    first, last = _collect(s, 0).sparse[:, f], _collect(s, 7).sparse[:, f]
    initial = s.available_ids(f, 0.0)
    assert initial < s.embedding_sizes[f] - 1
    assert int(first.max()) <= s.available_ids(f, 1.0)  # only IDs that exist by then
    new = last > initial
    assert float(new.float().mean()) > 0.05  # fresh IDs take a real share of the traffic
    assert len(set(last[new].tolist())) > 50
    # Popularity: the top IDs of the first period lose much of their traffic by the last.
    top = torch.bincount(first[first > 0]).topk(20).indices
    share_first = float(torch.isin(first, top).float().mean())
    share_last = float(torch.isin(last, top).float().mean())
    assert share_last < 0.7 * share_first, (share_first, share_last)


def test_regimes_rewire_pairs_of_one_pool_of_fields(drift_stream):
    s = drift_stream
    fields = {f for p in (0, 2, 4) for pair in s.interaction_pairs(p) for f in pair}
    assert len(fields) <= 6  # one pool: the fields' factors outlive a regime change
    assert len({tuple(s.interaction_pairs(p)) for p in (0, 2, 4)}) == 3


def test_rewire_moves_the_interactions_to_fields_of_their_own():
    # The online default: tables capped at 64 rows, so all 26 fields can take part and the
    # three pools of 6 are disjoint (with fewer fields they wrap around).
    s = SyntheticCTRStream(num_periods=6, samples_per_period=8192, seed=3, batch_size=8192,
                           embedding_sizes=[min(n, 64) for n in CRITEO_LIKE_SIZES],
                           drift="rewire")
    assert s.regime_boundaries == [2, 4]
    fields = [{f for pair in s.interaction_pairs(p) for f in pair} for p in (0, 2, 4)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert not fields[a] & fields[b], fields  # disjoint pools: new inputs matter
    all_pairs = sorted({pair for p in (0, 2, 4) for pair in s.interaction_pairs(p)})
    for p in (1, 3, 5):
        corr = _pair_correlations(s, p, all_pairs)
        active = [corr[q] for q in s.interaction_pairs(p)]
        inactive = [corr[q] for q in all_pairs if q not in s.interaction_pairs(p)]
        assert min(active) > 2 * max(inactive), (p, active, inactive)


def test_rewire_leaves_the_other_settings_unchanged(drift_stream):
    # "rewire" draws its pools in a branch of its own: "regimes" streams stay bit-identical
    # to the ones earlier benchmarks ran on (pinned here by their first pairs and labels).
    assert drift_stream.interaction_pairs(0) == REGIMES_SEED3_PAIRS
    assert float(_collect(drift_stream, 0).labels.sum()) == REGIMES_SEED3_P0_CLICKS


@pytest.mark.parametrize("drift", ["none", "slow"])
def test_drift_knob(drift):
    s = SyntheticCTRStream(num_periods=6, samples_per_period=4096, seed=4, batch_size=4096,
                           drift=drift)
    assert s.regime_boundaries == [] and s.regime_of(5) == 0
    ids = torch.arange(1, 20)
    moved = not torch.equal(s.latent_factors(3, ids, 0.0), s.latent_factors(3, ids, 5.0))
    assert moved == (drift == "slow")
    f = max(range(len(s.embedding_sizes)), key=lambda i: s.embedding_sizes[i])
    assert (s.available_ids(f, 0.0) == s.available_ids(f, 5.0)) == (drift == "none")
    first, last = _collect(s, 0), _collect(s, 5)
    # Stationary: the same ID frequencies and CTR in the first and the last period.
    if drift == "none":
        top = torch.bincount(first.sparse[:, f]).topk(10).indices
        a = float(torch.isin(first.sparse[:, f], top).float().mean())
        b = float(torch.isin(last.sparse[:, f], top).float().mean())
        assert abs(a - b) < 0.05, (a, b)
        assert abs(float(first.labels.mean()) - float(last.labels.mean())) < 0.03


def test_drift_knob_rejects_unknown_values():
    with pytest.raises(ValueError, match="drift must be one of"):
        SyntheticCTRStream(num_periods=3, samples_per_period=64, drift="fast")


def test_true_logits_are_the_bayes_predictor():
    s = SyntheticCTRStream(num_periods=2, samples_per_period=6000, seed=2, batch_size=1000)
    batches = list(s.true_logits(1))
    for (batch, logits), plain in zip(batches, s.period(1)):
        assert torch.equal(batch.labels, plain.labels)
        assert logits.shape == batch.labels.shape
    logits = torch.cat([lg for _, lg in batches]).double()
    labels = torch.cat([b.labels for b, _ in batches]).double()
    probs = torch.sigmoid(logits)
    # Calibrated (labels are Bernoulli(probs)) and far better than the constant predictor.
    assert abs(float(probs.mean() - labels.mean())) < 4 * math.sqrt(float(probs.mean()) / 6000)
    bce = torch.nn.functional.binary_cross_entropy(probs, labels)
    pbar = labels.mean()
    entropy = -(pbar * pbar.log() + (1 - pbar) * (1 - pbar).log())
    assert float(bce / entropy) < 0.9


def test_small_custom_tables():
    s = SyntheticCTRStream(num_periods=3, samples_per_period=500, seed=0, batch_size=128,
                           num_dense=4, embedding_sizes=[5, 9, 40])
    b = _collect(s, 2)
    assert b.dense.shape == (500, 4) and b.sparse.shape == (500, 3)
    assert (b.sparse < torch.tensor([5, 9, 40])).all()
    with pytest.raises(ValueError):
        SyntheticCTRStream(num_periods=3, regime_boundaries=[3])


# ----------------------------------------------------------------------------- Criteo


def _criteo_line(rnd: random.Random, label: str | None = None) -> str:
    dense = [str(rnd.randint(-3, 5000)) if rnd.random() > 0.15 else "" for _ in range(13)]
    cats = [f"{rnd.getrandbits(32):08x}" if rnd.random() > 0.15 else "" for _ in range(26)]
    return "\t".join([label or str(int(rnd.random() < 0.25))] + dense + cats)


def _expected_row(line: str, sizes: list[int]):
    cols = line.split("\t")
    dense = [math.log1p(max(int(v), 0)) if v else 0.0 for v in cols[1:14]]
    sparse = [hash_category(int(v, 16), f, sizes[f]) if v else 0 for f, v in enumerate(cols[14:])]
    return float(cols[0]), dense, sparse


def test_criteo_parses_every_field(tmp_path):
    rnd = random.Random(0)
    lines = [_criteo_line(rnd) for _ in range(37)]
    lines.append("1" + "\t" * 39)  # every feature empty
    path = tmp_path / "day_0"
    path.write_text("\n".join(lines) + "\n")
    sizes = [1000 + 7 * f for f in range(26)]
    s = CriteoStream([path], batch_size=10, hash_sizes=sizes)
    assert isinstance(s, Stream) and s.num_periods == 1 and s.embedding_sizes == sizes
    batches = list(s.period(0))
    assert [b.labels.numel() for b in batches] == [10, 10, 10, 8]
    got = Batch(*(torch.cat(parts) for parts in zip(*batches)))
    for i, line in enumerate(lines):
        label, dense, sparse = _expected_row(line, sizes)
        assert float(got.labels[i]) == label
        torch.testing.assert_close(got.dense[i], torch.tensor(dense, dtype=torch.float32))
        assert got.sparse[i].tolist() == sparse
    assert got.sparse[-1].tolist() == [0] * 26 and got.dense[-1].abs().sum() == 0
    assert ((got.sparse == 0) | ((got.sparse >= 1) & (got.sparse < torch.tensor(sizes)))).all()
    assert s.malformed_rows == 0


def test_criteo_skips_and_counts_malformed_rows(tmp_path, caplog):
    rnd = random.Random(1)
    good = [_criteo_line(rnd) for _ in range(20)]
    bad = [
        "garbage",
        "\t".join(good[0].split("\t")[:-1]),  # a column short
        good[1] + "\textra",  # a column too many
        "2" + good[2][1:],  # label not 0/1
        "\t".join(good[3].split("\t")[:5] + ["12x"] + good[3].split("\t")[6:]),  # bad count
        "\t".join(good[4].split("\t")[:14] + ["zzzz"] + good[4].split("\t")[15:]),  # bad hex
        "\xff\xfe binary junk",
    ]
    mixed = good[:7] + bad[:3] + good[7:14] + [""] + bad[3:] + good[14:]
    path = tmp_path / "day_1.txt"
    path.write_text("\n".join(mixed) + "\n", encoding="latin-1")
    s = CriteoStream(path, batch_size=8, hash_sizes=5000)
    with caplog.at_level(logging.WARNING, logger="adsparse.data.criteo"):
        labels = torch.cat([b.labels for b in s.period(0)])
    assert labels.numel() == 20
    assert labels.tolist() == [_expected_row(line, [5000] * 26)[0] for line in good]
    assert s.malformed_rows == len(bad) == s.malformed_by_period[0]
    assert "7 malformed" in caplog.text
    list(s.period(0))  # re-reading a period does not double count
    assert s.malformed_rows == len(bad)


def test_criteo_gzip_equals_plain_and_file_per_period(tmp_path):
    rnd = random.Random(2)
    text = "\n".join(_criteo_line(rnd) for _ in range(50)) + "\n"
    (tmp_path / "day_0").write_text(text)
    with gzip.open(tmp_path / "day_0.gz", "wt") as fh:
        fh.write(text)
    s = CriteoStream([tmp_path / "day_0", tmp_path / "day_0.gz"], batch_size=16)
    assert s.num_periods == 2
    for x, y in zip(_collect(s, 0), _collect(s, 1)):
        assert torch.equal(x, y)


def test_criteo_rows_per_period_across_files(tmp_path):
    rnd = random.Random(3)
    lines = [_criteo_line(rnd) for _ in range(25)]
    (tmp_path / "a").write_text("\n".join(lines[:11]) + "\n")
    with gzip.open(tmp_path / "b.gz", "wt") as fh:
        fh.write("\n".join(lines[11:]) + "\n")
    paths = [tmp_path / "a", tmp_path / "b.gz"]
    s = CriteoStream(paths, rows_per_period=7, batch_size=4)
    assert s.num_periods == 4
    whole = CriteoStream(paths, rows_per_period=100, batch_size=100)
    everything = _collect(whole, 0)
    for p in (3, 1, 0, 2):  # any order
        chunk = _collect(s, p)
        lo, hi = 7 * p, min(7 * p + 7, 25)
        assert torch.equal(chunk.sparse, everything.sparse[lo:hi])
        assert torch.equal(chunk.labels, everything.labels[lo:hi])
    capped = CriteoStream(paths, rows_per_period=7, num_periods=2)
    assert capped.num_periods == 2
    with pytest.raises(IndexError):
        capped.period(2)


def test_criteo_missing_or_unreadable_files_fail_at_construction(tmp_path):
    (tmp_path / "ok").write_text(_criteo_line(random.Random(4)) + "\n")
    with pytest.raises(FileNotFoundError, match="day_9"):
        CriteoStream([tmp_path / "ok", tmp_path / "day_9"])
    (tmp_path / "fake.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(OSError, match=r"fake\.gz"):
        CriteoStream(tmp_path / "fake.gz")
    with pytest.raises(OSError, match="not a regular file"):
        CriteoStream(tmp_path)
    with pytest.raises(ValueError):
        CriteoStream([])
    with pytest.raises(ValueError, match="hash_sizes"):
        CriteoStream(tmp_path / "ok", hash_sizes=[10] * 3)


def _peak_bytes_reading(stream: CriteoStream) -> tuple[int, int]:
    """(rows, peak Python-heap bytes) while reading period 0 to the end."""
    tracemalloc.start()
    try:
        rows = sum(b.labels.numel() for b in stream.period(0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return rows, peak


def test_criteo_reads_in_bounded_memory(tmp_path):
    peaks = {}
    for lines in (1500, 6000):
        rnd = random.Random(5)
        path = tmp_path / f"day_{lines}.gz"
        with gzip.open(path, "wt", compresslevel=1) as fh:
            for _ in range(lines):
                fh.write(_criteo_line(rnd) + "\n")
        rows, peaks[lines] = _peak_bytes_reading(CriteoStream(path, batch_size=32))
        assert rows == lines
    # Four times the file, the same peak: memory is set by the parsing chunk, not the file.
    assert peaks[6000] < 1.25 * peaks[1500], peaks


def test_criteo_vector_parser_equals_line_by_line_reference():
    rnd = random.Random(8)
    lines = [(_criteo_line(rnd) + "\n").encode() for _ in range(300)]
    lines[5] = lines[5].replace(b"\t", b"\tA", 1)  # "A12": not an integer
    lines[9] = b"\n"
    lines[11] = lines[11][:-1] + b"\r\n"
    cols = lines[20].split(b"\t")
    cols[20] = b"DEADbeef"  # upper-case hex is valid
    cols[21] = b"12g4"  # not hex
    lines[20] = b"\t".join(cols)
    cols = lines[30].split(b"\t")
    cols[15] = b"ab\x00cd"  # a NUL inside a value
    lines[30] = b"\t".join(cols)
    sizes = [97 + f for f in range(26)]
    fast = parse_lines(lines, sizes)
    slow = _parse_lines_slow(lines, sizes)
    assert fast[3] == slow[3] == 3  # lines 5 (count), 20 (hex) and 30 (NUL); 9 is blank
    assert len(fast[2]) == 300 - 4
    for a, b in zip(fast[:3], slow[:3]):
        assert np.array_equal(a, b)
    # A value longer than 64 bits takes the reference path and still parses.
    cols = lines[40].split(b"\t")
    cols[16] = b"1" * 20
    long_line = [b"\t".join(cols)]
    for a, b in zip(parse_lines(long_line, sizes), _parse_lines_slow(long_line, sizes)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_hash_category_range_and_spread():
    size = 97
    hashed = [hash_category(v, 3, size) for v in range(20000)]
    assert min(hashed) >= 1 and max(hashed) < size
    counts = np.bincount(hashed, minlength=size)[1:]
    assert counts.min() > 0.6 * counts.mean()  # no bucket starves
    assert hash_category(12345, 0, size) != hash_category(12345, 1, size) or \
        hash_category(54321, 0, size) != hash_category(54321, 1, size)


# ----------------------------------------------------------------------------- damaged Criteo data
def _criteo_bytes(rows: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    return ("\n".join(_criteo_line(rnd) for _ in range(rows)) + "\n").encode()


def _read_all(stream: CriteoStream) -> Batch:
    batches = [b for p in range(stream.num_periods) for b in stream.period(p)]
    if not batches:
        return Batch(torch.zeros(0, 13), torch.zeros(0, 26, dtype=torch.int64), torch.zeros(0))
    return Batch(*(torch.cat(parts) for parts in zip(*batches)))


def test_criteo_truncated_gzip_is_read_up_to_the_damage(tmp_path, caplog):
    raw = gzip.compress(_criteo_bytes(600, 10))
    path = tmp_path / "day_0.gz"
    path.write_bytes(raw[: len(raw) // 2])
    s = CriteoStream(path, batch_size=64)
    with caplog.at_level(logging.WARNING, logger="adsparse.data.criteo"):
        rows = _read_all(s).labels.numel()
    assert 0 < rows < 600
    assert s.malformed_rows == 1 and s.damaged_files == [str(path)]  # the rest: one line
    assert "day_0.gz is damaged" in caplog.text


def test_criteo_corrupt_gzip_body_and_crc_are_counted_not_fatal(tmp_path):
    raw = bytearray(gzip.compress(_criteo_bytes(600, 11)))
    body = tmp_path / "body.gz"
    flipped = raw.copy()
    flipped[len(raw) // 3] ^= 0xFF  # inside the deflate stream
    body.write_bytes(bytes(flipped))
    crc = tmp_path / "crc.gz"
    flipped = raw.copy()
    flipped[-6] ^= 0x01  # the CRC32 trailer: every line decompresses, the check fails
    crc.write_bytes(bytes(flipped))
    s = CriteoStream([body, crc], batch_size=64)
    _read_all(s)
    assert s.damaged_files == sorted([str(body), str(crc)])
    assert s.malformed_by_period[1] == 1


def test_criteo_huge_count_is_a_malformed_row(tmp_path):
    rnd = random.Random(12)
    lines = [_criteo_line(rnd) for _ in range(30)]
    cols = lines[7].split("\t")
    cols[3] = "9" * 400  # beyond float64: OverflowError in the reference parser
    lines[7] = "\t".join(cols)
    path = tmp_path / "day_0"
    path.write_text("\n".join(lines) + "\n")
    s = CriteoStream(path, batch_size=8)
    assert _read_all(s).labels.numel() == 29 and s.malformed_rows == 1


def test_criteo_unopenable_file_is_one_clear_error(tmp_path):
    from adsparse.data.criteo import CriteoReadError

    path = tmp_path / "day_0"
    path.write_text(_criteo_bytes(20, 13).decode())
    s = CriteoStream(path)
    path.unlink()  # gone between the construction and the read
    with pytest.raises(CriteoReadError, match="day_0"):
        list(s.period(0))


def test_criteo_malformed_count_of_a_resumed_run_equals_the_straight_run(tmp_path):
    rnd = random.Random(14)
    lines = [_criteo_line(rnd) for _ in range(90)]
    for i in range(0, 90, 7):
        lines[i] = "garbage\t" + lines[i]
    (tmp_path / "a").write_text("\n".join(lines) + "\n")
    straight = CriteoStream(tmp_path / "a", rows_per_period=20, batch_size=8)
    _read_all(straight)
    first = CriteoStream(tmp_path / "a", rows_per_period=20, batch_size=8)
    list(first.period(0))
    list(first.period(1))  # killed after period 1's checkpoint
    resumed = CriteoStream(tmp_path / "a", rows_per_period=20, batch_size=8)
    resumed.load_state_dict(first.state_dict())
    for p in range(2, resumed.num_periods):
        list(resumed.period(p))
    assert resumed.malformed_rows == straight.malformed_rows == 13
    assert resumed.malformed_by_period == straight.malformed_by_period
    # Without a checkpoint the count is re-derived from the files, period by period.
    fresh = CriteoStream(tmp_path / "a", rows_per_period=20, batch_size=8)
    assert sum(fresh.count_malformed(p) for p in range(5)) == 13


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_criteo_fuzz_truncations_and_byte_flips_never_raise_while_reading(tmp_path, suffix):
    """Random truncations and byte flips of a small file: the stream either refuses the file at
    construction with an OSError naming it, or reads every period to the end without raising,
    yielding only well-formed batches."""
    from adsparse.data.criteo import CriteoReadError

    text = _criteo_bytes(120, 15)
    raw = gzip.compress(text) if suffix else text
    rnd = random.Random(16)
    refused = 0
    for case in range(40):
        data = bytearray(raw)
        if case % 2 == 0:
            del data[rnd.randrange(len(data)):]
        for _ in range(rnd.randint(0 if case % 2 == 0 else 1, 4)):
            if data:
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        path = tmp_path / f"case{case}{suffix}"
        path.write_bytes(bytes(data))
        try:
            s = CriteoStream(path, rows_per_period=50 if case % 3 == 0 else None,
                             batch_size=16, hash_sizes=100)
        except CriteoReadError as err:
            assert path.name in str(err)
            refused += 1
            continue
        got = _read_all(s)
        assert got.labels.numel() <= 120 and set(got.labels.tolist()) <= {0.0, 1.0}
        assert ((got.sparse >= 0) & (got.sparse < 100)).all()
        assert torch.isfinite(got.dense).all()
    if not suffix:
        assert refused == 0  # a plain file is never refused: every byte is "a line"
