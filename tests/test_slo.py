import pytest

from autotune.errors import UserError
from autotune.measurement import LoadPoint
from autotune.slo import parse_slo


def point(**latency) -> LoadPoint:
    stats = {m: {s: 0.0 for s in ("mean", "p50", "p90", "p95", "p99")}
             for m in ("ttft", "tpot", "itl", "e2e")}
    for key, value in latency.items():
        metric, stat = key.split("_")
        stats[metric][stat] = value
    return LoadPoint(1, 10, 1.0, 10.0, 10.0, 10.0, 1.0, stats)


@pytest.mark.parametrize("text, expected", [
    ("tpot:p99<=50ms", [("tpot", "p99", 50.0, False)]),
    ("ttft:p99<=2s,tpot:p50<20ms", [("ttft", "p99", 2000.0, False), ("tpot", "p50", 20.0, True)]),
    (" e2e : mean <= 1.5s ", [("e2e", "mean", 1500.0, False)]),
    ("itl:p95<=7", [("itl", "p95", 7.0, False)]),  # a bare number is milliseconds
    ("TPOT:P99<=25MS", [("tpot", "p99", 25.0, False)]),
    ("tpot:p90<=2.5e1ms", [("tpot", "p90", 25.0, False)]),
], ids=["one", "two-units-strict", "spaces-seconds", "bare-ms", "upper-case", "exponent"])
def test_parses(text, expected):
    slo = parse_slo(text)
    assert [(b.metric, b.stat, b.limit_ms, b.strict) for b in slo.bounds] == expected


@pytest.mark.parametrize("text, names", [
    ("tpot<=50ms", "tpot<=50ms"),
    ("latency:p99<=5s", "latency"),
    ("tpot:p42<=5ms", "p42"),
    ("tpot:p99>=5ms", "tpot:p99>=5ms"),
    ("tpot:p99<=0ms", "positive"),
    ("tpot:p99<=5us", "tpot:p99<=5us"),
    ("tpot:p99<=5ms,", "empty term"),
    ("tpot:p99<=5ms,tpot:p99<=9ms", "twice"),
    ("ttft:p99<=2s,e2e:p99<=1s", "contradictory"),
], ids=["no-stat", "unknown-metric", "unknown-stat", "wrong-op", "zero", "bad-unit",
        "trailing-comma", "duplicate", "e2e-below-ttft"])
def test_rejects_with_the_offending_part(text, names):
    with pytest.raises(UserError, match=names.replace("*", r"\*")) as info:
        parse_slo(text)
    assert "\n" not in str(info.value)


def test_empty_slo_means_max_throughput():
    assert not parse_slo(None) and not parse_slo("  ")
    assert parse_slo(None).met(point(tpot_p99=1e9))


def test_violation_is_relative_excess_and_strictness_counts():
    slo = parse_slo("tpot:p99<=20ms,ttft:p99<1s")
    assert slo.violations(point(tpot_p99=30.0, ttft_p99=500.0)) == pytest.approx(
        {"tpot:p99": 0.5, "ttft:p99": -0.5})
    assert slo.met(point(tpot_p99=20.0, ttft_p99=999.0))
    assert not slo.met(point(tpot_p99=20.0, ttft_p99=1000.0))  # "<" excludes the limit
