"""A build lock left by a killed process is removed, so a waiting torch load goes on."""

import os
import threading
import time

from torch.utils.file_baton import FileBaton

from launcher.build_lock import remove_stale_build_locks, stale_build_lock_watchdog


def test_only_old_locks_are_removed(tmp_path):
    old = tmp_path / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "other_op" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir()
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert remove_stale_build_locks(stale_after=300, root=str(tmp_path)) == [str(old)]
    assert not old.exists() and fresh.exists()


def test_watchdog_releases_a_process_waiting_on_a_dead_owners_lock(tmp_path):
    build_dir = tmp_path / "deepspeed_shm_comm"
    build_dir.mkdir()
    dead_owner = FileBaton(str(build_dir / "lock"))
    assert dead_owner.try_acquire()  # ... and never releases: killed
    waiter = FileBaton(str(build_dir / "lock"), wait_seconds=0.01)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (waiter.wait(), done.set()), daemon=True)
    thread.start()
    assert not done.wait(0.3)  # torch would wait forever
    with stale_build_lock_watchdog(stale_after=0.5, period=0.1, root=str(tmp_path)):
        assert done.wait(10)
