"""SGLang's cache rules (treegrpo.engine.cache_rules), written once for the client's cache
model and the embedded engine's KV cache: worked examples."""

from __future__ import annotations

from treegrpo.engine.cache_rules import (
    aligned,
    reusable_length,
    sequence_at_finish,
    stored_at_prefill,
)


def test_the_last_prompt_token_always_runs():
    assert reusable_length(1) == 0
    assert reusable_length(5) == 4
    assert reusable_length(0) == 0


def test_pages_round_down():
    assert aligned(7, 4) == 4 and aligned(8, 4) == 8 and aligned(3, 4) == 0
    assert reusable_length(9, page_size=4) == 8
    assert reusable_length(8, page_size=4) == 4  # 7 reusable tokens: one whole page
    assert stored_at_prefill([1, 2, 3, 4, 5], page_size=2) == [1, 2, 3, 4]
    assert stored_at_prefill([1, 2, 3], page_size=1) == [1, 2, 3]


def test_a_finished_request_leaves_all_but_its_last_token():
    assert sequence_at_finish([1, 2], [7, 8, 9]) == [1, 2, 7, 8]
    assert sequence_at_finish([1, 2], [7]) == [1, 2]
    assert sequence_at_finish([1, 2], []) == [1, 2]  # nothing generated: the prompt
    assert sequence_at_finish([1, 2, 3], [7, 8, 9], page_size=2) == [1, 2, 3, 7]
