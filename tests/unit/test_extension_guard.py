"""A process killed while DeepSpeed JIT-loads its op must not hang every later start.

Found by the crash drill (tests/kill_drill.py): torch's loader guards each op's build and its
up-to-date check with a lock *file* and waits for it with no end; a SIGKILL inside that window
left ``$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/lock`` behind and the next caption_contrastive sat
at 0 % CPU until it was killed by hand. ``extension_build_guard`` removes such a file only while
it holds an flock that every llm2clip loader takes (the kernel drops it when its holder dies).
"""

import logging
import os
import subprocess
import sys
import time

from llm2clip.train.distributed import extension_build_guard, extensions_root, free_port

HOLD = """
import fcntl, sys, time
with open(sys.argv[1], "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_lock_file_left_by_a_dead_loader_is_removed(tmp_path, caplog):
    (tmp_path / "some_op").mkdir()
    (tmp_path / "some_op" / "lock").touch()
    (tmp_path / "some_op" / "some_op.so").write_bytes(b"built")
    with caplog.at_level(logging.WARNING, logger="llm2clip"), extension_build_guard(tmp_path):
        assert not (tmp_path / "some_op" / "lock").exists()
    assert (tmp_path / "some_op" / "some_op.so").read_bytes() == b"built"  # nothing else touched
    assert "left by a process killed while loading that op" in caplog.text


def test_a_live_loader_s_lock_file_is_left_alone_until_it_is_done(tmp_path):
    """While another llm2clip process holds the flock (it is loading), its lock file is its own:
    the guard waits for the flock instead of removing it."""
    (tmp_path / "op").mkdir()
    (tmp_path / "op" / "lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "llm2clip.flock"), "1.5"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with extension_build_guard(tmp_path):
        waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert waited > 0.5, "the guard did not wait for the live holder"  # order, not speed: it got in after
    assert not (tmp_path / "op" / "lock").exists()  # the holder is gone now: the file was stale


def test_deepspeed_starts_despite_a_lock_file_left_by_a_killed_start(tmp_path):
    """The real loader, the real op folder: a stale ``lock`` planted where torch looks; a world of
    one initialises through DeepSpeed (without the guard this waits forever)."""
    op = extensions_root() / "deepspeed_shm_comm"
    op.mkdir(parents=True, exist_ok=True)
    (op / "lock").touch()
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    code = "from llm2clip.train.distributed import init_distributed; init_distributed().shutdown(); print('started')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "started" in proc.stdout, proc.stderr[-3000:]
    assert "left by a process killed while loading that op" in proc.stderr
    assert not (op / "lock").exists()
