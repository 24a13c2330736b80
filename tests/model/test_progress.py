"""The live progress line: drawn on a real terminal (a pty), silent on a file or pipe."""

from __future__ import annotations

import os
import select

from model.training.progress import TerminalProgress


def test_progress_line_on_a_terminal_and_silence_elsewhere(tmp_path):
    master, slave = os.openpty()
    with open(slave, "w", closefd=True) as terminal:
        progress = TerminalProgress("pretrain", total_steps=10, epochs=2, stream=terminal, min_interval_s=0)
        assert progress.enabled
        progress.logged({"loss": 1.23456, "chars_per_s": 31204.0})
        for step in range(1, 11):
            progress.step(step, 1 + step // 6)
        progress.close()
    chunks = []  # one read may return only part of what was written: read until the terminal has nothing more
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other end is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    written = b"".join(chunks).decode()
    os.close(master)
    last = written.replace("\r\n", "\n").split("\r")[-1]
    for needle in ("pretrain", "epoch 2/2", "step 10/10", "100%", "loss 1.2346", "31,204 chars/s", "left"):
        assert needle in last, (needle, last)

    with open(tmp_path / "log.txt", "w") as file:
        quiet = TerminalProgress("pretrain", total_steps=10, stream=file, min_interval_s=0)
        quiet.logged({"loss": 1.0, "chars_per_s": 5.0})
        for step in range(1, 11):
            quiet.step(step, 1)
        quiet.close()
    assert not quiet.enabled and (tmp_path / "log.txt").read_text() == ""
