"""Event-driven simulation of in-flight batching (TensorRT-LLM's scheduler, one replica).

Requests are admitted first come, first served while a batch slot and KV-cache blocks for their
whole sequence are free (``GUARANTEED_NO_EVICT``). Each iteration runs every decoding request for
one token plus prefill chunks that fill the rest of the token budget. Stretches of iterations in
which nothing but decoding happens are advanced in one step (their cost is linear in the context
length), so a load point costs O(requests · log requests), not O(tokens).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from autotune.errors import InvalidConfig, OutOfMemory

#: ``step(tokens, seqs, ctx_sum, prefill_attn) -> seconds``: the cost of one iteration.
StepTime = Callable[[float, int, float, float], float]


@dataclass(frozen=True)
class Limits:
    """The scheduler's limits for one replica."""

    max_in_flight: int  # requests in flight (batch slots over all micro-batches)
    token_budget: int  # tokens one iteration may process
    kv_blocks: int  # KV-cache blocks
    block_tokens: int = 32
    chunked_prefill: bool = True


@dataclass
class Trace:
    """Per-request timestamps (seconds) and the token gaps seen while decoding."""

    start: np.ndarray
    first_token: np.ndarray
    end: np.ndarray
    output_tokens: np.ndarray
    itl_values_ms: np.ndarray
    itl_weights: np.ndarray


def simulate(step: StepTime, isl: np.ndarray, osl: np.ndarray, limits: Limits, *,
             concurrency: int | None = None, arrivals: np.ndarray | None = None) -> Trace:
    """Run all requests through the scheduler.

    Closed loop (``concurrency``): that many requests are issued at t=0 and each completion issues
    the next. Open loop (``arrivals``): request i is issued at ``arrivals[i]`` seconds.
    """
    n = len(isl)
    isl = np.asarray(isl, dtype=np.int64)
    osl = np.asarray(osl, dtype=np.int64)
    bt = limits.block_tokens
    need = [-(-int(a + b) // bt) for a, b in zip(isl, osl)]
    if max(need) > limits.kv_blocks:
        raise OutOfMemory(
            f"one request of {int(isl.max() + osl.max())} tokens needs {max(need)} KV blocks; "
            f"the cache holds {limits.kv_blocks}"
        )
    if not limits.chunked_prefill and int(isl.max()) > limits.token_budget:
        raise InvalidConfig(
            f"prompts of {int(isl.max())} tokens exceed max_num_tokens ({limits.token_budget}) "
            "without chunked prefill"
        )
    start = np.full(n, np.nan)
    first = np.full(n, np.nan)
    end = np.full(n, np.nan)
    gaps: list[float] = []
    weights: list[float] = []

    t = 0.0
    issued = 0
    waiting: deque[int] = deque()
    if arrivals is None:
        c = n if concurrency is None or concurrency <= 0 else min(concurrency, n)
        for i in range(c):
            start[i] = 0.0
            waiting.append(i)
        issued = c
    prefilling: deque[list[int]] = deque()  # [request, prompt tokens done]
    decoding: list[tuple[int, int]] = []  # heap of (iteration it finishes at, request)
    it = 0  # decode iterations so far
    n_dec = 0
    ctx_sum = 0.0
    kv_used = 0
    in_flight = 0
    done = 0
    max_in_flight, budget_total = limits.max_in_flight, limits.token_budget

    def finish(i: int) -> None:
        nonlocal n_dec, ctx_sum, kv_used, in_flight, done, issued
        end[i] = t
        n_dec -= 1
        ctx_sum -= isl[i] + osl[i]
        kv_used -= need[i]
        in_flight -= 1
        done += 1
        if arrivals is None and issued < n:
            start[issued] = t
            waiting.append(issued)
            issued += 1

    while done < n:
        if arrivals is not None:
            while issued < n and arrivals[issued] <= t:
                start[issued] = arrivals[issued]
                waiting.append(issued)
                issued += 1
        while waiting and in_flight < max_in_flight and kv_used + need[waiting[0]] <= limits.kv_blocks:
            i = waiting.popleft()
            prefilling.append([i, 0])
            in_flight += 1
            kv_used += need[i]
        if in_flight == 0:
            # Nothing to run: only an open loop gets here, waiting for the next arrival.
            t = max(t, float(arrivals[issued]))
            continue

        budget = budget_total - n_dec
        if prefilling and budget > 0:
            tokens = 0
            attn = 0.0
            finished: list[int] = []
            for entry in prefilling:
                i, done_tokens = entry
                remaining = int(isl[i]) - done_tokens
                if limits.chunked_prefill:
                    take = min(remaining, budget - tokens)
                elif remaining <= budget - tokens:
                    take = remaining
                else:
                    break
                if take <= 0:
                    break
                attn += take * (done_tokens + take / 2)
                tokens += take
                entry[1] += take
                if entry[1] >= isl[i]:
                    finished.append(i)
                if tokens >= budget:
                    break
            if tokens:
                d = step(n_dec + tokens, n_dec + len(finished), ctx_sum, attn)
                t += d
                if n_dec:
                    gaps.append(d)
                    weights.append(n_dec)
                it += 1
                ctx_sum += n_dec
                for _ in finished:
                    prefilling.popleft()  # FCFS: the finished ones are at the front
                for i in finished:
                    first[i] = t
                    if osl[i] <= 1:
                        n_dec += 1
                        ctx_sum += isl[i] + osl[i]
                        finish(i)
                    else:
                        heapq.heappush(decoding, (it + int(osl[i]) - 1, i))
                        n_dec += 1
                        ctx_sum += isl[i] + 1
                while decoding and decoding[0][0] <= it:
                    finish(heapq.heappop(decoding)[1])
                continue

        if not decoding:
            raise OutOfMemory("the scheduler cannot make progress with these limits")
        # A stretch of pure decode iterations up to the next completion (or arrival).
        k = decoding[0][0] - it
        d0 = step(n_dec, n_dec, ctx_sum, 0.0)
        if arrivals is not None and issued < n:
            until = float(arrivals[issued]) - t
            if until > 0 and d0 > 0:
                k = max(1, min(k, math.ceil(until / d0)))
        if prefilling:
            k = 1  # prefill waits only for this one iteration's token budget
        d1 = step(n_dec, n_dec, ctx_sum + n_dec * (k - 1), 0.0) if k > 1 else d0
        mean_d = (d0 + d1) / 2  # iteration cost is linear in the context length
        t += k * mean_d
        gaps.append(mean_d)
        weights.append(n_dec * k)
        it += k
        ctx_sum += n_dec * k
        while decoding and decoding[0][0] <= it:
            finish(heapq.heappop(decoding)[1])

    return Trace(start, first, end, osl.astype(float), np.asarray(gaps) * 1e3, np.asarray(weights, float))


__all__ = ["Limits", "StepTime", "Trace", "simulate"]
