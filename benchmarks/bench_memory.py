"""Training data in memory against memory-mapped: peak memory as the corpus grows 10x.

Writes train shards for a corpus of N and of 10N windows (seq_len 100, the real ShardWriter),
then, each in a fresh process, goes once over the split in shuffled batches of 64 the way the
training loop does: (a) `read_split`, the whole split in memory, as training read it before;
(b) `open_split`, each shard memory-mapped from its `.npy` copy in the cache. It samples the
process's own (anonymous) resident memory every 10 ms and prints a markdown table of its peak,
and of VmHWM (which also counts the page cache's file pages the process touched).

    PYTHONPATH=. python benchmarks/bench_memory.py            # about a minute
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEQ = 100
PROBE = r"""
import json, sys, threading, time
import numpy as np
from model.data.shards import open_split, read_split

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
peak, done = [anon_kb()], []
def sample():
    while not done:
        peak.append(anon_kb()); time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
base = anon_kb()
shards, how = sys.argv[1], sys.argv[2]
windows = read_split(shards, "train")[0] if how == "memory" else open_split(shards, "train")
order = np.random.default_rng(0).permutation(len(windows))
total = 0
for b in range(0, len(order), 64):
    total += int(windows[order[b:b + 64]].astype(np.int64).sum() % 7)
done.append(1); time.sleep(0.02)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"peak_anon_mb": (max(peak) - base) / 1024, "vmhwm_mb": hwm / 1024, "rows": len(windows)}))
"""


def write(out: Path, rows: int) -> Path:
    from model.data.shards import ShardWriter

    rng = np.random.default_rng(1)
    with ShardWriter(out, "train", seq_len=SEQ, corpus="bench", vocab_fingerprint="bench", rows_per_shard=50_000) as writer:
        for start in range(0, rows, 50_000):
            n = min(50_000, rows - start)
            writer.add(rng.integers(0, 90, size=(n, SEQ + 1), dtype=np.uint16), np.zeros(n, np.uint32))
    return out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    env = dict(os.environ, HOMER_CACHE_DIR=str(work / "cache"), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    rows = []
    for windows in (100_000, 1_000_000):
        shards = write(work / f"shards-{windows}", windows)
        for how in ("memory", "mapped"):
            if how == "mapped":  # the .npy copies are made once (a first run), then reused: measure the reuse
                subprocess.run([sys.executable, "-c", PROBE, str(shards), how], env=env, check=True, capture_output=True)
            done = subprocess.run([sys.executable, "-c", PROBE, str(shards), how], env=env, check=True, capture_output=True, text=True)
            rows.append((windows, how, json.loads(done.stdout)))
    print("| train windows (seq_len 100) | split data MB | how | peak own (anonymous) memory MB | VmHWM MB |")
    print("| ---: | ---: | --- | ---: | ---: |")
    for windows, how, m in rows:
        what = "read_split: in memory" if how == "memory" else "open_split: memory-mapped"
        print(f"| {windows:,} | {windows * (SEQ + 1) * 2 / 1e6:.0f} | {what} | {m['peak_anon_mb']:.0f} | {m['vmhwm_mb']:.0f} |")


if __name__ == "__main__":
    main()
