"""How ``benchmarks/accuracy.py`` runs the measured serving sweeps: which client kept a request
queued beyond the engine's batch, and how the data tell."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy  # noqa: E402  (benchmarks/ is not a package)

QUEUED = next(iter(accuracy.QUEUED_SWEEPS))
SOURCE = ("source_file=/Users/someone/projects/aic-auto-gap-analysis/data/"
          "h100_sxm/trtllm/1.0.0rc3/meta-llama_Llama-3.1-8B-Instruct.csv; gtl_job_id=1; "
          "silicon_concurrency=8")


def _row(sweep: str, osl: int, concurrency: int, index: int = 0) -> accuracy.ServingRow:
    return accuracy.ServingRow(
        index=index, engine="trtllm", version="1.0.0rc3", gpu="h100", model="llama-3.1-8b",
        precision="bf16", tp=1, pp=1, isl=1024, osl=osl, concurrency=concurrency,
        ttft_ms=1.0, tpot_ms=1.0, harness="aic", sweep=sweep)


def test_a_gap_analysis_source_names_its_sweep_and_inferencex_none():
    assert accuracy._sweep(SOURCE) == QUEUED
    assert accuracy._harness(SOURCE) == "aic"
    assert accuracy._sweep("source_file=2026-04-06.csv; model=Llama-3.1-70B") == ""


def test_only_a_queued_sweep_waits_for_a_completion_before_its_prefill():
    queued = accuracy.predict_serving(_row(QUEUED, 512, 8))
    plain = accuracy.predict_serving(_row("h100_sxm/trtllm/1.0.0rc3/other.csv", 512, 8))
    # the wait is about one request's duration / concurrency: 512 tokens x TPOT / 8
    wait = 512 * plain[1] / 8
    assert queued[0] - plain[0] == pytest.approx(wait, rel=0.5)
    assert queued[1] == pytest.approx(plain[1], rel=0.15)


@pytest.mark.parametrize("sweep,slope", [(QUEUED, 1.0), ("", 0.0)])
def test_the_slope_of_ttft_against_duration_over_concurrency_tells_a_queued_client(sweep, slope):
    # "Measurements" made by the model's own closed loop, with and without the queued request:
    # the detector finds the slope each client gives (about 1 and about 0).
    rows = []
    for i, (osl, c) in enumerate((o, c) for o in (96, 256, 512) for c in (8, 16, 32)):
        row = _row(sweep, osl, c, index=i)
        ttft, tpot = accuracy.predict_serving(row)
        rows.append(replace(row, ttft_ms=ttft, tpot_ms=tpot))
    assert not any(r.held_out for r in rows)  # (these lengths' deployments are all fitted on)
    (found,) = accuracy.queue_slopes(rows).values()
    assert found[:2] == (9, 9)  # every row paired with its siblings of other lengths
    assert found[2] == pytest.approx(slope, abs=0.3)


def test_a_different_model_or_gpu_is_not_paired_as_the_same_deployment():
    rows = [replace(_row("", 256, 8), ttft_ms=100.0, tpot_ms=5.0),
            replace(_row("", 512, 8), ttft_ms=200.0, tpot_ms=5.0, gpu="h200"),
            replace(_row("", 96, 8), ttft_ms=300.0, tpot_ms=5.0, model="llama-3.1-70b")]
    (found,) = accuracy.queue_slopes(rows).values()
    assert found[:2] == (3, 0)


def test_a_rate_beyond_what_the_gpu_can_compute_is_told_from_a_possible_one():
    row = _row("", 2048, 64)
    ttft, tpot = accuracy.predict_serving(row)
    modelled = accuracy.implied_peak_share(replace(row, ttft_ms=ttft, tpot_ms=tpot))
    assert 0.0 < modelled < 0.75  # the model's own rate leaves room for attention and gaps
    # the same lengths twenty times as fast would need more than the GPU's peak
    faster = replace(row, ttft_ms=ttft / 20, tpot_ms=tpot / 20)
    assert accuracy.implied_peak_share(faster) == pytest.approx(20 * modelled)
    assert accuracy.implied_peak_share(faster) > 1.0


def _inferencex(**kw) -> accuracy.ServingRow:
    base = dict(index=0, engine="trtllm", version="1.1.0rc2", gpu="b200", model="llama-3.1-70b",
                precision="fp8", tp=4, pp=1, isl=1024, osl=1024, concurrency=16, ttft_ms=1.0,
                tpot_ms=1.0, harness="inferencex")
    return accuracy.ServingRow(**{**base, **kw})


def test_inferencex_trtllm_at_1k_1k_below_tp8_holds_prompts_to_batch_them():
    # Its scripts set batch_wait_timeout_iters 20 there (ratio 0.9 of 16384 tokens, which 16
    # requests never reach): a prompt waits up to 20 decode iterations, about half on average.
    held = accuracy.predict_serving(_inferencex())
    plain = accuracy.predict_serving(_inferencex(harness="aic"))
    assert held[0] - plain[0] > 5 * plain[1]
    assert held[1] == pytest.approx(plain[1], rel=0.1)
    for other in (dict(tp=8), dict(osl=8192), dict(engine="vllm")):
        assert accuracy.context_wait(_inferencex(**other)) is None


def test_inferencex_trtllm_under_attention_dp_waits_for_a_prompt_on_every_rank():
    row = _inferencex(model="deepseek-r1", precision="fp4", tp=8, ep=8, attention_dp=True,
                      concurrency=64)
    wait = accuracy.context_wait(row)
    assert (wait.timeout_iters, wait.min_requests, wait.min_decoding) == (60, 8, 8)
    held = accuracy.predict_moe(row)
    plain = accuracy.predict_moe(replace(row, harness="aic"))
    assert held[0] > 1.5 * plain[0]
