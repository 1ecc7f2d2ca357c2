"""Property-based fuzzing of every input parser (tests/fuzzing.py): a bounded number of examples
per parser here; ``python -m bench.fuzz --examples N`` runs the same properties with more."""

from __future__ import annotations

import pytest

from tests.fuzzing import DOC, PROPERTIES

EXAMPLES = 100  # per parser: about 25 s for all of them on a 2-core machine


def test_the_documented_codes_are_read_from_the_protocol_reference() -> None:
    assert {"bad_message", "unknown_type", "bad_image", "too_large", "busy"} <= DOC.session_codes
    assert {"no_session", "expired"} <= DOC.mqtt_codes
    assert DOC.offer[400] >= {"bad_message", "bad_offer"} and "too_large" in DOC.offer[413]
    assert {"session.ready", "error", "reply.done"} <= DOC.event_types
    assert {400, 413} <= DOC.vision_statuses


@pytest.mark.parametrize("name", list(PROPERTIES))
def test_fuzzed_input_gets_documented_answers_and_harms_no_one(name: str) -> None:
    outcomes = PROPERTIES[name].run(EXAMPLES)
    assert sum(outcomes.values()) >= EXAMPLES
