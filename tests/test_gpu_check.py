"""The GPU check's own logic (scripts/gpu/check.py), which runs only on a lent GPU: where greedy tokens part from
transformers', whether at a near-tie of transformers' own scores; and the kernel switches set around a session's
creation and put back after it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "gpu"))
import check  # noqa: E402  (scripts/gpu/check.py, a script: not a package)


def scores_with(step: int, values: dict[int, float], steps: int = 3, vocab: int = 10) -> list:
    """transformers' `scores` for one row, `[steps]` of `[1, vocab]`: a spread of about 1, `values` at `step`."""
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randn(1, vocab, generator=generator) for _ in range(steps)]
    for token, value in values.items():
        scores[step][0, token] = value
    return scores


def test_a_parting_at_a_near_tie_is_told_from_one_at_a_clear_choice():
    ours, theirs = [[1, 4, 2]], [[1, 3, 2]]  # (parting at step 1: ours 4, theirs 3)
    tie = check.divergence(ours, theirs, scores_with(1, {3: 3.0, 4: 2.999}))
    clear = check.divergence(ours, theirs, scores_with(1, {3: 3.0, 4: -1.0}))
    assert [(d["row"], d["step"], d["ours"], d["theirs"]) for d in tie] == [(0, 1, 4, 3)]
    assert tie[0]["near_tie"] and tie[0]["margin"] == pytest.approx(0.001, abs=1e-4)
    assert not clear[0]["near_tie"] and clear[0]["margin"] == pytest.approx(4.0)


def test_rows_that_agree_are_left_out_and_a_forbidden_token_is_no_tie():
    scores = scores_with(0, {5: float("-inf")})  # (ours picked a token transformers' processors forbade)
    rows = check.divergence([[5, 1], [2, 2]], [[6, 1], [2, 2]], [torch.cat([s, s]) for s in scores])
    assert [d["row"] for d in rows] == [0]
    assert rows[0]["margin"] == float("inf") and not rows[0]["near_tie"]


def test_kernel_switches_are_set_inside_and_restored_after(monkeypatch):
    monkeypatch.setenv("ORT_ENABLE_XQA", "1")
    monkeypatch.delenv("ORT_ENABLE_CUDNN_FLASH_ATTENTION", raising=False)
    with check.environment(check.DECODE_KERNELS["flash decoding"]):
        assert os.environ["ORT_ENABLE_XQA"] == "0" and os.environ["ORT_ENABLE_CUDNN_FLASH_ATTENTION"] == "0"
    assert os.environ["ORT_ENABLE_XQA"] == "1" and "ORT_ENABLE_CUDNN_FLASH_ATTENTION" not in os.environ
    with pytest.raises(RuntimeError), check.environment(check.INT4_KERNELS["fpA_intB"]):
        raise RuntimeError("a failed run")
    assert "ORT_FPA_INTB_GEMM" not in os.environ
