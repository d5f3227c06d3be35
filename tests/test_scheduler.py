"""The in-flight batching simulation: hand-computed tiny cases and a naive reference."""

from collections import deque

import numpy as np
import pytest

from autotune.errors import InvalidConfig, OutOfMemory
from autotune.measurement import load_point_from_requests
from autotune.model.scheduler import ContextWait, Limits, simulate

D = 0.010  # seconds per iteration in the hand-computed cases


def constant(tokens, seqs, ctx_sum, prefill_attn):
    return D


def point(trace, concurrency=1):
    return load_point_from_requests(
        concurrency=concurrency, gpus=1, start_s=trace.start, first_token_s=trace.first_token,
        end_s=trace.end, output_tokens=trace.output_tokens,
        itl_ms=(trace.itl_values_ms, trace.itl_weights))


def lim(**kw):
    base = dict(max_in_flight=64, token_budget=8192, kv_blocks=10_000, block_tokens=32)
    return Limits(**{**base, **kw})


def test_two_requests_batched_together():
    # One iteration prefills both prompts (first tokens), two more decode tokens 2 and 3.
    trace = simulate(constant, np.array([4, 4]), np.array([3, 3]), lim(token_budget=8))
    p = point(trace)
    assert p.latency("ttft", "p50") == pytest.approx(10.0)
    assert p.latency("tpot", "p99") == pytest.approx(10.0)
    assert p.latency("e2e", "mean") == pytest.approx(30.0)
    assert p.output_throughput == pytest.approx(6 / 0.030)
    assert trace.iterations == 3


def test_one_slot_serves_requests_one_after_the_other():
    # Request 2 waits for request 1 (3 iterations), then takes 3 iterations itself.
    trace = simulate(constant, np.array([4, 4]), np.array([3, 3]), lim(max_in_flight=1))
    p = point(trace)
    ttft = sorted((trace.first_token - trace.start) * 1e3)
    assert ttft == pytest.approx([10.0, 40.0])
    # Percentiles as trtllm-bench computes them (linear interpolation between requests).
    assert p.latency("ttft", "mean") == pytest.approx(25.0)
    assert p.latency("ttft", "p50") == pytest.approx(25.0)
    assert p.latency("ttft", "p90") == pytest.approx(10.0 + 0.9 * 30.0)
    assert p.latency("ttft", "p99") == pytest.approx(10.0 + 0.99 * 30.0)
    assert p.latency("e2e", "p50") == pytest.approx(45.0)
    assert p.latency("tpot", "mean") == pytest.approx(10.0)
    assert p.output_throughput == pytest.approx(6 / 0.060)


def test_kv_cache_admits_only_what_it_can_hold():
    # Each request needs one 32-token block; one block means one request at a time.
    one = simulate(constant, np.array([4, 4]), np.array([3, 3]), lim(kv_blocks=1))
    assert sorted(one.end) == pytest.approx([0.030, 0.060])


def test_chunked_prefill_spreads_a_prompt_over_iterations():
    trace = simulate(constant, np.array([10]), np.array([2]), lim(token_budget=4))
    assert trace.first_token[0] == pytest.approx(3 * D)  # chunks of 4, 4 and 2 tokens
    assert trace.end[0] == pytest.approx(4 * D)


def test_decoding_requests_take_their_share_of_the_token_budget():
    calls = []

    def step(tokens, seqs, ctx_sum, prefill_attn):
        calls.append((tokens, seqs, ctx_sum, prefill_attn))
        return D

    # Request 1 (prompt 2) decodes while request 2's prompt of 6 is chunked into budget - 1.
    simulate(step, np.array([2, 6]), np.array([4, 2]), lim(token_budget=4))
    tokens, seqs, ctx, attn = calls[0]
    assert (tokens, seqs) == (4, 1)  # prompt 1 whole, 2 tokens of prompt 2; one token out
    assert attn == pytest.approx(2 * 1 + 2 * 1)  # chunk * (prefix + chunk / 2) for each
    tokens, seqs, ctx, attn = calls[1]
    assert (tokens, seqs, ctx) == (4, 1, 3)  # 1 decode + 3 prompt tokens; its KV is 2 + 1
    assert attn == pytest.approx(3 * (2 + 1.5))
    assert max(c[0] for c in calls) <= 4


