"""The reliability script's short form: real `linmem serve` processes, killed and corrupted."""

from __future__ import annotations

import json

from linmem.service import reliability


def test_short_form_passes(capsys) -> None:
    code = reliability.main([])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert code == 0 and result["ok"], result
    assert result["load"]["lost"] == 0 and result["load"]["duplicated"] == 0
    assert result["load"]["acknowledged_items"] > 0
    assert result["crash"]["trials"] == 3 and result["crash"]["acknowledged_batches"] > 0
    corruption = result["corruption"]
    assert corruption["same_answers"] and len(corruption["damaged_files"]) >= 2
    assert corruption["index_damage"] and corruption["searches_same"] and corruption["index_ok_after"]
    assert any("corrupt" in n or "rebuilt" in n for n in corruption["notes"])


def test_the_audit_catches_torn_and_missing_batches() -> None:
    """The crash check's verdict can fail: half a batch, or a lost acknowledged one."""
    sent = {"t0w0b0": 4, "t0w0b1": 2, "t0w1b0": 1}
    whole = ["t0w0b0 part 0/4", "t0w0b0 part 1/4", "t0w0b0 part 2/4", "t0w0b0 part 3/4", "t0w0b1 part 0/2",
             "t0w0b1 part 1/2"]  # fmt: skip
    assert reliability.audit(whole, sent, acked={"t0w0b0", "t0w0b1"}) == []
    # t0w1b0 was sent but never acknowledged: its absence is allowed.
    assert reliability.audit(whole[:3] + whole[4:], sent, acked={"t0w0b1"}) == [
        "batch t0w0b0 torn (3 of 4 items)"
    ]
    assert reliability.audit(whole[:4], sent, acked={"t0w0b1"}) == ["acknowledged batch t0w0b1 missing"]
