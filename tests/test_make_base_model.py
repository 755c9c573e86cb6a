"""scripts/make_base_model.py's noisy SFT targets: the shipped base model's calibration rests on
the decks having exactly the intended empirical distribution."""

from __future__ import annotations

import collections
import importlib.util
import pathlib
import random

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_base_model.py"
_spec = importlib.util.spec_from_file_location("make_base_model", _PATH)
mbm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mbm)

RECORD = {"answer": "-3"}


@pytest.mark.parametrize("correct_frac", [0.25, 0.4, 0.5])
def test_near_miss_deck_is_exact_and_its_mode_is_right(correct_frac):
    deck = mbm.noisy_deck("arithmetic", RECORD, correct_frac, "deck", random.Random(0))
    counts = collections.Counter(deck)
    right = counts.pop("<answer>-3</answer>")
    assert right / len(deck) == pytest.approx(correct_frac, abs=0.5 / len(deck))
    # every near miss -3±1..4, equally often, each strictly rarer than the right answer
    assert sorted(counts) == sorted(
        f"<answer>{-3 + d}</answer>" for d in (-4, -3, -2, -1, 1, 2, 3, 4)
    )
    assert len(set(counts.values())) == 1 and max(counts.values()) < right


def test_off_by_one_deck_is_one_habit():
    deck = mbm.noisy_deck("arithmetic", RECORD, 0.25, "off_by_one", random.Random(0))
    assert collections.Counter(deck) == {"<answer>-3</answer>": 8, "<answer>-2</answer>": 24}


def test_iid_and_noiseless_have_no_deck():
    rng = random.Random(0)
    state = rng.getstate()
    assert mbm.noisy_deck("arithmetic", RECORD, 0.25, "iid", rng) == []
    assert mbm.noisy_deck("arithmetic", RECORD, 1.0, "deck", rng) == []
    assert rng.getstate() == state  # the iid recipe's random stream is untouched


def test_wrong_response_avoids_the_rejected_answer():
    rng = random.Random(1)
    answers = {
        mbm.wrong_response("arithmetic", RECORD, rng, avoid="<answer>-2</answer>")
        for _ in range(400)
    }
    assert "<answer>-2</answer>" not in answers and "<answer>-3</answer>" not in answers
    assert len(answers) == 7


def test_band_correct_gives_each_band_its_own_fraction_of_right_targets():
    fracs = mbm.parse_band_correct("easy=1,intermediate=0.5,hard=0.05")
    assert fracs == {"easy": 1.0, "intermediate": 0.5, "hard": 0.05}
    rng = random.Random(0)
    right = "<answer>-3</answer>"
    for band, expected in (("intermediate", 24 / 48), ("hard", 1 / 25)):
        frac = mbm.record_correct_frac({"answer": "-3", "band": band, "id": "t/0"}, fracs)
        deck = mbm.noisy_deck("miniature", RECORD, frac, "off_by_one", rng)
        # 24 wrong targets (the answer + 1) and round(24 f / (1 - f)) right ones
        assert collections.Counter(deck) == {
            right: round(expected * len(deck)),
            "<answer>-2</answer>": 24,
        }
    easy = {"answer": "-3", "band": "easy", "id": "t/1"}
    easy_frac = mbm.record_correct_frac(easy, fracs)
    assert mbm.noisy_deck("miniature", easy, easy_frac, "off_by_one", rng) == []  # always right
    with pytest.raises(ValueError, match="no fraction for band 'odd' of record t/2"):
        mbm.record_correct_frac({"band": "odd", "id": "t/2"}, fracs)
    with pytest.raises(ValueError, match="must be in"):
        mbm.parse_band_correct("hard=0")
