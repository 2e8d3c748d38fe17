"""The hang watchdog's side channel (pipeline/distributed/hang_watchdog.py: SideStore) against a real
TCPStore server: its liveness look must cost the server nothing and still see a host that ended."""

from __future__ import annotations

import datetime
import subprocess
import sys
import time

import torch.distributed as dist

from pipeline.distributed.hang_watchdog import SideStore

SERVER = """
import sys, time, torch.distributed as dist
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
print(store.port, flush=True)
time.sleep(120)
"""


def test_looking_at_the_store_never_wedges_its_other_clients():
    # A plain TCP connect-and-close per look wedged another client's request within ~50 looks on
    # torch 2.13 (the CI hang of stop 32: torchrun's heartbeat and a rank's new_group stopped).
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    other = dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=5))
    side = SideStore(("127.0.0.1", server.port), timeout_s=5)
    for i in range(300):
        assert side.alive()
        side.store.set("beat/0", str(i))
        other.set("k", str(i))
        assert other.get("k") == str(i).encode()
        time.sleep(0.002)
    assert side.store.get("beat/0") == b"299"
    side.close()


def test_alive_sees_a_store_host_that_ended_without_a_request(capfd):
    host = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(host.stdout.readline())
        side = SideStore(("127.0.0.1", port), timeout_s=5)
        side.store.set("beat/0", "1")
        assert side.alive()
    finally:
        host.kill()
        host.wait()
    deadline = time.time() + 5
    while side.alive() and time.time() < deadline:
        time.sleep(0.05)
    assert not side.alive()
    assert "TCPStore" not in capfd.readouterr().err  # no C++ stack from a request to a gone host
    side.close()