def test_open_loop_requests_far_apart_never_queue():
    arrivals = np.array([0.0, 1.0, 2.0])
    trace = simulate(constant, np.full(3, 16), np.full(3, 5), lim(), arrivals=arrivals)
    assert trace.start == pytest.approx(arrivals)
    assert trace.first_token - trace.start == pytest.approx(np.full(3, D))
    assert trace.end - trace.start == pytest.approx(np.full(3, 5 * D))


def test_closed_loop_keeps_the_concurrency():
    trace = simulate(constant, np.full(6, 4), np.full(6, 3), lim(), concurrency=2)
    ends = np.sort(trace.end)
    assert ends == pytest.approx([0.03, 0.03, 0.06, 0.06, 0.09, 0.09])
    assert sorted(trace.start) == pytest.approx([0, 0, 0.03, 0.03, 0.06, 0.06])


def _ttfts_ms(trace):
    return sorted(np.round((trace.first_token - trace.start) * 1e3, 6))


#: One request decoding from t=0 (first token at 10 ms), a second prompt arriving at 15 ms and
#: admitted at the iteration boundary of 20 ms; without a wait it prefills in [20, 30].
LATE = dict(isl=np.array([4, 4]), osl=np.array([30, 3]), arrivals=np.array([0.0, 0.015]))


def test_a_held_prompt_waits_the_timeout_while_others_decode():
    plain = simulate(constant, LATE["isl"], LATE["osl"], lim(), arrivals=LATE["arrivals"])
    assert _ttfts_ms(plain) == pytest.approx([10.0, 15.0])
    # Held at the boundaries of 20, 30 and 40 ms (three iterations), prefilled in [50, 60].
    held = simulate(constant, LATE["isl"], LATE["osl"], lim(), arrivals=LATE["arrivals"],
                    wait=ContextWait(timeout_iters=3, min_tokens=10**6))
    assert _ttfts_ms(held) == pytest.approx([10.0, 45.0])


def test_a_prompt_is_released_early_by_enough_tokens_or_enough_prompts():
    tokens = simulate(constant, LATE["isl"], LATE["osl"], lim(), arrivals=LATE["arrivals"],
                      wait=ContextWait(timeout_iters=3, min_tokens=5))  # 1 decoding + 4
    assert _ttfts_ms(tokens) == pytest.approx([10.0, 15.0])
    # Two prompts wanted: the one of 15 ms waits for the one of 35 ms (admitted at 40 ms).
    arrivals = np.array([0.0, 0.015, 0.035])
    pair = simulate(constant, np.array([4, 4, 4]), np.array([30, 3, 3]), lim(),
                    arrivals=arrivals, wait=ContextWait(timeout_iters=10, min_requests=2))
    assert _ttfts_ms(pair) == pytest.approx([10.0, 15.0, 35.0])


def test_nothing_is_held_while_too_few_requests_decode():
    # The first prompt of a run has nothing decoding beside it; with two decoding wanted
    # (attention DP: every rank decoding), the late one is not held either.
    alone = simulate(constant, np.array([4]), np.array([3]), lim(),
                     wait=ContextWait(timeout_iters=5))
    assert _ttfts_ms(alone) == pytest.approx([10.0])
    late = simulate(constant, LATE["isl"], LATE["osl"], lim(), arrivals=LATE["arrivals"],
                    wait=ContextWait(timeout_iters=5, min_decoding=2))
    assert _ttfts_ms(late) == pytest.approx([10.0, 15.0])


def test_impossible_limits_are_failures():
    with pytest.raises(OutOfMemory):
        simulate(constant, np.array([100]), np.array([100]), lim(kv_blocks=2))
    with pytest.raises(InvalidConfig):
        simulate(constant, np.array([100]), np.array([10]),
                 lim(token_budget=64, chunked_prefill=False))


def test_itl_weights_count_every_decoded_token():
    osl = np.array([1, 5, 9, 13])
    trace = simulate(constant, np.array([7, 70, 700, 7000]), osl, lim(token_budget=256))
    assert trace.itl_weights.sum() == (osl - 1).sum()


