"""The benchmark script runs end to end and reports what it promises (timings are not asserted:
speed targets are read from its output, see README "Speed")."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_meta_iteration_benchmark_reports_ratios_limits_and_memory(tmp_path, omniglot_root):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "meta_iteration.py"), "--data-root", str(omniglot_root),
         "--meta-batch-size", "2", "--steps", "1", "--queries", "1", "--memory-steps", "1", "2", "--repeats", "1",
         "--implementations", "ours maml vectorized", "ours maml per-task", "ours fomaml vectorized",
         "learn2learn maml", "learn2learn fomaml", "textbook maml loop", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "device: cpu" in done.stdout and "conv throughput" in done.stdout
    assert "× the meta-iterations/s of learn2learn maml" in done.stdout
    assert "FOMAML vs MAML (vectorized)" in done.stdout
    assert "ours imaml vectorized: peak memory at 2 inner steps is" in done.stdout
    report = json.loads(out.read_text())
    names = {row["implementation"] for row in report["rows"]}
    assert names == {"ours maml vectorized", "ours maml per-task", "ours fomaml vectorized", "learn2learn maml",
                     "learn2learn fomaml", "textbook maml loop"}
    maml = [r for r in report["rows"] if r["implementation"] in ("ours maml vectorized", "textbook maml loop")]
    assert maml[0]["gflop"] == maml[1]["gflop"] > 0  # both read against MAML's own FLOP count
    assert all(r["seconds"] > 0 and r["limit_seconds"] > 0 for r in report["rows"])
