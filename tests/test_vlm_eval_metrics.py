"""VLM benchmark metrics: caption parity with pycocoevalcap, VQA official rules, circular MCQ."""

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from mmpt.eval.caption_metrics import absent_metrics, caption_scores
from mmpt.eval.choice_metrics import (
    check_choice,
    choice_from_scores,
    choice_scores,
    circular_accuracy,
    extract_choice,
    mmbench_group,
    rotations,
)
from mmpt.eval.ptb_tokenize import java_available, ptb_tokenize_java, ptb_tokenize_python
from mmpt.eval.vqa_metrics import (
    exact_match,
    normalize_answer,
    relaxed_accuracy,
    vqa_accuracy,
    vqa_scores,
)

needs_java = pytest.mark.skipif(not java_available(), reason="java is not on the PATH")

PREDICTIONS = {
    "1": "A man riding a wave on top of a surfboard.",
    "2": "Two dogs playing with a frisbee in the grass",
    "3": "a plate of food with broccoli and meat",
    "4": "",
}
REFERENCES = {
    "1": [
        "A surfer rides a large wave in the ocean.",
        "A man on a surfboard riding a wave.",
        "Man surfing on a big wave (in California).",
    ],
    "2": ["Two dogs play with a frisbee.", "A pair of dogs chase a frisbee on the lawn!"],
    "3": ["A plate with meat, broccoli and rice.", "Food on a white plate; it's broccoli."],
    "4": ['The kids\' bedroom has a "big" bunk bed.', "A bedroom with a bunk bed."],
}
TRICKY = [
    "A man's dog, isn't it? \"Quoted\" (paren) [brack] {brace}",
    "It's 3.5 kg -- e-mail: a@b.com 1/2 cannot gonna I'm you'd we'll they've",
    "A red-and-white   sign; with $5, 50% off! Hello.World",
    "it’s a “fancy” dog’s bowl, isn’t it?",
    "dogs' toys are here. What?! no way... really?",
    "a,b and 1,000 people at the U.S. border, said Dr. Smith & Co.",
    "'tis the season for a 10-year-old boy's t-shirt",
    "We're sure they'd've won't can't shouldn't",
    "hello--world and well - done",
]


def _coco_reference(tokens_gts, tokens_res):
    bleu, _ = Bleu(4).compute_score(tokens_gts, tokens_res, verbose=0)
    cider, _ = Cider().compute_score(tokens_gts, tokens_res)
    rouge, _ = Rouge().compute_score(tokens_gts, tokens_res)
    return {"CIDEr": cider, "BLEU-4": bleu[3], "ROUGE-L": rouge}


def _split(tokens, ids, refs):
    res = {k: [tokens[i]] for i, k in enumerate(ids)}
    gts, pos = {}, len(ids)
    for k in ids:
        gts[k] = tokens[pos : pos + len(refs[k])]
        pos += len(refs[k])
    return gts, res


@needs_java
def test_caption_scores_equal_pycocoevalcap_pipeline():
    """The toolkit's own PTBTokenizer + scorers, as its eval.py runs them, to 1e-9."""
    tok = PTBTokenizer()
    nonempty = {k: v for k, v in PREDICTIONS.items() if v}
    gts = tok.tokenize({k: [{"caption": c} for c in REFERENCES[k]] for k in nonempty})
    res = tok.tokenize({k: [{"caption": v}] for k, v in nonempty.items()})
    expected = _coco_reference(gts, res)
    for backend in ("java", "python"):
        got = caption_scores(nonempty, REFERENCES, tokenizer=backend, meteor=False)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (backend, key)
    assert 0 < expected["BLEU-4"] < 1 and expected["CIDEr"] > 0.5


