"""Checkpoints hold only data, are verified, written atomically, and used by one run at a time."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adsparse.online.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    CheckpointLock,
    load_checkpoint,
    save_checkpoint,
)


class _Touch:
    """Unpickling this creates a file: what an attacker's checkpoint would do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _signed(payload_obj: object) -> bytes:
    """A file with a valid header and checksum around ``payload_obj`` (an attacker can sign)."""
    buf = io.BytesIO()
    torch.save(payload_obj, buf)
    payload = buf.getvalue()
    return (b"ADSPARSE-CHECKPOINT 1\n" + hashlib.sha256(payload).hexdigest().encode() + b"\n"
            + payload)


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"next_period": 3, "weights": torch.randn(64, 64, generator=g),
            "history": [{"ne": 0.9, "scored": True}], "name": "run"}


def test_round_trip_is_exact_and_weights_only(tmp_path):
    state = _state()
    save_checkpoint(tmp_path, state)
    back = load_checkpoint(tmp_path)
    assert back["next_period"] == 3 and back["history"] == state["history"]
    torch.testing.assert_close(back["weights"], state["weights"], rtol=0, atol=0)
    assert load_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("signed", [True, False])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, signed):
    marker = tmp_path / "pwned"
    evil = {"next_period": 1, "x": _Touch(marker)}
    if signed:
        blob = _signed(evil)
    else:
        buf = io.BytesIO()
        torch.save(evil, buf)
        blob = buf.getvalue()
    (tmp_path / CHECKPOINT_NAME).write_bytes(blob)
    with pytest.raises(CheckpointError, match="other than tensors and plain data"
                       if signed else "not an adsparse checkpoint"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_cli_refuses_a_malicious_checkpoint_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / CHECKPOINT_NAME).write_bytes(_signed({"next_period": 1, "x": _Touch(marker)}))
    proc = subprocess.run(
        [sys.executable, "-m", "adsparse.cli", "run", "--periods", "2", "--samples-per-period",
         "128", "--batch-size", "64", "--max-table-rows", "40", "--no-progress",
         "--strategies", "prune_once", "--out", str(tmp_path / "out"),
         "--checkpoint-dir", str(ckpt)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "plain data" in proc.stderr
    assert not marker.exists()


def _damage(kind: str, blob: bytes) -> bytes:
    head = len(b"ADSPARSE-CHECKPOINT 1\n") + 65
    if kind == "truncated":
        return blob[: len(blob) * 2 // 3]
    if kind == "empty":
        return b""
    if kind == "random":
        return torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                             dtype=torch.uint8).numpy().tobytes()
    if kind == "zeroed":  # the tensor bytes zeroed, header and length intact
        mid = head + (len(blob) - head) // 2
        return blob[:mid] + bytes(1024) + blob[mid + 1024:]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "empty", "random", "zeroed"])
def test_damaged_checkpoint_says_which_file_and_what_to_do(tmp_path, kind):
    path = save_checkpoint(tmp_path, _state())
    path.write_bytes(_damage(kind, path.read_bytes()))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "--checkpoint-dir" in msg
    assert ("damaged" in msg) or ("not an adsparse checkpoint" in msg)


def test_stale_temporaries_are_removed_at_the_next_write(tmp_path):
    stale = tmp_path / ".online-abc123.tmp"
    stale.write_bytes(b"x" * 1000)
    save_checkpoint(tmp_path, _state())
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_lock_refuses_a_second_run(tmp_path):
    busy = f"in use by another run \\(pid {os.getpid()}"
    with CheckpointLock(tmp_path), pytest.raises(CheckpointError, match=busy), \
            CheckpointLock(tmp_path):
        pass
    with CheckpointLock(tmp_path):  # released: usable again
        pass


def test_lock_is_dropped_when_its_process_dies(tmp_path):
    code = ("import sys, os; from adsparse.online.checkpoint import CheckpointLock; "
            "CheckpointLock(sys.argv[1]).__enter__(); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120)
    with CheckpointLock(tmp_path):
        pass


def test_a_checkpoint_missing_keys_is_one_clear_error(tmp_path):
    from adsparse.data import SyntheticCTRStream
    from adsparse.online import OnlineConfig, OnlineTrainer, default_components

    stream = SyntheticCTRStream(num_periods=2, samples_per_period=128, seed=1, batch_size=64,
                                embedding_sizes=[20, 7, 30])
    comps = default_components(stream.num_dense, stream.embedding_sizes,
                               model={"embedding_dim": 8, "bottom_mlp": [16, 8],
                                      "top_mlp": [16, 1]})
    cfg = OnlineConfig(strategies=["dense"])
    save_checkpoint(tmp_path, {"next_period": 1, "dense": {}})
    trainer = OnlineTrainer(stream, cfg, comps, checkpoint_dir=str(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match=r"lacks 'fingerprint'.*--checkpoint-dir"):
        trainer.run()
