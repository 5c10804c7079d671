"""Issue 20 §4: the pipeline file is bounded and unambiguous (duplicate keys, aliases, size)."""

from __future__ import annotations

import pytest

from changeflow.pipelines.load import MAX_FILE_BYTES, PipelineError, parse

HEAD = "name: shop\nsources:\n  postgres:\n    database: shop\nentities:\n"


def refusal(text: str) -> str:
    with pytest.raises(PipelineError) as caught:
        parse(text, "shop.yml")
    return str(caught.value)


def test_a_second_fields_block_is_an_error_naming_both_lines_not_a_silent_override() -> None:
    text = (HEAD + "  orders:\n    table: public.orders\n    fields: {drop: [ssn, card_number]}\n"
            "    fields: {hash: []}\n")
    assert refusal(text) == ("shop.yml: line 9, column 5: not valid YAML: duplicate key 'fields' (first at line 8); "
                             "a second one would replace the first in silence: merge them into one")


def test_duplicate_entities_and_top_level_keys_are_errors_too() -> None:
    assert "duplicate key 'orders' (first at line 6)" in refusal(
        HEAD + "  orders:\n    table: public.orders\n  orders:\n    table: public.o2\n")
    assert "duplicate key 'name' (first at line 1)" in refusal(HEAD + "name: other\n")


@pytest.mark.parametrize("text", [
    HEAD + "  orders: &o\n    table: public.orders\n  lines: *o\n",
    "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b]\n",
    "a: &a [*a]\n",
])
def test_aliases_are_refused_before_they_expand(text: str) -> None:
    assert "is not allowed in a pipeline file; write the value out" in refusal(text)


def test_a_file_over_the_size_cap_is_refused_before_yaml_reads_it() -> None:
    message = refusal("#" * (MAX_FILE_BYTES + 1))
    assert message == (f"shop.yml: {MAX_FILE_BYTES + 1:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit of a "
                       "pipeline file; split it into one file per pipeline")


def test_the_same_key_in_different_mappings_is_fine() -> None:
    text = HEAD + "  orders:\n    table: public.orders\n  lines:\n    table: public.lines\n"
    assert set(parse(text, "shop.yml").entities) == {"orders", "lines"}
