"""`dinoflow store up|down|status` manage a real SeaweedFS process by its pid."""

from __future__ import annotations

import os
import subprocess
import sys

from dinoflow.storage import ObjectStore
from dinoflow.storage.embedded import EmbeddedStore, _alive


def test_up_status_down_cli(tmp_path):
    home = tmp_path / "store"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DINOFLOW_S3_")}
    cli = [sys.executable, "-m", "dinoflow.cli", "store"]
    up = subprocess.run(
        [*cli, "up", "--home", str(home)], capture_output=True, text=True, env=env, timeout=120
    )
    assert up.returncode == 0, up.stderr
    state = EmbeddedStore(home).status()
    assert state is not None and _alive(state.pid)
    # credentials are generated per store and the identities file is private
    assert (home / "identities.json").stat().st_mode & 0o077 == 0
    ObjectStore(state.settings()).put_bytes("s3://cli-check/k", b"v")
    again = subprocess.run(
        [*cli, "up", "--home", str(home)], capture_output=True, text=True, env=env, timeout=60
    )
    assert again.returncode == 0 and str(state.pid) in again.stdout  # idempotent: same server
    st = subprocess.run(
        [*cli, "status", "--home", str(home)], capture_output=True, text=True, env=env, timeout=60
    )
    assert st.returncode == 0 and state.endpoint in st.stdout
    down = subprocess.run(
        [*cli, "down", "--home", str(home)], capture_output=True, text=True, env=env, timeout=60
    )
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not _alive(state.pid)
    st = subprocess.run(
        [*cli, "status", "--home", str(home)], capture_output=True, text=True, env=env, timeout=60
    )
    assert st.returncode == 1 and "not running" in st.stdout


def test_concurrent_up_starts_one_server_and_a_stray_is_reaped(tmp_path):
    import threading

    es = EmbeddedStore(tmp_path / "s")
    states = []
    threads = [
        threading.Thread(target=lambda: states.append(EmbeddedStore(tmp_path / "s").up())) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({s.pid for s in states}) == 1
    pid = states[0].pid
    # a caller killed between spawn and readiness leaves only the pid file behind
    es.state_file.unlink()
    assert es.status() is None and _alive(pid)
    fresh = es.up()
    assert fresh.pid != pid and not _alive(pid)
    assert es.down() and not _alive(fresh.pid)
