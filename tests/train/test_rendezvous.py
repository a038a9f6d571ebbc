"""train.rendezvous on real c10d TCPStores, and a real rank of the train package whose store is
served by a process that is not ours (what another user who took the master port would be).

The store is what torchrun's agent on node 0 serves on the master port; the secret is what
`fab launch` puts in env.sh. A store without rank 0's proof, or with a forged one, stops every
other rank before the process group starts: the rank writes nothing into it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from train.rendezvous import (
    PROOF_KEY,
    SECRET_ENV,
    RendezvousError,
    proof,
    take_secret,
    verify_store,
)

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "config" / "multi_node" / "cpu_tiny.yaml"
SECRET = "9f" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server(port: int, timeout_s: float = 5.0) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


def client(port: int, timeout_s: float = 5.0) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout_s))


def test_rank_0_proves_and_the_others_check() -> None:
    port = free_port()
    store = server(port)
    verify_store(client(port), 0, SECRET, f"127.0.0.1:{port}")
    for rank in (1, 7):
        verify_store(client(port), rank, SECRET, f"127.0.0.1:{port}")
    # What the store holds is no use for anything else: not the secret, not another run's proof.
    assert store.get(PROOF_KEY) == proof(SECRET) and SECRET.encode() not in proof(SECRET)
    assert proof(SECRET) != proof("0" * 64)


def test_a_store_without_our_proof_stops_the_rank_naming_the_port() -> None:
    port = free_port()
    theirs = server(port, timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(RendezvousError, match=rf"rendezvous store at 127\.0\.0\.1:{port} is not "
                                              "this run's: no proof from rank 0 .*another "
                                              "process may hold the port"):
        verify_store(client(port, timeout_s=1.0), 1, SECRET, f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    # A forged proof (another run's, or made up) is refused at once.
    theirs.set(PROOF_KEY, proof("another run's secret"))
    with pytest.raises(RendezvousError, match="not this run's: another process holds the port"):
        verify_store(client(port), 1, SECRET, f"127.0.0.1:{port}")


def test_the_secret_leaves_the_environment_once_read() -> None:
    environ = {SECRET_ENV: SECRET, "OTHER": "1"}
    assert take_secret(environ) == SECRET and environ == {"OTHER": "1"}
    assert take_secret(environ) is None and take_secret({SECRET_ENV: ""}) is None


def rank_env(rank: int, port: int, secret: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1", "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), SECRET_ENV: secret}


def train_rank(out: Path, rank: int, port: int, secret: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "train", "--config", str(TINY), "--override",
         f"training.output_dir={out}", "training.max_steps=2", "distributed.timeout_s=20"],
        cwd=REPO, env=rank_env(rank, port, secret), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_rank_whose_store_is_not_ours_stops_before_the_group_and_sends_nothing(
        tmp_path: Path) -> None:
    """The store another user's process serves on the port, with a made-up proof: our rank 1
    (the train package, secret from env.sh) stops with the store named, at once, and has
    written nothing into it (its process-group keys would be its address for the peers)."""
    port = free_port()
    theirs = server(port, timeout_s=30)
    theirs.set(PROOF_KEY, b"0" * 64)
    keys_before = theirs.num_keys()
    rank = train_rank(tmp_path / "out", 1, port, SECRET)
    _, stderr = rank.communicate(timeout=120)
    assert rank.returncode == 1, stderr[-3000:]
    assert (f"train: rank 1 failed: RendezvousError: rendezvous store at 127.0.0.1:{port} is not "
            "this run's: another process holds the port") in stderr, stderr[-3000:]
    # Only the counter torch's own store client adds when it connects (as a bare client does),
    # nothing of the process group's.
    bare_port = free_port()
    bare = server(bare_port)
    dist.TCPStore("127.0.0.1", bare_port, 2, False, timeout=timedelta(seconds=5))
    assert theirs.num_keys() == keys_before + bare.num_keys()


@pytest.mark.slow
def test_ranks_with_the_runs_secret_complete_and_keep_it_to_themselves(tmp_path: Path) -> None:
    out = tmp_path / "out"
    port = free_port()
    ranks = [train_rank(out, rank, port, SECRET) for rank in (0, 1)]
    for rank in ranks:
        _, stderr = rank.communicate(timeout=180)
        assert rank.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
