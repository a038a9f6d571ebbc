"""train.exchange on real gloo ranks (3 processes): JSON documents as bytes in tensors.

What replaced torch's *_object collectives, which unpickle what a peer sends: a peer that is not
ours (a rendezvous store another user holds, docs/SECURITY.md) sends a pickle that would create a
marker file, a length of 1 TiB, JSON nested past the parser's depth, bytes that are not UTF-8;
each is refused on every honest rank, naming the rank, and nothing runs. A rank whose own
document cannot be encoded fails with the others, in step, instead of leaving them waiting.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RANK = Path(__file__).with_name("exchange_rank.py")
WORLD = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SCENARIOS = ("plain", "gather", "pickle", "deep", "not_utf8", "huge", "unencodable", "plain")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, list[dict]], Path]:
    """Every scenario, in order, in one group of 3 ranks: {scenario: [result per rank]}."""
    marker = tmp_path_factory.mktemp("exchange") / "marker"
    port = str(free_port())
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "WORLD_SIZE": str(WORLD)}
        procs.append(subprocess.Popen([sys.executable, str(RANK), str(marker), *SCENARIOS],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    by_scenario: dict[str, list[dict]] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        for line in out.splitlines():
            result = json.loads(line)
            by_scenario.setdefault(result["scenario"], []).append(result)
    return by_scenario, marker


def expected(rank: int) -> dict:
    return {"rank": rank, "text": "é" * rank, "nested": {"list": [1, 2.5, None, True]},
            "nan": math.nan, "steps": list(range(rank * 1000))}


def same(text: str, document: dict) -> bool:
    got = json.loads(text)
    return math.isnan(got.pop("nan")) and got == {k: v for k, v in document.items() if k != "nan"}


def test_every_rank_gets_every_document_in_rank_order(ran) -> None:
    # "plain" runs first and again last: the refusals in between left the ranks in step.
    results = ran[0]["plain"]
    assert len(results) == 2 * WORLD
    for result in results:
        assert "error" not in result, result
        assert [same(text, expected(r)) for r, text in enumerate(result["got"])] == [True] * WORLD


def test_gather_delivers_to_the_destination_only(ran) -> None:
    results = ran[0]["gather"]
    assert results[0]["got"] is None and results[2]["got"] is None
    assert [same(text, expected(r)) for r, text in enumerate(results[1]["got"])] == [True] * WORLD


@pytest.mark.parametrize("scenario, refusal", [
    ("pickle", r"rank 2 sent \d+ bytes that are not a JSON document: (JSONDecodeError|Unicode)"),
    ("deep", "rank 2 sent 400000 bytes that are not a JSON document: RecursionError"),
    ("not_utf8", "rank 2 sent 4 bytes that are not a JSON document: UnicodeDecodeError"),
    ("huge", r"rank 2 announced a 1099511627776-byte document \(limit \d+\)"),
])
def test_what_a_peer_that_is_not_ours_sends_is_refused_and_never_run(
        ran, scenario: str, refusal: str) -> None:
    by_scenario, marker = ran
    results = by_scenario[scenario]
    assert results[2].get("hostile") is True
    for result in results[:2]:
        assert re.match(refusal, result.get("error", "")), result
    assert not marker.exists(), "the peer's pickle ran in our rank"


def test_a_document_that_is_not_json_fails_every_rank_in_step(ran) -> None:
    results = ran[0]["unencodable"]
    assert "this rank's document is not JSON: TypeError" in results[1]["error"]
    for rank in (0, 2):
        assert results[rank]["error"] == "rank 1 could not encode its document as JSON"


def test_the_codec_round_trips_a_report_and_refuses_what_is_not_json() -> None:
    from train.exchange import ExchangeError, decode, encode

    report = {"rank": 1, "host": "n1", "steps": [{"step": 1, "iter_ms": 1.25}], "none": None,
              "inf": math.inf}
    assert decode(encode(report), 1) == report
    with pytest.raises(ExchangeError, match="rank 4 sent 7 bytes"):
        decode(b"\x80\x04K\x01.xx", 4)  # the start of a pickle


def test_the_train_package_exchanges_nothing_by_pickle() -> None:
    """The repo's before-stop hook greps for these too; here CI fails on them."""
    pattern = ("all_gather_object(", "gather_object(", "broadcast_object_list(",
               "scatter_object_list(", "send_object_list(", "recv_object_list(", "pickle.load")
    found = [f"{path.relative_to(REPO)}: {word}"
             for root in ("train", "tasks") for path in (REPO / root).rglob("*.py")
             for word in pattern if word in path.read_text()]
    assert found == []



def test_the_ranks_nccl_findings_survive_the_exchange() -> None:
    """What a GPU rank adds to its report (train.nccl_debug, from NCCL's own debug output) comes
    out of the JSON exchange as rank 0's summary needs it: the cross-rank view is the same."""
    from train.exchange import decode, encode
    from train.launchdelay import launch_check
    from train.nccl_debug import asked_from_env, effective_settings, parse_nccl_log, summarize_ranks

    data = REPO / "tests" / "unit" / "data" / "nccl"
    env = {"NCCL_NTHREADS": "256", "NCCL_IB_DISABLE": "0"}
    per_rank = []
    for name in ("src_nccl-2.21.5_rank00.log", "src_nccl-2.21.5_rank01.log",
                 "nccl-2.28.9_h100_world1_env-channels4.log"):
        found = effective_settings(parse_nccl_log((data / name).read_text()),
                                   asked_from_env(env, 8, 8), env)
        found["kernel_launch"] = launch_check([], found.get("channels"), 256, "control")
        per_rank.append(found)
    exchanged = [decode(encode(found), rank) for rank, found in enumerate(per_rank)]
    assert encode(summarize_ranks(exchanged)) == encode(summarize_ranks(per_rank))
