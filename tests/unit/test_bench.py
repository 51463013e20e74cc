"""The measuring helpers: workload generation, timing summaries, Prometheus parsing, ports."""

from __future__ import annotations

import math
import socket

from kvtier.bench.scrape import by_tier, hit_rate, parse_samples
from kvtier.bench.server import first_error_line, port_is_free
from kvtier.bench.summary import format_bytes, percentile, summarize
from kvtier.bench.workload import WorkloadSpec, make_conversations, make_document, turn_order


def count_words(text: str) -> int:
    return len(text.split())


def test_documents_are_deterministic_and_big_enough() -> None:
    first, again, other = (make_document(seed, 500, count_words) for seed in (1, 1, 2))
    assert first == again
    assert first.text != other.text
    assert first.num_tokens == count_words(first.text) >= 500
    for town in first.towns:  # every fact a question may ask about is in the text
        assert town.name in first.text and str(town.founded_year) in first.text and town.mayor in first.text


def test_users_take_turns_and_histories_grow() -> None:
    spec = WorkloadSpec(num_users=3, num_rounds=2, document_tokens=200)
    assert turn_order(spec) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    conversations = make_conversations(spec, count_words)
    assert len({c.document.text for c in conversations}) == 3  # a document per user
    first = conversations[0].ask()
    assert [m["role"] for m in first] == ["system", "user"]
    conversations[0].answer("It was founded in 1200.")
    second = conversations[0].ask()
    assert second[:2] == first and [m["role"] for m in second[2:]] == ["assistant", "user"]
    assert conversations[0].last_question == second[-1]["content"]


def test_shared_document_is_the_same_for_everyone() -> None:
    spec = WorkloadSpec(num_users=2, num_rounds=1, document_tokens=100, shared_document=True)
    first, second = make_conversations(spec, count_words)
    assert first.history[0] == second.history[0]


def test_percentiles_interpolate() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.95) == 1.95
    assert math.isnan(percentile([], 0.5))
    summary = summarize([1.0, 2.0, 3.0, 4.0])
    assert (summary.count, summary.mean, summary.p50) == (4, 2.5, 2.5)


def test_format_bytes() -> None:
    assert format_bytes(None) == "n/a"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3.0 MiB"


def test_prometheus_text_by_tier() -> None:
    text = ('# HELP x\nkvtier_hits_total{tier="memory"} 3\nkvtier_misses_total{tier="memory"} 1\n'
            'kvtier_hits_total{tier="disk",rank="0"} 0\nkvtier_hits_total{tier="disk",rank="1"} 0\n'
            'kvtier_misses_total{tier="disk"} 0\nkvtier_x_bucket{le="1"} 2\nkvtier_x_count 2\nbad line\n')
    table = by_tier(parse_samples(text))
    assert table == {"kvtier_hits_total": {"memory": 3.0, "disk": 0.0},
                     "kvtier_misses_total": {"memory": 1.0, "disk": 0.0}, "kvtier_x_count": {"-": 2.0}}
    assert hit_rate(table, "memory") == 0.75
    assert hit_rate(table, "disk") is None  # nothing looked up
    assert hit_rate({}, "memory") is None  # the counters are absent


def test_kvtier_series_from_vllms_metrics_summed_over_engines() -> None:
    text = ('# HELP vllm:kvtier_hits_total Chunks served by a tier\n# TYPE vllm:kvtier_hits_total counter\n'
            'vllm:kvtier_hits_total{engine="0",model_name="m",tier="memory"} 3.0\n'
            'vllm:kvtier_hits_total{engine="1",model_name="m",tier="memory"} 4.0\n'
            'vllm:kvtier_hits_created{engine="0",model_name="m",tier="memory"} 1.7e9\n'
            '# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine="0",model_name="m"} 1.0\n')
    assert by_tier(parse_samples(text)) == {"kvtier_hits_total": {"memory": 7.0}}


def test_port_is_free_sees_a_listener() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not port_is_free(sock.getsockname()[1])


def test_first_error_line_finds_the_root_cause() -> None:
    log = [
        "(APIServer pid=1) WARNING 11-28 03:32:38 [system_utils.py:255] failed with error current limit; "
        "OSError: [Errno 24] Too many open files",
        "(Worker pid=3) ERROR 11-28 03:33:04 [multiproc_executor.py:1063] Traceback (most recent call last):",
        "(Worker pid=3) ERROR 11-28 03:33:04 [multiproc_executor.py:1063] kvtier.errors.ConfigError: "
        "KVTIER_BOGUS: unknown environment variable",
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ]
    assert first_error_line(log) == "kvtier.errors.ConfigError: KVTIER_BOGUS: unknown environment variable"
    assert first_error_line(["INFO ready", "(APIServer pid=1) ERROR something broke"]) == "ERROR something broke"
    assert first_error_line(["INFO all fine"]) is None