def test_caption_scores_equal_scorers_with_empty_prediction():
    """The empty caption is scored (not dropped), and the whole set equals the scorers."""
    ids = list(PREDICTIONS)
    flat = [PREDICTIONS[k] for k in ids] + [r for k in ids for r in REFERENCES[k]]
    gts, res = _split(ptb_tokenize_python(flat), ids, REFERENCES)
    expected = _coco_reference(gts, res)
    got = caption_scores(PREDICTIONS, REFERENCES, tokenizer="python", meteor=False)
    assert set(got) >= {"CIDEr", "BLEU-4", "ROUGE-L"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    # Dropping the empty caption would change the corpus score.
    without = caption_scores(
        {k: v for k, v in PREDICTIONS.items() if v}, REFERENCES, tokenizer="python", meteor=False
    )
    assert without["CIDEr"] != pytest.approx(got["CIDEr"], abs=1e-6)


def test_perfect_and_wrong_captions():
    refs = {"a": ["a red circle"], "b": ["a blue square"]}
    perfect = caption_scores(
        {"a": "A red circle.", "b": "a blue square"}, refs, tokenizer="python", meteor=False
    )
    assert perfect["ROUGE-L"] == pytest.approx(1.0)
    wrong = caption_scores({"a": "xyz", "b": "qqq"}, refs, tokenizer="python", meteor=False)
    assert wrong["CIDEr"] == 0.0 and wrong["ROUGE-L"] == 0.0 and wrong["BLEU-4"] < 1e-6


def test_caption_scores_reject_missing_references():
    with pytest.raises(ValueError, match="no reference caption"):
        caption_scores({"1": "a dog", "9": "a cat"}, {"1": ["a dog"]}, tokenizer="python")
    with pytest.raises(ValueError, match="no reference caption"):
        caption_scores({"1": "a dog"}, {"1": ["", "  "]}, tokenizer="python")
    with pytest.raises(ValueError, match="empty"):
        caption_scores({}, {"1": ["a dog"]}, tokenizer="python")


def test_absent_metrics_name_spice_reason():
    absent = absent_metrics(meteor=False)
    assert "METEOR" in absent
    assert "SPICE" in absent and ("CoreNLP" in absent["SPICE"] or "java" in absent["SPICE"])


@needs_java
def test_python_tokenizer_equals_java_on_tricky_captions():
    coco = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(TRICKY)})
    java = ptb_tokenize_java(TRICKY)
    python = ptb_tokenize_python(TRICKY)
    for i, caption in enumerate(TRICKY):
        assert java[i] == coco[str(i)][0], caption
        assert python[i] == java[i], caption


def test_python_tokenizer_known_tokens():
    got = ptb_tokenize_python(["A man's \"big\" dog (isn't it?)...", "", "U.S. 1,000 t-shirts."])
    assert got == ["a man 's big dog -lrb- is n't it -rrb-", "", "u.s. 1,000 t-shirts"]


@needs_java
@pytest.mark.slow
def test_meteor_when_java_present():
    got = caption_scores(PREDICTIONS, REFERENCES, meteor=True)
    assert 0 < got["METEOR"] < 1


