"""Event-driven simulation of in-flight batching (TensorRT-LLM's scheduler, one replica).

Requests are admitted first come, first served while a batch slot and KV-cache blocks for their
whole sequence are free (``GUARANTEED_NO_EVICT``). Each iteration runs every decoding request for
one token plus prefill chunks that fill the rest of the token budget (``max_num_tokens``).

Two things keep a load point cheap (O(events), not O(tokens) or O(requests)):

- stretches of iterations in which nothing but decoding happens are advanced in one step (their
  cost is linear in the context length, so the mean of the first and last iteration is exact);
- requests with the same lengths that are issued, admitted and prefilled together move as one
  *cohort* (a count), split only where the scheduler treats them differently (a batch slot or
  the KV cache runs out, a prefill chunk ends mid-cohort). A cohort behaves exactly like that
  many requests simulated one by one.
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


@dataclass(frozen=True)
class ContextWait:
    """Holding new prompts back so that more of them prefill together (off unless an engine is
    configured for it).

    TensorRT-LLM's PyTorch back end has two such rules (``tensorrt_llm/_torch/pyexecutor/
    py_executor.py``, 1.1-1.3): without attention DP, ``batch_wait_timeout_iters`` and
    ``batch_wait_max_tokens_ratio`` hold the context requests while the iteration's tokens
    (prompts plus decoding requests) stay below the ratio of ``max_num_tokens``, at most that
    many iterations (``_waiting_requests``); under attention DP, ``attention_dp_config``'s
    ``enable_balance`` holds them until every rank has one, at most ``timeout_iters`` iterations
    (``_balance_adp_requests``). Either holds only while requests are decoding (else nothing
    would run) and releases every waiting prompt at once.
    """

    timeout_iters: int  # iterations a prompt is held at most
    min_tokens: int | None = None  # release once the iteration would hold this many tokens
    min_requests: int | None = None  # release once this many prompts wait (attention-DP ranks)
    min_decoding: int = 1  # hold only while at least this many requests decode

    def __post_init__(self) -> None:
        if self.timeout_iters < 0 or self.min_decoding < 1:
            raise ValueError(f"timeout_iters must be >= 0 and min_decoding >= 1, got "
                             f"{self.timeout_iters} and {self.min_decoding}")


@dataclass
class Trace:
    """Per-request timestamps (seconds) and the token gaps seen while decoding.

    The order of requests is not meaningful (cohorts are expanded at the end).
    """

    start: np.ndarray
    first_token: np.ndarray
    end: np.ndarray
    output_tokens: np.ndarray
    itl_values_ms: np.ndarray
    itl_weights: np.ndarray
    iterations: int = 0  # scheduler iterations simulated


class _Cohort:
    """``count`` requests with the same lengths and the same history so far."""

    __slots__ = ("count", "done", "end", "first", "isl", "need", "osl", "start")

    def __init__(self, count: int, isl: int, osl: int, need: int, start: float):
        self.count, self.isl, self.osl, self.need, self.start = count, isl, osl, need, start
        self.first = self.end = math.nan
        self.done = 0  # prompt tokens prefilled so far (per request)

    def split(self, count: int) -> _Cohort:
        """Detach ``count`` requests into a new cohort with the same history."""
        other = _Cohort(count, self.isl, self.osl, self.need, self.start)
        other.first, other.done = self.first, self.done
        self.count -= count
        return other


def simulate(step: StepTime, isl: np.ndarray, osl: np.ndarray, limits: Limits, *,
             concurrency: int | None = None, arrivals: np.ndarray | None = None,
             wait: ContextWait | None = None) -> Trace:
    """Run all requests through the scheduler.

    Closed loop (``concurrency``): that many requests are issued at t=0 and each completion issues
    the next (``None`` or <= 0: all at once). Open loop (``arrivals``, seconds, ascending):
    request i is issued at ``arrivals[i]``. ``wait``: the engine holds new prompts back
    (``ContextWait``); None: every prompt that fits is scheduled at once.
    """
    isl = np.asarray(isl, dtype=np.int64)
    osl = np.asarray(osl, dtype=np.int64)
    n = len(isl)
    bt = limits.block_tokens
    need_all = -(-(isl + osl) // bt)
    if int(need_all.max()) > limits.kv_blocks:
        raise OutOfMemory(
            f"one request of {int((isl + osl).max())} tokens needs {int(need_all.max())} KV "
            f"blocks; the cache holds {limits.kv_blocks}"
        )
    if not limits.chunked_prefill and int(isl.max()) > limits.token_budget:
        raise InvalidConfig(
            f"prompts of {int(isl.max())} tokens exceed max_num_tokens ({limits.token_budget}) "
            "without chunked prefill"
        )
    isl_l, osl_l, need_l = isl.tolist(), osl.tolist(), need_all.tolist()
    uniform = bool((isl == isl[0]).all() and (osl == osl[0]).all())
    chunked = limits.chunked_prefill
    max_in_flight, budget_total, kv_blocks = (limits.max_in_flight, limits.token_budget,
                                              limits.kv_blocks)

    cohorts: list[_Cohort] = []  # every cohort ever made, for the trace
    waiting: deque[_Cohort] = deque()
    prefilling: deque[_Cohort] = deque()
    decoding: list[tuple[int, int, _Cohort]] = []  # heap of (last iteration, tie, cohort)
    gaps: list[float] = []
    weights: list[float] = []
    t = 0.0
    issued = 0

    def issue(count: int, start: float) -> None:
        """Queue the next ``count`` requests, issued at ``start``, as few cohorts as possible."""
        nonlocal issued
        end = issued + count
        if uniform:
            c = _Cohort(count, isl_l[0], osl_l[0], need_l[0], start)
            cohorts.append(c)
            waiting.append(c)
        else:
            i = issued
            while i < end:
                j = i + 1
                while j < end and isl_l[j] == isl_l[i] and osl_l[j] == osl_l[i]:
                    j += 1
                c = _Cohort(j - i, isl_l[i], osl_l[i], need_l[i], start)
                cohorts.append(c)
                waiting.append(c)
                i = j
        issued = end

    if arrivals is None:
        issue(n if concurrency is None or concurrency <= 0 else min(concurrency, n), 0.0)
    it = 0  # iterations so far
    n_dec = 0  # requests decoding
    ctx_sum = 0.0  # KV tokens the decoding requests read per iteration
    kv_used = 0
    in_flight = 0
    done = 0
    tie = 0
    held = 0  # iterations the waiting prompts have been held (ContextWait)

    def finish(c: _Cohort) -> None:
        nonlocal n_dec, ctx_sum, kv_used, in_flight, done
        c.end = t
        n_dec -= c.count
        ctx_sum -= (c.isl + c.osl) * c.count
        kv_used -= c.need * c.count
        in_flight -= c.count
        done += c.count
        if arrivals is None and issued < n:
            issue(min(c.count, n - issued), t)

    while done < n:
        if arrivals is not None:
            while issued < n and arrivals[issued] <= t:
                issue(1, float(arrivals[issued]))
        # Admission: FCFS while a slot and the blocks of the whole sequence are free.
        while waiting and in_flight < max_in_flight:
            c = waiting[0]
            fit = min(c.count, max_in_flight - in_flight, (kv_blocks - kv_used) // c.need)
            if fit <= 0:
                break
            if fit < c.count:
                c = c.split(fit)
                cohorts.append(c)
            else:
                waiting.popleft()
            prefilling.append(c)
            in_flight += fit
            kv_used += fit * c.need
        if in_flight == 0:
            # Nothing to run: only an open loop gets here, waiting for the next arrival.
            t = max(t, float(arrivals[issued]))
            continue

        budget = budget_total - n_dec
        hold = False
        if (wait is not None and prefilling and budget > 0 and prefilling[0].done == 0
                and n_dec >= max(1, wait.min_decoding)):
            tokens = n_dec + sum(c.isl * c.count for c in prefilling)
            prompts = sum(c.count for c in prefilling)
            hold = not (held >= wait.timeout_iters
                        or (wait.min_tokens is not None and tokens >= wait.min_tokens)
                        or (wait.min_requests is not None and prompts >= wait.min_requests))
            held = held + 1 if hold else 0
        if prefilling and budget > 0 and not hold:
            tokens = 0
            attn = 0.0
            finished: list[_Cohort] = []
            whole_cohorts = 0  # finished cohorts at the front of ``prefilling``
            for c in prefilling:
                remaining = c.isl - c.done
                whole = min(c.count, (budget - tokens) // remaining)
                if whole <= 0:
                    break
                attn += whole * remaining * (c.done + remaining / 2)
                tokens += whole * remaining
                if whole < c.count:
                    head = c.split(whole)  # the first ``whole`` requests finish their prompt
                    cohorts.append(head)
                    head.done = head.isl
                    finished.append(head)
                    break
                c.done = c.isl
                finished.append(c)
                whole_cohorts += 1
            room = budget - tokens
            if chunked and room > 0 and len(prefilling) > whole_cohorts:
                # A chunk of the next prompt fills what is left of the budget.
                c = prefilling[whole_cohorts]
                if c.count > 1:
                    part = c.split(1)  # the partial request goes ahead of the rest of its cohort
                    cohorts.append(part)
                    prefilling.insert(whole_cohorts, part)
                    c = part
                attn += room * (c.done + room / 2)
                tokens += room
                c.done += room
            if tokens:
                produced = sum(c.count for c in finished)
                d = step(n_dec + tokens, n_dec + produced, ctx_sum, attn)
                t += d
                if n_dec:
                    gaps.append(d)
                    weights.append(n_dec)
                it += 1
                ctx_sum += n_dec
                for _ in range(whole_cohorts):
                    prefilling.popleft()
                for c in finished:
                    c.first = t
                    n_dec += c.count
                    if c.osl <= 1:
                        ctx_sum += (c.isl + c.osl) * c.count
                        finish(c)
                    else:
                        ctx_sum += (c.isl + 1) * c.count
                        tie += 1
                        heapq.heappush(decoding, (it + c.osl - 1, tie, c))
                while decoding and decoding[0][0] <= it:
                    finish(heapq.heappop(decoding)[2])
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
            finish(heapq.heappop(decoding)[2])

    counts = np.fromiter((c.count for c in cohorts), dtype=np.int64, count=len(cohorts))
    keep = counts > 0
    counts = counts[keep]
    live = [c for c, k in zip(cohorts, keep) if k]

    def expand(attr: str) -> np.ndarray:
        return np.repeat(np.fromiter((getattr(c, attr) for c in live), dtype=float,
                                     count=len(live)), counts)

    return Trace(expand("start"), expand("first"), expand("end"), expand("osl"),
                 np.asarray(gaps) * 1e3, np.asarray(weights, float), iterations=it)


__all__ = ["ContextWait", "Limits", "StepTime", "Trace", "simulate"]