# ---- a naive reference: one request, one iteration at a time --------------------------------
def reference(step, isl, osl, limits, concurrency=None, arrivals=None):
    n, bt = len(isl), limits.block_tokens
    need = [-(-(int(a) + int(b)) // bt) for a, b in zip(isl, osl)]
    start, first, end = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    waiting, prefill, decode = deque(), [], []  # prefill: [i, done]; decode: [i, produced]
    t, issued, done, kv, gaps = 0.0, 0, 0, 0, []
    if arrivals is None:
        c = n if not concurrency else min(concurrency, n)
        waiting.extend(range(c))
        start[:c] = 0.0
        issued = c
    while done < n:
        if arrivals is not None:
            while issued < n and arrivals[issued] <= t:
                start[issued] = arrivals[issued]
                waiting.append(issued)
                issued += 1
        while (waiting and len(prefill) + len(decode) < limits.max_in_flight
               and kv + need[waiting[0]] <= limits.kv_blocks):
            i = waiting.popleft()
            kv += need[i]
            prefill.append([i, 0])
        if not prefill and not decode:
            t = max(t, float(arrivals[issued]))
            continue
        budget = limits.token_budget - len(decode)
        tokens, attn, finished = 0, 0.0, []
        for entry in prefill:
            rem = int(isl[entry[0]]) - entry[1]
            take = min(rem, budget - tokens) if limits.chunked_prefill else (
                rem if rem <= budget - tokens else 0)
            if take <= 0:
                break
            attn += take * (entry[1] + take / 2)
            tokens += take
            entry[1] += take
            if entry[1] == isl[entry[0]]:
                finished.append(entry)
        ctx = sum(int(isl[i]) + p for i, p in decode)
        d = step(len(decode) + tokens, len(decode) + len(finished), ctx, attn)
        t += d
        if decode:
            gaps.append((d, len(decode)))
        for entry in decode:
            entry[1] += 1
        for entry in finished:
            prefill.remove(entry)
            first[entry[0]] = t
            decode.append([entry[0], 1])
        for entry in [e for e in decode if e[1] >= osl[e[0]]]:
            decode.remove(entry)
            end[entry[0]] = t
            kv -= need[entry[0]]
            done += 1
            if arrivals is None and issued < n:
                start[issued] = t
                waiting.append(issued)
                issued += 1
    return start, first, end, gaps


def linear(tokens, seqs, ctx_sum, prefill_attn):
    return 1e-3 + 2e-6 * tokens + 1e-8 * ctx_sum + 1e-9 * prefill_attn + 1e-6 * seqs


CASES = [
    # id, isl, osl, limits, mode
    ("uniform-all-at-once", [300] * 40, [20] * 40, dict(max_in_flight=16, token_budget=1024), {}),
    ("uniform-closed-loop", [900] * 30, [7] * 30, dict(max_in_flight=8, token_budget=512),
     {"concurrency": 5}),
    ("mixed-lengths", [50, 700, 50, 3000, 128, 128, 64, 1] * 4, [1, 9, 30, 4, 64, 2, 17, 5] * 4,
     dict(max_in_flight=6, token_budget=700, kv_blocks=300), {}),
    ("two-lengths-kv-bound", [100, 500] * 25, [20, 1] * 25,
     dict(max_in_flight=40, token_budget=2048, kv_blocks=60), {"concurrency": 12}),
    ("no-chunking", [300, 40, 900, 1000] * 6, [5, 50, 3, 8] * 6,
     dict(max_in_flight=10, token_budget=1000, chunked_prefill=False), {}),
]


@pytest.mark.parametrize("isl,osl,limits,mode", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cohorts_match_a_request_by_request_simulation(isl, osl, limits, mode):
    isl, osl, limits = np.array(isl), np.array(osl), lim(**limits)
    got = simulate(linear, isl, osl, limits, **mode)
    start, first, end, gaps = reference(linear, isl, osl, limits, **mode)

    def key(s, f, e):
        return sorted(zip(np.round(s, 9), np.round(f, 9), np.round(e, 9)))

    assert key(got.start, got.first_token, got.end) == key(start, first, end)
    mean_gap = sum(d * w for d, w in gaps) / sum(w for _, w in gaps) * 1e3
    assert np.average(got.itl_values_ms, weights=got.itl_weights) == pytest.approx(mean_gap)


def test_open_loop_matches_the_reference_when_iterations_cost_the_same():
    rng = np.random.default_rng(3)
    arrivals = np.cumsum(rng.exponential(0.02, 60))
    isl, osl = np.full(60, 200), np.full(60, 30)
    limits = lim(max_in_flight=8, token_budget=512)
    got = simulate(constant, isl, osl, limits, arrivals=arrivals)
    start, first, end, _ = reference(constant, isl, osl, limits, arrivals=arrivals)
    assert sorted(got.end) == pytest.approx(sorted(end))
    assert sorted(got.first_token - got.start) == pytest.approx(sorted(first - start))