# --- VQA: the official vqaEval.py rules, hand-worked ---------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two dogs.", "2 dogs"),  # number word, final period
        ("  The Cat\n", "cat"),  # article, case, newline, strip
        ("none", "0"),
        ("dont", "don't"),  # contraction map
        ("yes, it is", "yes it is"),  # ", " -> the comma is deleted
        ("red-white", "red white"),  # no space next to '-' -> replaced by a space
        ("red - white", "red white"),  # space next to '-' -> deleted, spaces collapse
        ("1,000", "1000"),  # digit,digit -> every mark deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("u.s.a.", "usa"),
        ("an apple!", "apple"),
        ("ten o'clock", "10 o'clock"),
        ("what's up?", "what's up"),
    ],
)
def test_normalize_answer_official_rules(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_vqa_accuracy_leave_one_out():
    answers = ["2"] * 3 + ["3"] * 7
    assert vqa_accuracy("two", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("3", answers) == pytest.approx(1.0)
    assert vqa_accuracy("4", answers) == 0.0
    one = ["cat"] + ["dog"] * 9
    assert vqa_accuracy("cat", one) == pytest.approx(9 * (1 / 3) / 10)
    two = ["cat"] * 2 + ["dog"] * 8
    assert vqa_accuracy("cat", two) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)


def test_vqa_accuracy_answer_side_quirks():
    # Identical human answers are not normalised at all (official rule) ...
    assert vqa_accuracy("Yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["Yes"] * 10, normalize_answers=True) == 1.0
    assert vqa_accuracy("t-shirt", ["t-shirt"] * 10) == 0.0
    # ... differing ones get the punctuation step only (not case, numbers or articles).
    assert vqa_accuracy("T-shirt", ["t-shirt"] * 5 + ["shirt"] * 5) == 1.0
    assert vqa_accuracy("two", ["two"] * 5 + ["2"] * 5) == 1.0  # matches the five "2"s
    with pytest.raises(ValueError, match="human answers"):
        vqa_accuracy("a", [])


def test_exact_and_relaxed():
    assert exact_match("The dog.", ["dog"]) == 1.0 and exact_match("cat", ["dog"]) == 0.0
    assert relaxed_accuracy("10.4", ["10"]) == 1.0
    assert relaxed_accuracy("10.6", ["10"]) == 0.0
    assert relaxed_accuracy("50%", ["0.5"]) == 1.0
    assert relaxed_accuracy("0", ["0"]) == 1.0 and relaxed_accuracy("0.01", ["0"]) == 0.0
    assert relaxed_accuracy("Paris", ["rome", "paris"]) == 1.0


def test_vqa_scores_and_bad_input():
    preds = {"q1": "yes", "q2": "Two", "q3": "blue"}
    answers = {"q1": ["yes"] * 10, "q2": ["2"] * 10, "q3": ["red"] * 10}
    types = {"q1": "yes/no", "q2": "number", "q3": "other"}
    got = vqa_scores(preds, answers, types)
    assert got["vqa_accuracy"] == pytest.approx(2 / 3) and got["count"] == 3
    assert got["per_answer_type"] == {"number": 1.0, "other": 0.0, "yes/no": 1.0}
    assert got["exact_match"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no answers"):
        vqa_scores({"q1": "yes", "q9": "no"}, answers)


# --- multiple choice ------------------------------------------------------------------------

OPTIONS = {"A": "red circle", "B": "blue square", "C": "green triangle", "D": "red square"}


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        (" c ", None),  # lowercase alone is not a letter answer
        ("Answer: B", "B"),
        ("The answer is (C).", "C"),
        ("I think the correct option is D because", "D"),
        ("B. blue square", "B"),
        ("A red circle", "A"),  # the option text, not the article
        ("a blue square", "B"),
        ("It is the green triangle.", "C"),
        ("red square", "D"),  # "red" alone would be ambiguous; the full text is D
        ("a square", None),
        ("E", None),  # not an option
        ("", None),
    ],
)
def test_extract_choice(text, letter):
    assert extract_choice(text, OPTIONS) == letter


def test_choice_from_scores_ties_are_misses():
    assert choice_from_scores({"A": -1.0, "B": -0.5}) == "B"
    assert choice_from_scores({"A": -0.5, "B": -0.5}) is None
    assert choice_from_scores({"A": float("nan"), "B": 0.0}) is None


def test_rotations_move_the_answer_with_its_text():
    rots = rotations(OPTIONS, "C")
    assert len(rots) == 4 and rots[0] == (OPTIONS, "C")
    for opts, answer in rots:
        assert list(opts) == ["A", "B", "C", "D"]
        assert opts[answer] == "green triangle"
        assert sorted(opts.values()) == sorted(OPTIONS.values())
    assert [a for _, a in rots] == ["C", "B", "A", "D"]


def test_circular_hand_case():
    # Question 1: the model always finds the right text -> right under every rotation.
    # Question 2: the model always says "A" -> right only once in four.
    preds, answers, groups = {}, {}, {}
    for q in ("q1", "q2"):
        for r, (opts, answer) in enumerate(rotations(OPTIONS, "B")):
            item = f"{q}#{r}"
            text = opts[answer] if q == "q1" else "A"
            preds[item] = extract_choice(text, opts)
            answers[item] = answer
            groups[item] = q
    got = choice_scores(preds, answers, groups, {k: "shapes" for k in preds})
    assert got["accuracy"] == pytest.approx(5 / 8)
    assert got["circular_accuracy"] == pytest.approx(0.5)
    assert got["questions"] == 2 and got["per_category"] == {"shapes": 0.5}
    assert circular_accuracy({"x": [True, True, False]}) == 0.0
    assert circular_accuracy([("x", True), ("y", True), ("y", True)]) == 1.0


def test_mmbench_groups_rotated_copies_by_index_mod_1e6():
    assert [mmbench_group(i) for i in ("12", "1000012", "3000012", "q7")] == [
        "12",
        "12",
        "12",
        "q7",
    ]


def test_choice_bad_input():
    with pytest.raises(ValueError, match=">= 2 options"):
        check_choice({"A": "only"})
    with pytest.raises(ValueError, match="not one of the options"):
        rotations(OPTIONS, "E")
    with pytest.raises(ValueError, match="no answer"):
        choice_scores({"x": "A"}, {})
    with pytest.raises(ValueError, match="no multiple-choice"):
        circular_accuracy({})


def test_missing_toolkit_says_how_to_install():
    from mmpt.eval.ptb_tokenize import require_pycocoevalcap

    with pytest.raises(ImportError, match=r"mmpt\[eval\]"):
        require_pycocoevalcap("pycocoevalcap.not_a_module")
