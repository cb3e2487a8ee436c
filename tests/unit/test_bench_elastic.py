"""`bench elastic`'s checkpoint timing, run small: the same run saves to a local directory and to a real S3 server
(moto on 127.0.0.1), both saves hold the same bytes, and the ratio is computed from the two measured times."""
from __future__ import annotations

import os

from raymoe.jobs.benches.elastic import checkpoint_timing, max_rel_diff
from raymoe.jobs.local_cluster import LocalS3


def test_checkpoint_timing_local_vs_s3(tmp_path, monkeypatch) -> None:
    s3 = LocalS3().start()
    try:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        rows = checkpoint_timing(s3, tmp_path, "tiny", saves=2)
    finally:
        s3.stop()
    assert [r["storage"] for r in rows] == ["local disk", "local S3 (moto)"]
    assert all(r["saves"] == 2 and r["s_per_save"] > 0 for r in rows)
    # the same checkpoint (tiny model, > 1 MB) but for config.json, which names the storage path and run dir
    assert rows[0]["bytes_per_save"] > 1_000_000 and abs(rows[0]["bytes_per_save"] - rows[1]["bytes_per_save"]) < 512
    assert rows[0]["vs_local"] == 1.0 and abs(rows[1]["vs_local"] - rows[1]["s_per_save"] / rows[0]["s_per_save"]) < 1e-12
    assert os.path.isdir(tmp_path / "local-store" / "checkpoints")


def test_max_rel_diff() -> None:
    assert max_rel_diff([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert abs(max_rel_diff([1.0, 2.2], [1.0, 2.0]) - 0.1) < 1e-12
    assert max_rel_diff([1.0], [1.0, 2.0]) == float("inf")  # a missing step is a failure, not a pass
