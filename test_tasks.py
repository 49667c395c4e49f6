"""tasks.py: the metrics, the CME loaders on public samples of each format, evaluation sets.

    python -m pytest -q
"""
import base64
import errno
import json
import os
import random
import re
import signal
import string
import subprocess
import sys

import pytest

import evaluation
import files
import minicme
import tasks
from conftest import (
    CME_DIR,
    FIXTURES,
    LLAMA2,
    hf_tokenizer_folder,
    named_pipe,
    needs_cme_fixtures,
    script_error,
    usage_error,
)
from data import UserError
from tasks import (
    CME_TASKS,
    TEMPLATES,
    Task,
    accuracy,
    chance_level,
    evaluate,
    exact_match,
    first_sentence,
    make_record,
    normalize_answer,
    qa_record,
    rouge_l,
    write_eval_set,
)
from tokenizer import Tokenizer

# -----------------------------------------------------------------------------------------------
# metrics

def squad_normalize_answer(s):
    """SQuAD v1.1's evaluate-v1.1.py, written out: lower case, ASCII punctuation out, then articles, then spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def test_normalize_answer_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Indian-Ocean! ") == "indianocean"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # "the" only as a whole word
    assert normalize_answer("曹操。") == "曹操"  # Unicode punctuation too
    # on ASCII text it is SQuAD's: punctuation goes before articles, so "The-End" is one word, not "end"
    # ASCII symbols too ("$", "+", "<", "|"), which Unicode files under S, not P; an article between symbols that stay
    # ("°the°") leaves a space, as SQuAD's does
    for text in ("The-End", "A.I. and the U.S.", "an-apple a day", "the.", "Rock 'n' roll", "a/an/the", "(The) Who",
                 "$1,000", "x^2 + y = z", "<i>Paris</i>", "a|b", "~the `end`", "x°the°y"):
        assert normalize_answer(text) == squad_normalize_answer(text), text


def test_exact_match_takes_the_best_alias_after_normalisation():
    assert exact_match("The Indian Ocean.", ["indian ocean"]) == 1.0
    assert exact_match("sunset blvd", ["Sunset Boulevard", "Sunset Blvd."]) == 1.0
    assert exact_match("Sunset", ["Sunset Boulevard", "Sunset Blvd."]) == 0.0
    assert exact_match("Paris", "paris") == 1.0


def test_an_answer_of_articles_alone_is_matched_by_itself_not_by_an_empty_or_other_answer():
    """SQuAD's normalisation leaves nothing of "The The" (a band) or "A" (vitamin A), so an empty answer, or "the",
    matched them; such an alias keeps its articles. Every other alias is compared as SQuAD compares it."""
    qa = CME_TASKS["triviaqa"]
    for alias, right, wrong in (("The The", ["The The.", "the the", " THE  THE! "], ["", "the", "The", "a an", "."]),
                                ("A", ["A", "a.", "(a)"], ["", "the", "an", "B", "A A"]),
                                ("an", ["An"], ["", "a"])):
        record = qa_record("Name it.", [alias])
        for answer in right:
            assert exact_match(answer, [alias]) == qa.score(answer, record) == 1.0, (alias, answer)
        for answer in wrong:
            assert exact_match(answer, [alias]) == qa.score(answer, record) == 0.0, (alias, answer)
    assert exact_match("", ["The The", "the"]) == 0.0 and exact_match("The", ["Paris", "The"]) == 1.0
    for prediction, alias in (("The Indian Ocean", "indian ocean"), ("the", "Paris"), ("", "Paris"),
                              ("a Paris", "Paris"), ("the the", "The Who"), ("Who", "The Who"), ("an", "an apple")):
        squad = float(squad_normalize_answer(prediction) == squad_normalize_answer(alias))
        assert exact_match(prediction, [alias]) == squad, (prediction, alias)


@pytest.mark.parametrize("prediction", ["B", "b", "(B)", "(b)", "[B]", "B.", "B)", "B. Paris", "B) Paris",
                                        "B.cellular telephone", "Answer: B", "answer: (B)", "The answer is B",
                                        "The correct option is B.", " B\n", "b. Paris", "b: Paris",
                                        "b) Paris", "The right answer is B", "Final answer: B", "Label: B",
                                        "(b Paris", "[b Paris"])
def test_accuracy_reads_an_option_letter_in_its_common_forms(prediction):
    assert accuracy(prediction, "B") == 1.0 and accuracy(prediction, " b") == 1.0  # the gold letter's case either way
    assert accuracy(prediction, "C") == 0.0


@pytest.mark.parametrize("prediction", ["A or B", "B or A", "A, B", "A/B", "A & B", "A and B", "A B", "(A) or (B)",
                                        "A; B", "A, or B", "A vs. B", "Option A or option B", "(A) or choice (B)",
                                        "A OR B", "A Or option B", "A VS B", "A B.", "A (B)."])
def test_accuracy_rejects_a_prediction_naming_two_options(prediction):
    assert accuracy(prediction, "A") == 0.0 and accuracy(prediction, "B") == 0.0


@pytest.mark.parametrize("prediction", ["A. or B.", "A., B.", "A. / B", "a. or b.", "(A). or (B)", "A.; B."])
def test_accuracy_rejects_two_options_when_the_first_letter_has_its_period(prediction):
    """The period after the first letter hid the separator: "A. or B." counted as A."""
    assert accuracy(prediction, "A") == 0.0 and accuracy(prediction, "B") == 0.0


@pytest.mark.parametrize("prediction", ["b!", "b?", "b。", " b!\n", "Answer: b!"])
def test_accuracy_reads_a_lowercase_letter_followed_by_punctuation_alone(prediction):
    """Only a word after a lowercase letter makes it an article ("a dog"); "b!" answers option (b), as "B!" does."""
    assert accuracy(prediction, "B") == 1.0 and accuracy(prediction.upper(), "B") == 1.0
    assert accuracy(prediction, "A") == 0.0


@pytest.mark.parametrize("prediction", ["B, because the passage says so", "B and nothing else", "B or bust",
                                        "B. Paris, a city in France", "B; options A and C are wrong", "B a"])
def test_accuracy_reads_an_option_letter_followed_by_words_that_start_with_a_letter(prediction):
    """A word after "or", "and" or a comma is not a second option because it starts with a letter: only a letter
    standing alone (or "option X") right after the first is one, and a separator further on is not. A lowercase
    letter alone after it ("B a", of "B a city" cut at max_new_tokens) is an article: options are capitals."""
    assert accuracy(prediction, "B") == 1.0
    assert accuracy(prediction, "A") == 0.0


def test_accuracy_does_not_mistake_words_for_option_letters():
    assert accuracy("a dog", "A") == 0.0  # an article
    assert accuracy("Because of gravity", "B") == 0.0
    assert accuracy("", "A") == 0.0
    assert accuracy("B. A city in France", "B") == 1.0  # an "A" later in the answer text is fine
    assert accuracy("(B)", " b") == accuracy("b)", "B") == 1.0  # the gold letter's case and spaces do not matter


def test_accuracy_on_label_words_ignores_case_punctuation_and_an_answer_prefix():
    for prediction in ["entailment", "Entailment.", "  ENTAILMENT\n", "Answer: entailment", "entailment!"]:
        assert accuracy(prediction, "entailment") == 1.0
    assert accuracy("not_entailment", "not entailment") == 1.0
    assert accuracy("neutral", "entailment") == 0.0


def test_accuracy_rejects_two_labels_and_keeps_duplicate_apart_from_not_duplicate():
    dup = ("duplicate", "not duplicate")
    nli = ("entailment", "neutral", "contradiction")
    assert accuracy("not duplicate", "duplicate", dup) == 0.0
    assert accuracy("duplicate", "not duplicate", dup) == 0.0
    assert accuracy("Not duplicate.", "not duplicate", dup) == 1.0
    assert accuracy("These are not duplicate questions.", "not duplicate", dup) == 1.0  # "duplicate" inside it
    assert accuracy("These are not duplicate questions.", "duplicate", dup) == 0.0
    assert accuracy("entailment or neutral", "entailment", nli) == 0.0
    assert accuracy("It is entailment, not contradiction", "entailment", nli) == 0.0
    # "duplicate" before "not duplicate" is outside it: two labels named
    assert accuracy("duplicate, not duplicate", "not duplicate", dup) == 0.0
    assert accuracy("duplicate, not duplicate", "duplicate", dup) == 0.0
    assert accuracy("The relationship is entailment.", "entailment", nli) == 1.0  # one label named
    assert accuracy("The relationship is entailment.", "entailment") == 0.0  # no label set: exact only


def test_a_label_inside_a_longer_one_named_does_not_count_on_its_own_without_a_negation_too():
    """"sports" inside "sports news" is that label's word, as "duplicate" is inside "not duplicate"."""
    topics = ("sports", "sports news", "world")
    assert accuracy("It is sports news.", "sports news", topics) == 1.0
    assert accuracy("It is sports news.", "sports", topics) == 0.0
    topics = ("news", "sports news", "world")  # the shorter label at the end of the longer one
    assert accuracy("It is sports news.", "sports news", topics) == 1.0
    assert accuracy("It is sports news.", "news", topics) == 0.0


def test_rouge_l_is_one_for_identical_and_zero_for_disjoint_or_empty_texts():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("The CAT, sat!", "the cat sat") == 1.0  # case and punctuation are not tokens
    assert rouge_l("dogs bark loudly", "the cat sat") == 0.0
    assert rouge_l("", "the cat sat") == 0.0 and rouge_l("the cat", "") == 0.0 and rouge_l("...", "...") == 0.0


def test_chance_levels_on_hand_made_records():
    nli = Task("nli", "accuracy", 8, ("entailment", "neutral", "contradiction"))
    records = [{"output": o} for o in ("entailment", "Entailment.", "neutral", "contradiction")]
    assert chance_level(nli, records) == 50.0  # two of four name the same label, as the metric reads it
    letters = Task("blank", "accuracy", 4, ("A", "B", "C"))
    assert chance_level(letters, [{"output": o} for o in ("A", "b", " B", "C", "B")]) == 60.0
    assert chance_level(Task("qa", "exact_match", 16), [{"output": "Paris"}]) == 0.0
    summary = Task("summary", "rouge_l", 48)
    record = {"instruction": "Summarize:", "input": "The cat sat. It was happy!", "output": "the cat sat on the mat"}
    # the baseline answers "The cat sat.": LCS 3 of 3 and 6 tokens, F1 = 2 * 3 / (3 + 6)
    assert chance_level(summary, [record]) == pytest.approx(100 * 6 / 9)
    assert first_sentence("First line\nsecond. Third.") == "First line"
    assert first_sentence("\n  A post starts. Then more.") == "A post starts."  # leading blank lines are no sentence
    assert first_sentence("What a day! Then more.") == "What a day!"  # "!" and "?" end a sentence as "." does
    assert first_sentence("Why? Because.") == "Why?"
    with pytest.raises(UserError, match="no records"):
        chance_level(nli, [])


def test_a_reference_that_is_none_of_the_tasks_labels_is_refused_not_counted_as_a_class():
    """The evaluation-set loader refuses such a record; chance_level, called on records of its own, counted a typo
    ("entailmnet") as a label: three of them made a majority class that no answer can name."""
    nli = Task("nli", "accuracy", 8, ("entailment", "neutral", "contradiction"))
    records = [{"output": o} for o in ("entailmnet", "entailmnet", "entailmnet", "neutral", "contradiction")]
    with pytest.raises(UserError) as error:
        chance_level(nli, records)
    assert str(error.value) == ("nli: a record can not count toward the chance level: its reference 'entailmnet' is "
                                "none of nli's labels (entailment, neutral, contradiction); write the label meant as "
                                'its "output", or remove the record.')
    assert chance_level(nli, [{"output": "Entailment."}, *records[3:]]) == pytest.approx(100 / 3)  # labels: counted


@pytest.mark.parametrize("text, first", [
    ("Prices rose 3.5%, then fell; analysts: wary. Next year, more.", "Prices rose 3.5%, then fell; analysts: wary."),
    ("One, two, three. Four.", "One, two, three."),
    ("No end here, nor here; nor: here", "No end here, nor here; nor: here")])
def test_first_sentence_runs_on_past_commas_semicolons_colons_and_decimal_points(text, first):
    """Only . ! ? before a space, or a line break, end ROUGE-L's baseline sentence: a cut at a comma would change the
    trivial baseline's score, and with it the chance level that every ROUGE-L task's gain is read against."""
    assert first_sentence(text) == first


def test_rouge_l_on_a_hand_computed_case():
    # prediction "the cat on mat" (4 tokens), reference "a cat sat on the red mat" (7 tokens):
    # LCS = "cat on mat" = 3 ("the ... mat" is only 2), so P = 3/4, R = 3/7,
    # F1 = 2 P R / (P + R) = (18/28) / (33/28) = 6/11
    p, r = 3 / 4, 3 / 7
    assert rouge_l("the cat on mat", "a cat sat on the red mat") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("the cat on mat", "a cat sat on the red mat") == pytest.approx(6 / 11)
    # and F1 is symmetric in P and R: swapping prediction and reference swaps them and keeps F1
    assert rouge_l("a cat sat on the red mat", "the cat on mat") == pytest.approx(6 / 11)
    # LCS(a b c d e, a c e x) = a c e: precision 3/5, recall 3/4
    p, r = 3 / 5, 3 / 4
    assert rouge_l("a b c d e", "a c e x") == pytest.approx(2 * p * r / (p + r))


def test_rouge_l_agrees_with_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])  # default: no stemming
    rng = random.Random(0)
    words = ["the", "Cat", "sat", "on", "mat", "dog's", "it", "2024", "x-ray", "naïve", "Über", "--", "a.b", "!!"]
    cases = [("", "a"), ("...", "..."), ("Hello, World!", "hello world"), ("naïve café", "naive cafe"),
             ("I'm in a LDR, 1 year left.", "In an LDR with 1 year of college left")]
    cases += [(" ".join(rng.choices(words, k=rng.randint(0, 12))), " ".join(rng.choices(words, k=rng.randint(0, 12))))
              for _ in range(300)]
    for prediction, reference in cases:
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure  # score(target, prediction)
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12), (prediction, reference)


def test_task_score_reads_the_reference_and_aliases_from_the_record():
    qa = Task("qa", "exact_match", 8)
    record = qa_record("Where is it?", ["Sunset Boulevard", "Sunset Blvd."])
    assert qa.score("sunset blvd", record) == 1.0
    assert qa.score("sunset", record) == 0.0
    assert Task("s", "rouge_l", 8).score("the cat", {"output": "the cat"}) == 1.0
    assert Task("s", "rouge_l", 8).score("the cat", {"output": "the cat sat"}) == pytest.approx(2 * 2 / (2 + 3))
    with pytest.raises(ValueError, match="no reference output"):
        qa.score("x", {"output": None})
    # a QA record of one's own, without "answers" (or with none), is scored on its output
    for record in ({"output": "Sunset Blvd."}, {"output": "Sunset Blvd.", "answers": []}):
        assert qa.score("sunset blvd", record) == 1.0 and qa.score("sunset", record) == 0.0
    # with "answers", those are the aliases exact match accepts: the output is not one unless listed
    record = {"output": "the boulevard of sunsets", "answers": ["Sunset Blvd."]}
    assert qa.score("sunset blvd", record) == 1.0 and qa.score("the boulevard of sunsets", record) == 0.0
    with pytest.raises(ValueError, match="metric"):
        Task("bad", "bleu", 8)


def test_qa_exact_match_scores_only_the_answer_before_the_first_chinese_full_stop():
    """The authors' Chinese QA records answer "<short answer>。<explanation>": the explanation is not scored."""
    qa = Task("qa", "exact_match", 8)
    record = qa_record("三国中谁说出宁教我负天下人", ["曹操", "曹孟德"])
    assert qa.score("曹操。他是魏国的奠基者", record) == 1.0
    assert qa.score("曹孟德。曹操，字孟德。", record) == 1.0  # an alias, then more text with another "。"
    assert qa.score("刘备。曹操说的", record) == 0.0  # the right name only after the "。" does not count
    assert qa.score("曹操说的。", record) == 0.0
    assert exact_match("曹操。他是魏国的奠基者", ["曹操"]) == 0.0  # the metric itself compares the whole text
    assert evaluate(qa, ["曹操。他是魏国的奠基者", "刘备。曹操"], [record, record]) == 50.0


def test_evaluate_is_the_mean_score_times_100_and_needs_one_prediction_per_record():
    task = Task("nli", "accuracy", 8, ("entailment", "neutral", "contradiction"))
    records = [{"output": "entailment"}, {"output": "neutral"}, {"output": "contradiction"}, {"output": "neutral"}]
    assert evaluate(task, ["entailment", "Neutral.", "neutral", "neutral"], records) == 75.0
    with pytest.raises(ValueError, match="one prediction per record"):
        evaluate(task, ["entailment"], records)
    with pytest.raises(ValueError, match="0 predictions for 0 records"):  # no records: no mean, not a crash
        evaluate(task, [], [])


# -----------------------------------------------------------------------------------------------
# CME_DIR templates and loaders

def _official_records():
    with open(os.path.join(str(FIXTURES), "official", "train_example.json"), encoding="utf-8") as f:
        return json.load(f)


@needs_cme_fixtures
def test_every_template_phrasing_except_rte_is_copied_from_the_official_records():
    instructions = {r["instruction"] for r in _official_records()}
    for kind, (phrasings, _) in TEMPLATES.items():
        if kind != "rte":
            assert set(phrasings) <= instructions, kind


@needs_cme_fixtures
def test_templates_rebuild_official_records_exactly():
    official = _official_records()
    by_input = {r["input"]: r for r in official}
    nli = next(r for r in official if r["output"] == "neutral" and r["input"].startswith("Sentence 1: Colorz"))
    premise, hypothesis = nli["input"][len("Sentence 1: "):].split("\nSentence 2: ")
    assert make_record("nli", "neutral", nli["instruction"], premise=premise, hypothesis=hypothesis) == nli
    mc = by_input["Question: Which technology was developed most recently?\nChoices: A.cellular telephone, "
                  "B.television, C.refrigerator, D.airplane"]
    assert make_record("choice", "A", question="Which technology was developed most recently?",
                       options=["cellular telephone", "television", "refrigerator", "airplane"]) == mc
    blank = by_input["Sentence: 'Kayla was smarter than Maria, so _ had to look up how to keep vinyl records.'\n"
                     "Option A: 'Kayla'\nOption B: 'Maria'"]
    assert make_record("blank", "B", blank["instruction"], option1="Kayla", option2="Maria",
                       sentence="Kayla was smarter than Maria, so _ had to look up how to keep vinyl records.") == blank
    pair = by_input["Text 1: How do I improve my English speaking?\n"
                    "Text 2: How can I improve my English pronunciation?"]
    assert make_record("paraphrase", "duplicate", text1="How do I improve my English speaking?",
                       text2="How can I improve my English pronunciation?") == pair
    qa = next(r for r in official if r["instruction"] == "where does the movie dazed and confused take place")
    assert {k: v for k, v in qa_record(qa["instruction"], ["Texas"]).items() if k != "answers"} == qa


@needs_cme_fixtures
def test_rte_loader_reads_the_glue_tsv_with_balanced_labels():
    records = CME_TASKS["rte"].load(os.path.join(CME_DIR, "rte", "dev.tsv"))
    assert len(records) == 30
    assert [r["output"] for r in records[:4]] == ["not entailment"] * 3 + ["entailment"]  # indices 57, 81, 115, 129
    assert sum(r["output"] == "entailment" for r in records) == 15
    assert records[0]["input"].startswith("Sentence 1: Workers at the Lufthansa Technik")


@needs_cme_fixtures
def test_qqp_loader_handles_crlf_and_keeps_a_labelless_test_file_loadable():
    dev = CME_TASKS["qqp"].load(os.path.join(CME_DIR, "qqp", "dev.tsv"))  # CRLF line endings
    assert len(dev) == 9 and not any("\r" in r["input"] or "\r" in r["output"] for r in dev)
    assert [r["output"] for r in dev] == (["not duplicate"] * 2 + ["duplicate"] + ["not duplicate"] * 2
                                          + ["duplicate"] * 3 + ["not duplicate"])
    assert dev[0]["input"] == "Text 1: Why are African-Americans so beautiful?\nText 2: Why are hispanics so beautiful?"
    train = CME_TASKS["qqp"].load(os.path.join(CME_DIR, "qqp", "train.tsv"))
    assert len(train) == 9 and train[1]["output"] == "duplicate"
    test = CME_TASKS["qqp"].load(os.path.join(CME_DIR, "qqp", "test.tsv"))
    assert len(test) == 9 and all(r["output"] is None for r in test)


@needs_cme_fixtures
def test_anli_loader_maps_e_n_c_across_the_three_rounds():
    load = CME_TASKS["anli"].load
    r1 = load(os.path.join(CME_DIR, "anli", "R1", "dev.jsonl"))
    assert [r["output"] for r in r1] == ["contradiction", "entailment", "contradiction", "neutral", "contradiction"]
    assert r1[1]["input"].endswith("\nSentence 2: Franco Zeffirelli had a political career")
    rounds = [load(os.path.join(CME_DIR, "anli", f"R{k}", f"{s}.jsonl")) for k in (1, 2, 3) for s in ("dev", "test")]
    assert sum(map(len, rounds)) == 30
    assert {r["output"] for rs in rounds for r in rs} == {"entailment", "neutral", "contradiction"}


@needs_cme_fixtures
def test_winogrande_loader_turns_answers_1_2_into_letters_and_keeps_the_blank():
    dev = CME_TASKS["winogrande"].load(os.path.join(CME_DIR, "winogrande", "dev.jsonl"))
    assert [r["output"] for r in dev] == ["B", "A"]
    assert dev[0]["input"] == ("Sentence: 'Ian volunteered to eat Dennis's menudo after already having a bowl because "
                               "_ despised eating intestine.'\nOption A: 'Ian'\nOption B: 'Dennis'")
    outputs = lambda name: [r["output"] for r in CME_TASKS["winogrande"].load(os.path.join(CME_DIR, "winogrande",
                                                                                          name))]
    assert outputs("train_xl.jsonl") == ["A", "B", "B", "A"]
    assert outputs("test.jsonl") == [None, None]


@needs_cme_fixtures
def test_arc_loader_reads_nested_questions_and_numeric_choice_labels(tmp_path):
    dev = CME_TASKS["arc"].load(os.path.join(CME_DIR, "arc", "ARC-Challenge-Dev.jsonl"))
    assert [r["output"] for r in dev] == ["D", "C"]
    assert dev[1]["input"].endswith("\nChoices: A.fog, B.rain, C.drought, D.tornado")
    numeric = {"id": "x", "question": {"stem": "Which is a gas?", "choices": [
        {"text": "ice", "label": "1"}, {"text": "water", "label": "2"},
        {"text": "steam", "label": "3"}]}, "answerKey": "3"}
    (tmp_path / "arc.jsonl").write_text(json.dumps(numeric) + "\n")
    [record] = CME_TASKS["arc"].load(str(tmp_path / "arc.jsonl"))
    assert record["output"] == "C" and record["input"] == "Question: Which is a gas?\nChoices: A.ice, B.water, C.steam"


def test_an_arc_question_with_as_many_choices_as_letters_loads_and_its_last_is_h(tmp_path):
    """The prompt has 8 letters (A-H): a question with 8 choices is ARC's widest, not one too many."""
    row = {"question": {"stem": "q", "choices": [{"text": f"t{i}", "label": str(i)} for i in range(1, 9)]},
           "answerKey": "8"}
    (tmp_path / "arc.jsonl").write_text(json.dumps(row) + "\n")
    [record] = CME_TASKS["arc"].load(str(tmp_path / "arc.jsonl"))
    assert record["output"] == "H" and record["input"].endswith("G.t7, H.t8")


@needs_cme_fixtures
def test_mmlu_loader_reads_headerless_csv_with_quoted_and_multiline_fields(tmp_path):
    law = CME_TASKS["mmlu"].load(os.path.join(CME_DIR, "mmlu", "professional_law_test.csv"))
    assert len(law) == 10 and [r["output"] for r in law[:3]] == ["C", "B", "D"]
    algebra = CME_TASKS["mmlu"].load(os.path.join(CME_DIR, "mmlu", "abstract_algebra_dev.csv"))
    assert algebra[0]["input"] == ("Question: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
                                   "Choices: A.0, B.1, C.2, D.3") and algebra[0]["output"] == "B"
    assert '"Whenever a person knows' in law[1]["input"]  # CSV's doubled quotes undone
    (tmp_path / "x_test.csv").write_text('"Line one,\nline two ""quoted""?",a,b,c,d,D\nsecond,1,2,3,4,A\n')
    (tmp_path / "y_test.csv").write_bytes("\ufeffq?,a,b,c,d,C\n".encode())  # a byte-order mark, as Excel writes
    records = CME_TASKS["mmlu"].load(str(tmp_path / "x_test.csv"))
    assert records[0]["input"].startswith('Question: Line one,\nline two "quoted"?\nChoices: A.a')
    assert [r["output"] for r in records] == ["D", "A"]
    assert CME_TASKS["mmlu"].load(str(tmp_path / "y_test.csv"))[0]["input"].startswith("Question: q?\n")
    (tmp_path / "z_test.csv").write_text("q?, a, b, c, d, C\n")  # spaces after the commas, as people type CSV
    [spaced] = CME_TASKS["mmlu"].load(str(tmp_path / "z_test.csv"))
    assert spaced["input"] == "Question: q?\nChoices: A.a, B.b, C.c, D.d" and spaced["output"] == "C"
    out = str(tmp_path / "mmlu.jsonl")  # one evaluation set from several subjects' files
    assert write_eval_set("mmlu", [str(tmp_path / "x_test.csv"), str(tmp_path / "y_test.csv")], out) == 3


@needs_cme_fixtures
def test_webqa_loader_reads_webquestions_target_values_and_baidu_webqa(tmp_path):
    webq = CME_TASKS["webqa"].load(os.path.join(CME_DIR, "webquestions", "webquestions.examples.test.json"))
    assert len(webq) == 25
    assert webq[0]["answers"] == ["Jamaican Creole English Language", "Jamaican English"]
    assert webq[1]["answers"] == ["Lawyer"]
    franklin = next(r for r in webq if "ben franklin" in r["instruction"])
    assert franklin["answers"] == ["Lightning rod", "Franklin stove", "Bifocals", "Glass harmonica"]
    baidu = {"Q_1": {"question": "三国中谁说出宁教我负天下人", "evidences": {
        "Q_1_0": {"answer": ["曹操"], "evidence": "宁教我负天下人，休教天下人负我。曹操说。"},
        "Q_1_1": {"answer": ["no_answer"], "evidence": "无关。"},
        "Q_1_2": {"answer": ["曹孟德", "曹操"], "evidence": "曹孟德……"}}}}
    (tmp_path / "me_test.ann.json").write_text(json.dumps(baidu, ensure_ascii=False), encoding="utf-8")
    [record] = CME_TASKS["webqa"].load(str(tmp_path / "me_test.ann.json"))
    assert record == {"instruction": "三国中谁说出宁教我负天下人", "input": "", "output": "曹操",
                      "answers": ["曹操", "曹孟德"]}
    assert CME_TASKS["webqa"].score("曹操。", record) == 1.0


@pytest.mark.parametrize("ext", [".jsonl", ".json"])
def test_an_evaluation_set_keeps_non_ascii_text_as_written(tmp_path, ext):
    """UTF-8 text, as the official records hold it, not \\uXXXX escapes a reader of the file can not read."""
    raw = tmp_path / "me_test.ann.json"
    raw.write_text(json.dumps({"Q_1": {"question": "谁说的？", "evidences": {"e": {"answer": ["曹操"]}}}}))
    assert write_eval_set("webqa", str(raw), str(tmp_path / f"webqa{ext}")) == 1
    text = (tmp_path / f"webqa{ext}").read_text(encoding="utf-8")
    assert "谁说的？" in text and "曹操" in text and "\\u" not in text


@needs_cme_fixtures
def test_nq_and_triviaqa_loaders_keep_every_answer_alias():
    nq = CME_TASKS["nq"].load(os.path.join(CME_DIR, "nq_open", "NQ-open.dev.jsonl"))
    assert len(nq) == 30 and nq[0]["answers"] == ["14 December 1972 UTC", "December 1972"]
    assert nq[0]["instruction"] == "when was the last time anyone was on the moon" and nq[0]["input"] == ""
    assert len(CME_TASKS["nq"].load(os.path.join(CME_DIR, "nq_open", "NQ-open.efficientqa.test.1.1.jsonl"))) == 10
    [trivia] = CME_TASKS["triviaqa"].load(os.path.join(CME_DIR, "triviaqa", "triviaqa_sample.json"))
    assert trivia["instruction"] == "Which Lloyd Webber musical premiered in the US on 10th December 1993?"
    assert trivia["output"] == "sunset boulevard"  # lower case, as the official TriviaQA-style records
    assert {"Sunset Blvd", "West Sunset Boulevard", "sunset bulevard"} <= set(trivia["answers"])
    assert CME_TASKS["triviaqa"].score("Sunset Blvd.", trivia) == 1.0


def _tldr_example(folder, split="valid2"):
    """The summarize-from-feedback README's comparison row (its split is "train") moved to `split`: its path and row."""
    with open(os.path.join(CME_DIR, "tldr", "README_comparisons_example.json"), encoding="utf-8") as f:
        row = dict(json.load(f), split=split)
    path = os.path.join(str(folder), f"comparisons_{split}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(row, f, indent=2)
    return path, row


@needs_cme_fixtures
def test_tldr_loader_takes_the_post_and_the_human_reference_summary(tmp_path):
    assert CME_TASKS["oai_sum"].load(os.path.join(CME_DIR, "tldr", "README_comparisons_example.json")) == []  # train
    path, row = _tldr_example(tmp_path)
    [record] = CME_TASKS["oai_sum"].load(path)
    assert record["input"] == row["info"]["post"]
    assert record["output"].startswith("we suspect other party")  # policy "ref", leading space gone
    assert record["instruction"] == TEMPLATES["summary"][0][0]


def test_tldr_loader_reads_tldr_3_filtered_rows(tmp_path):
    rows = [{"id": "t3_1", "subreddit": "advice", "title": "T", "post": "Long post.\n\nMore.", "summary": " short one"},
            {"id": "t3_2", "subreddit": "advice", "title": "U", "post": "Other post.", "summary": " other"}]
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = CME_TASKS["oai_sum"].load(str(tmp_path / "valid.jsonl"))
    assert [(r["input"], r["output"]) for r in records] == [("Long post.\n\nMore.", "short one"),
                                                          ("Other post.", "other")]


def test_tldr_comparisons_count_each_post_once_and_only_with_a_human_reference(tmp_path):
    """summarize-from-feedback holds one row per compared pair: a post recurs, and only rows with a
    policy "ref" summary carry the human reference."""
    def row(post_id, post, *policies):
        return {"info": {"id": post_id, "post": post},
                "summaries": [{"text": f" {p} of {post_id}", "policy": p} for p in policies]}
    rows = [row("a", "Post A.", "sup2", "ref"), row("a", "Post A.", "ref", "sup4"), row("b", "Post B.", "sup2", "sup4"),
            row("c", "Post C.", "ref", "sup2")]
    (tmp_path / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = CME_TASKS["oai_sum"].load(str(tmp_path / "comparisons.jsonl"))
    assert [(r["input"], r["output"]) for r in records] == [("Post A.", "ref of a"), ("Post C.", "ref of c")]


def test_tldr_comparisons_leave_out_the_train_split_and_count_a_post_once_over_every_raw_file(tmp_path, capsys):
    """summarize-from-feedback's batch files mix comparisons of the train split (training posts) with valid1 and valid2
    ones, and a post recurs in several batch files: passing them all gave training posts in the evaluation set, and a
    post once per file that held it."""
    def row(post_id, split):
        return {"info": {"id": post_id, "post": f"Post {post_id}."}, "split": split,
                "summaries": [{"text": " sup", "policy": "sup4"}, {"text": f" ref of {post_id}", "policy": "ref"}]}
    files = {"batch9.json": [row("a", "train"), row("b", "valid2"), row("b", "valid2")],
             "batch11.json": [row("b", "valid2"), row("c", "valid1"), row("a", "train")],
             "batch12.json": [row("c", "valid1"), row("d", "valid2")]}
    for name, rows in files.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = {r["info"]["id"] for rows in files.values() for r in rows if r["split"] != "train"}
    out = tmp_path / "oai_sum.jsonl"
    tasks.main(["--task", "oai_sum", "--raw", *(str(tmp_path / n) for n in files), "--out", str(out)])
    assert capsys.readouterr().out == f"wrote {len(held_out)} oai_sum records to {out}\n"
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["input"] for r in records) == [f"Post {i}." for i in sorted(held_out)]  # each held-out post once
    assert all(r["output"] == "ref of " + r["input"][5:-1] for r in records)
    only_train = tmp_path / "batch3.json"
    only_train.write_text(json.dumps(row("e", "train")) + "\n")
    assert script_error(tasks.main, ["--task", "oai_sum", "--raw", only_train, "--out", tmp_path / "e.jsonl"],
                        capsys).startswith(f"tasks.py: error: no comparison in {only_train} is of the valid1 or valid2 "
                                           "split and has a human reference summary (those of the train split are "
                                           "left out: their posts are training posts); pass the batch files")
    assert not (tmp_path / "e.jsonl").exists()


@needs_cme_fixtures
def test_a_triviaqa_question_in_several_raw_files_counts_once(tmp_path):
    """TriviaQA's rc files repeat questions: web-dev.json and wikipedia-dev.json share them (each with its own
    evidence), and verified-web-dev.json holds some of web-dev.json's. `--raw qa/*dev.json` counted each once per
    file that held it."""
    with open(os.path.join(CME_DIR, "triviaqa", "triviaqa_sample.json"), encoding="utf-8") as f:
        sample = json.load(f)
    [question] = sample["Data"]
    other = dict(question, QuestionId="tc_other", Question="Which other musical?")
    files = {"web-dev.json": [question, other], "wikipedia-dev.json": [question], "verified-web-dev.json": [other]}
    for name, items in files.items():
        (tmp_path / name).write_text(json.dumps(dict(sample, Data=items)), encoding="utf-8")
    out = tmp_path / "triviaqa.jsonl"
    assert write_eval_set("triviaqa", [str(tmp_path / n) for n in files], str(out)) == 2
    assert sorted(json.loads(line)["instruction"] for line in out.read_text(encoding="utf-8").splitlines()) == sorted(
        {item["Question"] for items in files.values() for item in items})


def test_webquestions_target_values_undo_backslash_escapes(tmp_path):
    target = r'(list (description "The \"Boss\"") (description Ok))'
    rows = [{"utterance": "what did he call it?", "targetValue": target}]
    (tmp_path / "webquestions.examples.test.json").write_text(json.dumps(rows))
    [record] = CME_TASKS["webqa"].load(str(tmp_path / "webquestions.examples.test.json"))
    assert record["answers"] == ['The "Boss"', "Ok"]


def test_imdb_folder_reviews_come_in_numeric_id_order(tmp_path):
    for name in ("10_8.txt", "2_7.txt", "1_9.txt"):
        os.makedirs(tmp_path / "pos", exist_ok=True)
        (tmp_path / "pos" / name).write_text(f"review {name}")
    records = CME_TASKS["imdb"].load(str(tmp_path))
    assert [r["input"] for r in records] == ["review 1_9.txt", "review 2_7.txt", "review 10_8.txt"]


def test_imdb_folder_skips_hidden_files_and_names_a_review_that_is_not_utf8(tmp_path):
    """A folder browsed on a Mac holds .DS_Store files: they are not reviews, and not a mistake either; a review
    that is not UTF-8 is named itself, not as 'a file in' its folder."""
    for lab in ("pos", "neg"):
        os.makedirs(tmp_path / lab)
        (tmp_path / lab / "0_7.txt").write_text(f"a {lab} review")
        (tmp_path / lab / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1\xff")
    assert [r["output"] for r in CME_TASKS["imdb"].load(str(tmp_path))] == ["positive", "negative"]
    (tmp_path / "neg" / "3_2.txt").write_bytes("caf\u00e9".encode("latin-1"))
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "neg" / "3_2.txt")) + " is not UTF-8 text"):
        write_eval_set("imdb", [str(tmp_path)], str(tmp_path / "imdb.jsonl"))


@needs_cme_fixtures
def test_imdb_loader_reads_aclimdb_folders_and_the_fastnlp_tsv():
    records = CME_TASKS["imdb"].load(os.path.join(CME_DIR, "imdb", "aclImdb", "test"))
    assert [r["output"] for r in records] == ["positive", "positive", "negative", "negative"]
    assert [len(r["input"]) for r in records] == [794, 2004, 1179, 1272]  # SOURCES.md's character counts
    assert records[0]["input"].startswith("I went and saw this movie last night")  # pos/0_10.txt comes first
    tsv = CME_TASKS["imdb"].load(os.path.join(CME_DIR, "imdb", "fastnlp_tsv", "dev.txt"))
    assert [r["output"] for r in tsv] == ["negative"] * 4 + ["positive"] * 2
    assert "<br /><br />" in tsv[0]["input"]  # kept, as the official IMDB-style records keep them


def test_imdb_tsv_reviews_are_the_text_after_the_tab_without_the_line_break(tmp_path):
    """fastNLP's file holds one review a line: the line break (LF or CRLF, the last line's or none) is the file's,
    not the review's, whose inner tabs stay."""
    (tmp_path / "dev.txt").write_bytes(b"pos\tgreat film\r\nneg\tdull,\tlong film\npos\t<br />fine")
    records = CME_TASKS["imdb"].load(str(tmp_path / "dev.txt"))
    want = [("positive", "great film"), ("negative", "dull,\tlong film"), ("positive", "<br />fine")]
    assert records == [make_record("sentiment", label, text=text) for label, text in want]


@needs_cme_fixtures
def test_write_eval_set_writes_a_json_list_or_jsonl_in_the_official_format(tmp_path):
    rounds = [os.path.join(CME_DIR, "anli", f"R{k}", "test.jsonl") for k in (1, 2, 3)]
    assert write_eval_set("anli", rounds, str(tmp_path / "anli.json")) == 15
    with open(tmp_path / "anli.json", encoding="utf-8") as f:
        records = json.load(f)
    assert len(records) == 15 and all(set(r) == {"instruction", "input", "output"} for r in records)
    assert write_eval_set("nq", os.path.join(CME_DIR, "nq_open", "NQ-open.dev.jsonl"),
                          str(tmp_path / "nq.jsonl"), limit=5) == 5
    lines = (tmp_path / "nq.jsonl").read_text(encoding="utf-8").splitlines()
    every = CME_TASKS["nq"].load(os.path.join(CME_DIR, "nq_open", "NQ-open.dev.jsonl"))
    assert len(lines) == 5 and all(json.loads(line) in every for line in lines)  # answers kept with each record
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


KILLED_AT_THE_RENAME = """
import os, signal, sys, tasks
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # kill -9 with the set written under its temporary name
tasks.main(sys.argv[1:])
"""


@pytest.mark.skipif(os.name == "nt", reason="SIGKILL")
def test_the_temporary_of_a_killed_tasks_py_goes_when_the_set_is_written_again(tmp_path, capsys):
    """A tasks.py killed (kill -9, a pre-empted job) while it wrote a set left OUT.tmpPID, as large as the set, and
    the run again that wrote the set whole left it there for good. The set's own temporaries of ended processes go;
    another file's, and a user's file of another name, stay."""
    raw, out = tmp_path / "dev.jsonl", tmp_path / "eval" / "winogrande.jsonl"
    raw.write_text("".join(json.dumps({"sentence": f"Ann or Bo {i}: _ won.", "option1": "Ann", "option2": "Bo",
                                       "answer": str(1 + i % 2)}) + "\n" for i in range(40)))
    argv = ["--task", "winogrande", "--raw", str(raw), "--out", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_THE_RENAME, *argv], cwd=os.path.dirname(tasks.__file__),
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (stale,) = out.parent.iterdir()
    assert stale.name.startswith("winogrande.jsonl.tmp") and not out.exists()
    kept = [out.parent / f"qa.jsonl.tmp{stale.name.rsplit('tmp', 1)[1]}", out.parent / "winogrande.jsonl.tmp-notes"]
    for path in kept:
        path.write_text("not this set's")
    tasks.main(argv)
    assert f"removed a leftover temporary file {stale}" in capsys.readouterr().err
    assert sorted(out.parent.iterdir()) == sorted([out, *kept])
    assert len(out.read_text().splitlines()) == 40


@needs_cme_fixtures
def test_an_eval_set_from_a_labelless_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"9 of 9 records in .*test.tsv have no label .*labelled split"):
        write_eval_set("qqp", os.path.join(CME_DIR, "qqp", "test.tsv"), str(tmp_path / "qqp.json"))
    assert not (tmp_path / "qqp.json").exists()


def test_records_that_can_not_be_scored_are_left_out_and_said_so_and_the_set_then_loads(tmp_path, capsys):
    """A raw record whose reference its metric reads as nothing (an NQ answer of punctuation) was written, and the
    evaluation set then refused as a whole by train.py, after its base was loaded."""
    raw = tmp_path / "nq.raw.jsonl"
    raw.write_text("".join(json.dumps({"question": f"q{i}", "answer": [a]}) + "\n"
                           for i, a in enumerate(["Paris", "—", "1972", "?!"])), encoding="utf-8")
    assert write_eval_set("nq", str(raw), str(tmp_path / "sets" / "nq.jsonl")) == 2
    assert capsys.readouterr().out == ("left out 2 of 4 records that can not be scored as nq (one: its reference holds "
                                       "no letter or digit, so an empty answer would be right)\n")
    (task, records), = evaluation.load_eval_sets({"eval_dir": str(tmp_path / "sets"), "eval_limit": 0}).values()
    assert sorted(r["answers"] for r in records) == [["1972"], ["Paris"]]
    raw.write_text(json.dumps({"question": "q", "answer": ["—"]}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^none of the 1 records in .*nq\.raw\.jsonl can be scored as nq \(one: its "
                                         r"reference holds no letter or digit.*\); check that the --raw files are the "
                                         r"task's\.$"):  # none left: refused, nothing written
        write_eval_set("nq", str(raw), str(tmp_path / "none.jsonl"))
    assert not (tmp_path / "none.jsonl").exists() and capsys.readouterr().out == ""


def test_an_out_named_for_another_task_is_refused_before_the_raw_files_are_read(tmp_path, capsys):
    """train.py scores <task>.jsonl as that task: `--task mmlu --out .../anli.jsonl` (the README's ANLI line with
    --task changed) wrote MMLU records that anli's label set then scored 0 without a word, after training."""
    out = tmp_path / "anli.jsonl"
    out.write_text("the user's anli set\n")
    assert script_error(tasks.main, ["--task", "mmlu", "--raw", tmp_path / "x_test.csv", "--out", out, "--overwrite"],
                        capsys) == (f"tasks.py: error: --out {out} is named for the task anli, and train.py would "
                                    f"score these mmlu records as anli's; name it {tmp_path / 'mmlu.jsonl'}.")
    assert out.read_text() == "the user's anli set\n"
    with pytest.raises(UserError, match=r"--out .*rte\.json is named for the task rte.* name it .*anli\.json\.$"):
        write_eval_set("anli", str(tmp_path / "r1.jsonl"), str(tmp_path / "rte.json"))
    with pytest.raises(FileNotFoundError, match="r1.jsonl"):  # another name is the user's: refused later, by train.py
        write_eval_set("anli", str(tmp_path / "r1.jsonl"), str(tmp_path / "anli_r1.json"))


@needs_cme_fixtures
def test_tasks_command_writes_the_eval_set_or_exits_with_one_line(tmp_path, capsys):
    tasks.main(["--task", "rte", "--raw", os.path.join(CME_DIR, "rte", "dev.tsv"),
               "--out", str(tmp_path / "rte.jsonl")])
    assert "wrote 30 rte records" in capsys.readouterr().out
    assert re.match(r"^tasks.py: error: .*nope.tsv does not exist", script_error(
        tasks.main, ["--task", "rte", "--raw", tmp_path / "nope.tsv", "--out", tmp_path / "x.json"], capsys))
    assert "x.txt must end in .json" in script_error(
        tasks.main, ["--task", "rte", "--raw", os.path.join(CME_DIR, "rte", "dev.tsv"), "--out", tmp_path / "x.txt"],
        capsys)


MALFORMED_RAW = [  # task, file name, content, what the message must say
    ("anli", "dev.jsonl", '{"context": "a", "hypothesis": "b", "label": "e"}\n{"context": "a", oops}\n',
     r"dev.jsonl line 2 is not valid JSON"),
    ("anli", "dev.jsonl", '{"context": "a", "hypothesis": "b", "label": "x"}\n', r"dev.jsonl line 1 has the label 'x'"),
    ("anli", "dev.jsonl", '{"premise": "a", "hypothesis": "b", "label": "e"}\n',
     r"dev.jsonl line 1 has no 'context' field"),
    ("qqp", "dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\r\n1\t2\t3\ta?\t0\r\n",
     r"dev.tsv line 2 has 5 tab-separated fields"),
    ("rte", "dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb, with a\ttab\tentailment\n",  # one field too many
     r"dev.tsv line 2 has 5 tab-separated fields where the header has 4"),
    ("rte", "dev.tsv", "index\tpremise\tlabel\n0\ta\tentailment\n",
     r"dev.tsv has the columns .* needs \['sentence1', 'sentence2'\]"),
    ("mmlu", "x_test.csv", "q,a,b,c,d,A\nq,a,b,c,A\n", r"x_test.csv line 2 has 5 fields"),
    ("mmlu", "x_test.csv", "q,a,b,c,d,A\nno commas at all\n", r"x_test.csv line 2 has 1 field;"),  # was "1 fields"
    ("rte", "dev.tsv", "index\tsentence1\tsentence2\tlabel\nno tabs\n",
     r"dev.tsv line 2 has 1 tab-separated field where the header has 4"),
    ("mmlu", "x_test.csv", "q,a,b,c,d,A\nq,a,b,c,d,e,A\n", r"x_test.csv line 2 has 7 fields"),
    ("mmlu", "x_test.csv", '"q\nspans two lines",a,b,c,d,A\n"bad\nrow",a,b,c,A\n', r"x_test.csv line 3 has 5 fields"),
    ("mmlu", "x_test.csv", "q,a,b,c,d,E\n", r"x_test.csv line 1 has the label 'E'"),
    ("mmlu", "x_test.csv", 'q,a,b,c,d,A\n"an open quote,a,b,c,d,A\n' + "x" * 140_000,  # was csv.Error's traceback
     r"x_test.csv line 2 is not a CSV row \(field larger than field limit"),
    ("webqa", "q.json", "[" * 100_000 + "]" * 100_000, r"q.json is nested too deeply to read"),
    ("triviaqa", "t.json", '{"Data": ' + "9" * 5000 + "}",  # json's ValueError: tasks.py's traceback
     r"t.json holds a number of more than [\d,]+ digits, too long to read"),
    ("arc", "arc.jsonl", '{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "B"}\n',
     r"arc.jsonl line 1 has the label 'B'"),
    ("arc", "arc.jsonl", '{"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": '
     '"A"}]}, "answerKey": "A"}\n', r"arc.jsonl line 1 labels two of its choices alike \(\['A', 'A'\]\)"),
    ("winogrande", "dev.jsonl", '{"sentence": "_ x", "option1": "a", "answer": "1"}\n',
     r"dev.jsonl line 1 has no 'option2' field"),
    # a sentence with no blank would be a prompt that asks nothing; a key given twice would keep its last value alone
    ("winogrande", "dev.jsonl", '{"sentence": "a _ b", "option1": "a", "option2": "b", "answer": "1"}\n'
     '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n',
     r'dev.jsonl line 2 has a sentence with no "_" for the options to fill \("no blank"\); put the "_" where'),
    ("anli", "dev.jsonl", '{"context": "a", "hypothesis": "b", "label": "e"}\n'
     '{"context": "a", "hypothesis": "b", "label": "e", "label": "c"}\n',
     r"dev.jsonl line 2 gives the key 'label' twice \(JSON would keep only the last value\); fix or remove that line"),
    ("webqa", "q.json", '[{"utterance": "q", "targetValue": "(list (description a))"},\n'
     ' {"utterance": "q",\n  "utterance": "r", "targetValue": "(list (description a))"}]',
     r"q.json line 2 gives the key 'utterance' twice \(JSON would keep only the last value\); pass the task's raw"),
    ("webqa", "q.json", '[{"utterance": "q", "targetValue": "Paris"}]', r"q.json record 0 has the targetValue 'Paris'"),
    ("webqa", "q.json", '[{"utterance": "q",\n "targetValue": }]', r"q.json line 2 is not valid JSON"),
    ("imdb", "train.txt", "pos\tgreat film\nmaybe\tso-so\n", r"train.txt line 2 is not 'pos<TAB>review'"),
    ("imdb", "train.txt", "pos\tgreat film\nneg\n", r"train.txt line 2 is not 'pos<TAB>review'"),  # no review
    # a field of the wrong JSON type: one sentence naming the file, the line or record, and the field
    ("nq", "nq.jsonl", '{"question": "q", "answer": null}\n',
     r"nq.jsonl line 1 has 'answer' set to null, not a string or a list of strings"),
    ("nq", "nq.jsonl", '{"question": "q", "answer": ["a"]}\n{"question": "q", "answer": 5}\n',
     r"nq.jsonl line 2 has 'answer' set to 5, not a string or a list"),
    ("nq", "nq.jsonl", '{"question": "q", "answer": ["a", 5]}\n',
     r"nq.jsonl line 1 has 'answer' set to \[\"a\", 5\], not a string or a list of strings"),
    ("triviaqa", "t.json", '{"Data": [{"Question": "q", "Answer": {"Value": "v", "Aliases": ["a", null]}}]}',
     r"t.json record 0 has 'Aliases' set to \[\"a\", null\], not a list of strings"),
    # a long value is cut short: the message stays one readable line
    ("nq", "nq.jsonl", json.dumps({"question": "q", "answer": list(range(1000))}),
     r"nq.jsonl line 1 has 'answer' set to \[0, 1, 2, [\d, ]+\.\.\., not a string"),
    ("nq", "nq.jsonl", '{"question": 5, "answer": ["a"]}\n', r"nq.jsonl line 1 has 'question' set to 5, not a string"),
    ("triviaqa", "t.json", '{"Data": {"Question": "q"}}', r"t.json has 'Data' set to \{.*\}, not a list"),
    ("triviaqa", "t.json", '{"Data": [{"Question": "q", "Answer": {"Value": "v", "Aliases": 5}}]}',
     r"t.json record 0 has 'Aliases' set to 5, not a list of strings"),
    ("oai_sum", "s.json", '[{"info": {"id": "1", "post": "p"}, "summaries": ["s"]}]',
     r"s.json record 0 has 'summaries' set to \[\"s\"\], not a list of objects"),
    ("oai_sum", "s.json", '[{"post": "p", "summary": 5}]', r"s.json record 0 has 'summary' set to 5, not a string"),
    ("oai_sum", "s.json", '[5]', r"s.json record 0 has 5 where an object holding 'info' belongs"),
    ("webqa", "q.json", '[{"utterance": "q", "targetValue": 5}]', r"q.json record 0 has 'targetValue' set to 5"),
    ("webqa", "q.json", '5', r"q.json holds 5; pass Baidu WebQA's JSON object or WebQuestions' JSON list"),
    ("anli", "dev.jsonl", '{"context": "a", "hypothesis": "b", "label": ["e"]}\n', r"dev.jsonl line 1 has the label"),
    ("arc", "arc.jsonl", '{"question": {"stem": "q", "choices": ["x"]}, "answerKey": "A"}\n',
     r"arc.jsonl line 1 has 'choices' set to \[\"x\"\], not a list of objects"),
    ("arc", "arc.jsonl", json.dumps({"question": {"stem": "q", "choices": [{"text": str(i), "label": str(i)}
                                                                          for i in range(9)]}, "answerKey": "1"}),
     r"arc.jsonl line 1 has 9 choices, more than the 8 letters"),  # was an IndexError
    # JSON lines given where one JSON value belongs, and a JSON list in a .jsonl file (TL;DR reads either kind)
    ("triviaqa", "t.json", '{"Data": []}\n{"Data": []}\n', r"t.json line 2 is not valid JSON \(Extra data\)"),
    ("oai_sum", "s.jsonl", '[{"post": "p", "summary": "s"}]\n', r"s.jsonl line 1 is not a JSON object"),
]


@pytest.mark.parametrize("task, name, content, message", MALFORMED_RAW)
def test_a_malformed_raw_file_gives_one_sentence_naming_file_and_line(tmp_path, task, name, content, message):
    path = tmp_path / name
    path.write_bytes(content.encode())
    with pytest.raises(ValueError, match=message) as error:
        CME_TASKS[task].load(str(path))
    text = str(error.value)
    assert "\n" not in text and text.endswith(".") and "; " in text  # what is wrong; what to do


@pytest.mark.parametrize("task, name, content, where", [
    ("anli", "dev.jsonl", '{"context": "a \\ud800 b", "hypothesis": "h", "label": "e"}\n', "line 1 has 'context'"),
    ("nq", "nq.jsonl", '{"question": "q", "answer": ["a"]}\n{"question": "q", "answer": ["a", "\\udfff"]}\n',
     "line 2 has 'answer'"),
    ("arc", "arc.jsonl", '{"question": {"stem": "q", "choices": [{"text": "x\\udbff", "label": "A"}]}, '
     '"answerKey": "A"}\n', "line 1 has 'text'"),
    ("triviaqa", "t.json", '{"Data": [{"Question": "q", "Answer": {"Aliases": ["\\ud800"]}}]}',
     "record 0 has 'Aliases'"),
    ("webqa", "q.json", '{"Q1": {"question": "\\ude00?", "evidences": {}}}', "question Q1 has 'question'")])
def test_a_lone_surrogate_in_a_raw_file_is_one_sentence_and_writes_nothing(tmp_path, capsys, task, name, content,
                                                                             where):
    """JSON lets a string hold "\\ud800" alone; the evaluation set, UTF-8, can not: it was a UnicodeEncodeError's
    traceback once every record was read."""
    raw, out = tmp_path / name, tmp_path / "sets" / f"{task}.jsonl"
    raw.write_text(content, encoding="ascii")
    out.parent.mkdir()
    err = script_error(tasks.main, ["--task", task, "--raw", raw, "--out", out], capsys)
    assert f"{raw} {where} holding a lone surrogate" in err and err.endswith("fix the text in the raw file.")
    assert not out.exists()


@pytest.mark.parametrize("task, name", [("anli", "dev.jsonl"), ("qqp", "dev.tsv"), ("mmlu", "x_test.csv"),
                                        ("triviaqa", "t.json"), ("imdb", "train.txt"), ("imdb", "aclImdb/pos/1_7.txt")])
def test_a_raw_file_that_is_a_named_pipe_is_one_sentence(tmp_path, capsys, task, name):
    """bash's <(...) or /dev/stdin under a pipe: tasks.py opened it and waited forever for a writer (here one that
    writes a record, so reading it is no longer waiting forever, but a test failure)."""
    pipe = tmp_path / name
    pipe.parent.mkdir(parents=True, exist_ok=True)
    raw = tmp_path / "aclImdb" if name.startswith("aclImdb") else pipe
    record = {"anli": '{"context": "a", "hypothesis": "b", "label": "e"}\n',
              "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\ta?\tb?\t0\n",
              "mmlu": "q,a,b,c,d,A\n", "imdb": "pos\tgreat film\n" if raw == pipe else "great film",
              "triviaqa": '{"Data": [{"Question": "q", "Answer": {"Value": "v", "Aliases": ["v"]}}]}'}[task]
    with named_pipe(pipe, record.encode()):
        err = script_error(tasks.main, ["--task", task, "--raw", raw, "--out", tmp_path / "out.jsonl"], capsys)
    assert err == f"tasks.py: error: {pipe} is a named pipe, not a file; give the task's raw file."
    assert not (tmp_path / "out.jsonl").exists()


def test_a_raw_json_file_that_is_not_utf8_or_a_link_to_nothing_is_named_as_such(tmp_path):
    """json.load's UnicodeDecodeError is a ValueError: it was not to be taken for a number too long to read."""
    (tmp_path / "t.json").write_bytes(b'{"Data": [{"Question": "caf\xe9"}]}')
    with pytest.raises(UserError, match=r"t\.json is not UTF-8 text \(invalid continuation byte\); save it as UTF-8"):
        write_eval_set("triviaqa", [str(tmp_path / "t.json")], str(tmp_path / "out.jsonl"))
    (tmp_path / "gone.json").symlink_to(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match=r"gone\.json does not exist; check the path to the task's raw file"):
        CME_TASKS["triviaqa"].load(str(tmp_path / "gone.json"))


@pytest.mark.parametrize("task", ["triviaqa", "webqa", "oai_sum"])
def test_a_raw_json_file_that_is_not_utf8_is_one_sentence_from_the_loader_itself(tmp_path, task):
    """The JSON loaders let json.load's UnicodeDecodeError out: write_eval_set named it, a loader called alone not."""
    path = tmp_path / "t.json"
    path.write_bytes(b'{"Data": [{"Question": "caf\xe9"}]}')
    with pytest.raises(UserError, match=r"t\.json is not UTF-8 text \(invalid continuation byte\); save it as UTF-8"):
        CME_TASKS[task].load(str(path))


def test_a_raw_json_file_not_ours_to_read_is_named_as_such_not_as_a_failed_write(tmp_path, capsys, monkeypatch):
    """tasks.py printed open's PermissionError as a write that failed: "... make it writable, then run it again";
    its fix then said only "fix the file.", which does not help with a file that is whole but not readable."""
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"Data": []}))
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads a file of mode 000: its open fails as a plain user's would

        def denied(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return open(file, *args, **kwargs)

        monkeypatch.setattr(files, "open", denied, raising=False)
    err = script_error(tasks.main, ["--task", "triviaqa", "--raw", path, "--out", tmp_path / "out.jsonl"], capsys)
    assert err == (f"tasks.py: error: {path} can not be read (Permission denied); pass the task's raw file as "
                   "downloaded, whole and readable by this user.")


def test_missing_files_and_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.jsonl does not exist"):
        CME_TASKS["nq"].load(str(tmp_path / "nope.jsonl"))
    (tmp_path / "aclImdb").mkdir()
    with pytest.raises(ValueError, match=r"aclImdb has no pos/ or neg/ folder; point at .*aclImdb/test"):
        CME_TASKS["imdb"].load(str(tmp_path / "aclImdb"))
    (tmp_path / "aclImdb" / "pos").mkdir()
    (tmp_path / "aclImdb" / "pos" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt is not named <id>_<rating>.txt; move it out of"):
        CME_TASKS["imdb"].load(str(tmp_path / "aclImdb"))
    os.replace(tmp_path / "aclImdb" / "pos" / "notes.txt", tmp_path / "aclImdb" / "pos" / "1_7.txt~")  # a backup
    with pytest.raises(ValueError, match=r"1_7.txt~ is not named <id>_<rating>.txt; move it out of"):
        CME_TASKS["imdb"].load(str(tmp_path / "aclImdb"))
    with pytest.raises(ValueError, match="unknown task 'squad'"):
        write_eval_set("squad", str(tmp_path), str(tmp_path / "x.json"))


def test_the_registry_holds_the_eleven_cme_tasks_with_their_metrics():
    metrics = {name: t.metric for name, t in CME_TASKS.items()}
    assert metrics == {"oai_sum": "rouge_l", "imdb": "accuracy", "anli": "accuracy", "qqp": "accuracy",
                       "rte": "accuracy", "winogrande": "accuracy", "arc": "accuracy", "mmlu": "accuracy",
                       "webqa": "exact_match", "nq": "exact_match", "triviaqa": "exact_match"}


def test_each_cme_classification_task_scores_an_answer_naming_one_label_by_its_label_set():
    """A model that answers in a sentence naming exactly one of the task's labels is scored by that label, as
    accuracy() does given the task's label set: the right one counts, another one does not."""
    word_tasks = [t for t in CME_TASKS.values() if t.metric == "accuracy" and not all(len(x) == 1 for x in t.labels)]
    assert {t.name for t in word_tasks} == {"imdb", "anli", "qqp", "rte"}
    for task in word_tasks:
        for gold in task.labels:
            for label in task.labels:
                prediction = f"Having read both, I would say {label}."
                assert task.score(prediction, {"output": gold}) == float(label == gold), (task.name, gold, label)
                assert task.score(prediction, {"output": gold}) == accuracy(prediction, gold, task.labels)


def write_anli(path, n):
    path.write_text("".join(json.dumps({"context": f"c{i}", "hypothesis": "h", "label": "e"}) + "\n"
                            for i in range(n)))
    return str(path)


@pytest.mark.parametrize("limit", [-1, 0, -30])
def test_a_limit_below_one_is_refused_and_writes_nothing(tmp_path, capsys, limit):
    raw, out = write_anli(tmp_path / "dev.jsonl", 30), str(tmp_path / "anli.jsonl")
    with pytest.raises(ValueError, match=f"limit {limit} is not a number of records to keep; give --limit N"):
        write_eval_set("anli", raw, out, limit=limit)
    assert re.match(f"^tasks.py: error: limit {limit} .*leave it out to keep every record.$", script_error(
        tasks.main, ["--task", "anli", "--raw", raw, "--out", out, "--limit", limit], capsys))
    assert os.listdir(tmp_path) == ["dev.jsonl"]
    assert write_eval_set("anli", raw, out, limit=1) == 1 and write_eval_set("anli", raw, out, overwrite=True) == 30
    assert write_eval_set("anli", raw, out, limit=100, overwrite=True) == 30 and len(open(out).readlines()) == 30


@pytest.mark.parametrize("limit", [True, 2.5, "5"])
def test_a_limit_that_is_not_an_integer_is_refused_and_writes_nothing(tmp_path, limit):
    """True is an int to Python, but not a number of records (it would keep one)."""
    raw, out = write_anli(tmp_path / "dev.jsonl", 30), str(tmp_path / "anli.jsonl")
    with pytest.raises(UserError, match=f"limit {limit!r} is not a number of records to keep"):
        write_eval_set("anli", raw, out, limit=limit)
    assert os.listdir(tmp_path) == ["dev.jsonl"]


@pytest.mark.parametrize("case", ["out is the raw file", "not UTF-8", "raw is a folder"])
def test_eval_set_input_faults_name_the_file_and_lose_nothing(tmp_path, capsys, case):
    raw = write_anli(tmp_path / "dev.jsonl", 3)
    out, named = str(tmp_path / "anli.jsonl"), raw
    if case == "out is the raw file":
        out = raw = write_anli(tmp_path / "dev.json", 3)
        named, message = raw, "is both --out and a --raw file"
    elif case == "not UTF-8":
        (tmp_path / "dev.jsonl").write_bytes(b'{"context": "caf\xe9", "hypothesis": "h", "label": "e"}\n')
        message = "is not UTF-8 text (in its first lines: "  # not "after line 0"
    else:
        named = raw = str(tmp_path)
        message = "is a folder; pass the task's raw file"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    text = script_error(tasks.main, ["--task", "anli", "--raw", raw, "--out", out], capsys)
    assert text.startswith(f"tasks.py: error: {named} {message}")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("task", ["webqa", "triviaqa", "oai_sum"])
def test_a_folder_given_as_a_json_raw_file_is_named_with_the_tasks_raw_file(tmp_path, capsys, task):
    """The tasks read as one JSON value go through read_json, which would call a folder a file to fix: _json hands it
    back to write_eval_set, which names the raw file the task needs, as it does for the JSONL tasks."""
    (tmp_path / "raw").mkdir()
    assert script_error(tasks.main, ["--task", task, "--raw", tmp_path / "raw", "--out", tmp_path / "x.jsonl"],
                        capsys) == (f"tasks.py: error: {tmp_path / 'raw'} is a folder; pass the task's raw file "
                                    f"({tasks.CME_TASKS[task].source}).")


@pytest.mark.parametrize("first", [True, False], ids=["named-first", "named-after-another"])
def test_a_raw_file_named_twice_is_refused_not_counted_twice(tmp_path, capsys, first):
    """`--raw dev.jsonl ./dev.jsonl` (or a glob that matches a file also named) would hold every record twice; the
    sentence names the file given twice, not merely the first --raw file, wherever it comes."""
    raw, out = write_anli(tmp_path / "dev.jsonl", 3), str(tmp_path / "anli.jsonl")
    other = write_anli(tmp_path / "dev2.jsonl", 2)
    again = os.path.join(os.path.dirname(raw), ".", os.path.basename(raw))
    files = [raw, other, again] if first else [other, raw, again]
    assert script_error(tasks.main, ["--task", "anli", "--raw", *files, "--out", out], capsys) == (
        f"tasks.py: error: --raw names {raw} more than once; give each raw file once.")
    assert not os.path.exists(out) and write_eval_set("anli", [raw, other], out) == 5


def test_a_raw_file_named_twice_by_relative_paths_is_named_as_given(tmp_path, capsys, monkeypatch):
    """The sentence names the path as the user typed it (here relative, so unlike its real path), not crashes on it."""
    monkeypatch.chdir(tmp_path)
    write_anli(tmp_path / "dev.jsonl", 3)
    assert script_error(tasks.main, ["--task", "anli", "--raw", "dev.jsonl", "./dev.jsonl", "--out", "anli.jsonl"],
                        capsys) == "tasks.py: error: --raw names dev.jsonl more than once; give each raw file once."
    assert not os.path.exists("anli.jsonl")


def test_a_full_disk_is_one_sentence_naming_the_out_file_and_the_old_one_stays(tmp_path, capsys, monkeypatch):
    """A write that fails on a full disk names the --out it was writing (not its temporary name) and what to do,
    in one line, and the file that was there is kept whole."""
    raw = tmp_path / "x_test.csv"
    raw.write_text('"q?",a,b,c,d,A\n')
    out = tmp_path / "mmlu.jsonl"
    out.write_text("the set before\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    assert script_error(tasks.main, ["--task", "mmlu", "--raw", raw, "--out", out, "--overwrite"], capsys) == (
        f"tasks.py: error: No space left on device ({out}); what was there before is kept: free space there or make "
        "it writable, then run it again")
    assert out.read_text() == "the set before\n" and sorted(os.listdir(tmp_path)) == ["mmlu.jsonl", "x_test.csv"]


def test_an_existing_out_is_replaced_only_with_overwrite(tmp_path, capsys):
    raw, out = write_anli(tmp_path / "dev.jsonl", 3), tmp_path / "anli.jsonl"
    out.write_text("my hand-made evaluation set\n")
    assert script_error(tasks.main, ["--task", "anli", "--raw", raw, "--out", out], capsys) == (
        f"tasks.py: error: --out {out} exists; pass --overwrite to replace it, or choose another --out.")
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        write_eval_set("anli", raw, out)  # the function too: overwriting is asked for, never the default
    assert out.read_text() == "my hand-made evaluation set\n"  # the user's file is kept, and nothing is left beside it
    assert sorted(os.listdir(tmp_path)) == ["anli.jsonl", "dev.jsonl"]
    tasks.main(["--task", "anli", "--raw", raw, "--out", str(out), "--overwrite"])
    assert len(out.read_text().splitlines()) == 3 and sorted(os.listdir(tmp_path)) == ["anli.jsonl", "dev.jsonl"]


@pytest.mark.parametrize("case", ["empty raw file", "out is a folder", "parent is a file", "parent is a dead link",
                                  "parent is read-only"])
def test_an_eval_set_with_no_records_or_nowhere_to_go_is_one_sentence_and_writes_nothing(tmp_path, capsys, read_only,
                                                                                         monkeypatch, case):
    raw, out = write_anli(tmp_path / "dev.jsonl", 3), str(tmp_path / "eval" / "anli.jsonl")
    (tmp_path / "eval").mkdir()
    if case == "empty raw file":
        raw, message = write_anli(tmp_path / "empty.jsonl", 0), f"no records in {tmp_path / 'empty.jsonl'}; check"
    elif case == "out is a folder":
        os.mkdir(out)
        message = f"--out {out} is a folder; give the file to write, e.g. {out}/anli.jsonl."
    elif case == "parent is a file":
        (tmp_path / "notes").write_text("keep me")
        out = str(tmp_path / "notes" / "sub" / "anli.jsonl")
        message = f"--out {out} can not be written: {tmp_path / 'notes'} is a file, not a folder; choose another"
    elif case == "parent is a dead link":
        os.symlink(tmp_path / "gone", tmp_path / "link")
        out = str(tmp_path / "link" / "anli.jsonl")
        message = f"--out {out} can not be written: {tmp_path / 'link'} is a link to nothing, not a folder"
    else:  # found before the raw files are read, not at the write after them
        read_only(tmp_path / "eval")
        monkeypatch.setattr(tasks.CME_TASKS["anli"], "load", lambda p: pytest.fail("read before the refusal"))
        message = f"--out {out} can not be written: {tmp_path / 'eval'} is not writable (Permission denied); choose"
    before = {str(p): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    text = script_error(tasks.main, ["--task", "anli", "--raw", raw, "--out", out, "--overwrite"], capsys)
    assert text.startswith(f"tasks.py: error: {message}")
    assert {str(p): p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before


CME_SAMPLES = {  # task -> its fixture files with labels (test splits without answers left out)
    "anli": [f"anli/R{k}/{s}.jsonl" for k in (1, 2, 3) for s in ("dev", "test")],
    "rte": ["rte/dev.tsv"], "qqp": ["qqp/dev.tsv", "qqp/train.tsv"],
    "winogrande": ["winogrande/dev.jsonl", "winogrande/train_xl.jsonl"], "arc": ["arc/ARC-Challenge-Dev.jsonl"],
    "mmlu": ["mmlu/professional_law_test.csv", "mmlu/abstract_algebra_dev.csv"],
    "webqa": ["webquestions/webquestions.examples.test.json"], "nq": ["nq_open/NQ-open.dev.jsonl"],
    "triviaqa": ["triviaqa/triviaqa_sample.json"], "oai_sum": ["tldr/README_comparisons_example.json"],
    "imdb": ["imdb/aclImdb/test", "imdb/fastnlp_tsv/dev.txt"],
}
KIND_OF = {"anli": "nli", "rte": "rte", "qqp": "paraphrase", "winogrande": "blank", "arc": "choice", "mmlu": "choice",
           "oai_sum": "summary", "imdb": "sentiment"}


def _samples(name, folder):
    """The records of a task's fixture files; TL;DR's example row taken as one of the valid2 split, as its own split,
    train, is left out."""
    if name == "oai_sum":
        return CME_TASKS[name].load(_tldr_example(folder)[0])
    return [r for p in CME_SAMPLES[name] for r in CME_TASKS[name].load(os.path.join(CME_DIR, p))]


@needs_cme_fixtures
def test_each_task_takes_its_kinds_first_phrasing_and_its_label_set_covers_what_its_loader_writes(tmp_path):
    assert set(CME_SAMPLES) == set(CME_TASKS)
    for name, task in CME_TASKS.items():
        records = _samples(name, tmp_path)
        assert records and all(r["output"] for r in records), name
        if name in KIND_OF:
            assert {r["instruction"] for r in records} == {TEMPLATES[KIND_OF[name]][0][0]}, name
        if task.labels is None:
            continue
        for gold in {r["output"] for r in records}:
            assert gold in task.labels, (name, gold)
            # a longer answer naming the gold label, and it alone, is right: the label set holds every label
            if len(gold) > 1:
                assert accuracy(f"The relationship is {gold}.", gold, task.labels) == 1.0, (name, gold)
                for other in set(task.labels) - {gold}:
                    assert accuracy(f"The answer is {other}.", gold, task.labels) == 0.0, (name, gold, other)


@needs_cme_fixtures
def test_each_task_generates_enough_tokens_for_every_reference_answer_of_its_samples(tmp_path):
    tok = Tokenizer(LLAMA2)
    for name, task in CME_TASKS.items():
        for r in _samples(name, tmp_path):
            for answer in r.get("answers") or [r["output"]]:
                assert len(tok.encode(answer)) + 1 <= task.max_new_tokens, (name, answer)  # + EOS


# -----------------------------------------------------------------------------------------------
# tokenizer files that would crash inside sentencepiece / tiktoken / tokenizers: refused when loaded

@pytest.mark.parametrize("bos, eos, message", [(-1, 2, "bos_id=-1"), (1, -1, "eos_id=-1"),
                                               (-1, -1, "bos_id=-1 and eos_id=-1")])
def test_a_sentencepiece_model_without_bos_or_eos_is_refused_naming_which(tmp_path, bos, eos, message):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 99)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "t"), vocab_size=40,
                                   hard_vocab_limit=False, unk_id=0, bos_id=bos, eos_id=eos, minloglevel=2)
    with pytest.raises(UserError, match=f"t.model is a SentencePiece model trained with {message}; the records need "
                                        "a BOS and an EOS token, so pass a tokenizer.model that has both"):
        Tokenizer(tmp_path / "t.model")


def test_a_sentencepiece_model_whose_bos_is_id_0_is_read_with_that_bos(tmp_path):
    """Only an id of -1 means "none": a model trained with bos_id=0 (its unknown piece numbered elsewhere) has a BOS,
    which every record starts with."""
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 99)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "t"), vocab_size=40,
                                   hard_vocab_limit=False, unk_id=2, bos_id=0, eos_id=1, minloglevel=2)
    tok = Tokenizer(tmp_path / "t.model")
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.encode("the fox", bos=True, eos=True) == [0, *spm.SentencePieceProcessor(
        model_file=str(tmp_path / "t.model")).encode("the fox"), 1]


def test_a_tokenizer_file_that_cannot_be_read_names_the_systems_reason_and_the_fix(tmp_path, monkeypatch):
    """Root reads any file, so the refusal is played by the first read: its reason as the system words it, once,
    not Python's '[Errno 13] ...: path' with the path said a second time."""
    import tokenizer
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x0a")

    def refuse(name):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
    monkeypatch.setattr(tokenizer, "_looks_like_tiktoken", refuse)
    with pytest.raises(UserError, match=rf"^tokenizer file {re.escape(str(path))} cannot be read "
                                        rf"\({os.strerror(errno.EACCES)}\); check its permissions$"):
        Tokenizer(path)


BYTES = [bytes([b]) for b in range(256)]


@pytest.mark.parametrize("tokens, message", [  # (token, rank) lines; tiktoken panicked on each, past except Exception
    ([(b"hello", 0)], "it has no token for the byte 0x00, and tiktoken needs all 256"),
    ([(t, r) for r, t in enumerate(BYTES) if t != b"h"] + [(b"h", 300)], "its ranks are not 0, 1, 2, ... each once"),
    ([(t, r) for r, t in enumerate(BYTES)] + [(b"he", 7)], "its ranks are not 0, 1, 2, ... each once"),
    ([(t, r) for r, t in enumerate(BYTES)] + [(b"he", -1)], "its ranks are not 0, 1, 2, ... each once"),
    ([(t, r) for r, t in enumerate(BYTES[:104] + BYTES[105:] + [b"he"])], "no token for the byte 0x68"),
    ([(t, r) for r, t in enumerate(BYTES[:255] + [b"he"])], "no token for the byte 0xff"),
], ids=["one token", "a gap", "a rank twice", "a negative rank", "a byte missing", "the last byte missing"])
def test_a_damaged_tiktoken_file_is_refused_when_loaded(tmp_path, tokens, message):
    pytest.importorskip("tiktoken")
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in tokens))
    with pytest.raises(UserError, match=f"tokenizer.model is a damaged tiktoken BPE file: .*{re.escape(message)}.*; "
                                        "pass the checkpoint's unmodified tokenizer.model$"):  # and the fix
        Tokenizer(tmp_path / "tokenizer.model")


@pytest.mark.parametrize("config, shown", [
    ({"eos_token": 5}, "eos_token 5"), ({"eos_token": {"content": 5}}, "eos_token 5"),
    ({"bos_token": ["<s>"], "eos_token": "<|endoftext|>"}, 'bos_token \\["<s>"\\]'),
    ({"eos_token": "<|endoftext|>", "pad_token": True}, "pad_token true")])
def test_a_tokenizer_config_token_that_is_not_a_string_is_refused(tmp_path, config, shown):
    folder = hf_tokenizer_folder(tmp_path / "t")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"tokenizer_config.json gives the {shown}, not a token string; put the"):
        Tokenizer(folder)


def test_nq_loader_takes_an_answer_given_as_one_string(tmp_path):
    rows = [{"question": "capital of france", "answer": "Paris"}, {"question": "two", "answer": ["a b", "c"]}]
    (tmp_path / "nq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = CME_TASKS["nq"].load(str(tmp_path / "nq.jsonl"))
    assert [(r["output"], r["answers"]) for r in records] == [("Paris", ["Paris"]), ("a b", ["a b", "c"])]


def test_qa_answers_leave_out_missing_aliases_so_the_output_is_a_real_answer(tmp_path):
    """A TriviaQA answer may lack a field (no NormalizedValue, an empty alias): the output is the first alias
    that exists, and a question without any answer loads unlabelled (output None, no answers)."""
    assert qa_record("q", [None, "", "Paris", "paris", "Paris"]) == {"instruction": "q", "input": "",
                                                                    "output": "Paris", "answers": ["Paris", "paris"]}
    # an alias without a letter or digit would let an empty answer score right: left out, unless every one is blank
    # (then write_eval_set names the record and leaves it out)
    assert qa_record("q", ["?!", "Paris", "—"])["answers"] == ["Paris"] and qa_record("q", ["—"])["answers"] == ["—"]
    rows = [{"Question": "q1", "Answer": {"Value": "Rome", "Aliases": ["", "Roma"], "NormalizedAliases": None}},
            {"Question": "q2", "Answer": {"NormalizedValue": "", "Value": "Oslo"}}, {"Question": "q3"}]
    (tmp_path / "t.json").write_text(json.dumps({"Data": rows}))
    records = CME_TASKS["triviaqa"].load(str(tmp_path / "t.json"))
    assert [(r["output"], r["answers"]) for r in records] == [("Rome", ["Rome", "Roma"]), ("Oslo", ["Oslo"]),
                                                              (None, [])]


def test_a_glue_tsv_may_end_in_blank_lines_and_leave_label_cells_empty(tmp_path):
    """Exports of test splits keep the label column with empty cells, and files often end in a blank line:
    an empty cell is no label (output None, refused by write_eval_set), not a malformed file."""
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    (tmp_path / "dev.tsv").write_text(header + "1\t1\t2\ta?\tb?\t1\n2\t3\t4\tc?\td?\t\n\n")
    records = CME_TASKS["qqp"].load(str(tmp_path / "dev.tsv"))
    assert [(r["input"], r["output"]) for r in records] == [("Text 1: a?\nText 2: b?", "duplicate"),
                                                            ("Text 1: c?\nText 2: d?", None)]
    (tmp_path / "dev.jsonl").write_text(json.dumps({"context": "c", "hypothesis": "h", "label": ""}) + "\n")
    assert [r["output"] for r in CME_TASKS["anli"].load(str(tmp_path / "dev.jsonl"))] == [None]
    with pytest.raises(ValueError, match="1 of 2 records .* have no label"):
        write_eval_set("qqp", str(tmp_path / "dev.tsv"), str(tmp_path / "qqp.jsonl"))


def test_an_evaluation_folder_is_checked_when_loaded_not_when_scored_after_training(tmp_path):
    """train.py loads eval_dir before step 1: a file named after no task, or a record without a reference output,
    stops the run there, with the file named, instead of after hours of training."""
    import evaluation
    cfg = {"eval_dir": str(tmp_path), "eval_limit": 0}
    good = make_record("rte", "entailment", premise="a", hypothesis="b")
    (tmp_path / "rte.jsonl").write_text(json.dumps(good) + "\n")
    assert evaluation.load_eval_sets(cfg) == {"rte": (CME_TASKS["rte"], [good])}
    (tmp_path / "squad.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(UserError, match="no task named 'squad' \\(from the file name squad.jsonl\\)"):
        evaluation.load_eval_sets(cfg)
    os.remove(tmp_path / "squad.jsonl")
    (tmp_path / "rte.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(dict(good, output=None)) + "\n")
    with pytest.raises(UserError, match="rte.jsonl line 2 is not an evaluation record"):
        evaluation.load_eval_sets(cfg)


BOM_SAMPLES = [  # task, file name, content: a loader of each file reader (JSON lines, JSON, TSV, CSV)
    ("anli", "dev.jsonl", '{"context": "c", "hypothesis": "h", "label": "e"}\n'),
    ("triviaqa", "t.json", json.dumps({"Data": [{"Question": "q", "Answer": {"Value": "v"}}]})),
    ("webqa", "w.json", json.dumps([{"utterance": "q", "targetValue": "(list (description v))"}])),
    ("imdb", "train.txt", "pos\tgreat film\n"),
    ("qqp", "dev.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t1\t2\ta?\tb?\t0\n"),
    ("mmlu", "x_test.csv", "q,a,b,c,d,B\n"),
]


@pytest.mark.parametrize("task, name, content", BOM_SAMPLES, ids=[t for t, _, _ in BOM_SAMPLES])
def test_every_loader_reads_a_file_with_a_utf8_byte_order_mark_as_one_without(tmp_path, task, name, content):
    """Windows editors save UTF-8 with a byte-order mark: it is no part of the first record (or of the label)."""
    for folder, text in (("plain", content), ("bom", "\ufeff" + content)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_bytes(text.encode("utf-8"))
    plain = CME_TASKS[task].load(str(tmp_path / "plain" / name))
    assert plain and CME_TASKS[task].load(str(tmp_path / "bom" / name)) == plain


@pytest.mark.parametrize("prediction", ["A4 paper", "B2", "C3PO is the answer", "(A1)"])
def test_a_letter_with_a_digit_after_it_is_a_word_not_an_option(prediction):
    assert accuracy(prediction, prediction.strip("(")[0]) == 0.0


def test_the_rouge_l_chance_of_a_record_without_input_is_its_instructions_first_sentence():
    task = Task("sum", "rouge_l", 16)
    records = [{"instruction": "The cat sat on the mat. Then it slept all day.", "input": "", "output": "the cat sat"},
               {"instruction": "Summarize:", "input": "A dog ran. It was fast.", "output": "a dog ran fast"}]
    want = (rouge_l("The cat sat on the mat.", "the cat sat") + rouge_l("A dog ran.", "a dog ran fast")) / 2
    assert chance_level(task, records) == pytest.approx(100 * want) and want > 0.5


@pytest.mark.parametrize("task, prediction, meant", [
    ("anli", "not entailment", None), ("anli", "It is not a contradiction.", None), ("imdb", "not positive", None),
    ("imdb", "It isn't negative", None), ("qqp", "not a duplicate", "not duplicate"),
    ("rte", "non-entailment", "not entailment"), ("rte", "It is not an entailment.", "not entailment"),
    ("qqp", "No, not duplicate.", "not duplicate"), ("qqp", "These are not duplicate questions.", "not duplicate"),
    ("rte", "no entailment", "not entailment"), ("qqp", "It is never a duplicate.", "not duplicate")])
def test_a_negated_label_is_read_as_its_negation_not_as_the_label(task, prediction, meant):
    """ "not a duplicate" means "not duplicate", and "not positive" no label at all: read as the label it negates,
    it scored the opposite answer right."""
    for gold in CME_TASKS[task].labels:
        assert CME_TASKS[task].score(prediction, {"output": gold}) == float(gold == meant), (prediction, gold)


@pytest.mark.parametrize("task, prediction", [
    ("rte", "not entailment, entailment"), ("rte", "Not_entailment / Entailment"), ("qqp", "not duplicate, duplicate"),
    ("qqp", "Not duplicate / Duplicate."), ("rte", "no entailment; entailment")])
def test_a_negated_label_followed_by_the_label_names_both(task, prediction):
    """The "not" of the first label is no negation of the second: "not entailment, entailment" named only "not
    entailment" and scored right on it."""
    for gold in CME_TASKS[task].labels:
        assert CME_TASKS[task].score(prediction, {"output": gold}) == 0.0, (prediction, gold)


@pytest.mark.parametrize("task, prediction, meant", [
    ("imdb", "No, it is positive.", "positive"), ("anli", "Not sure, I think it is neutral", "neutral")])
def test_a_negation_more_than_two_words_before_a_label_leaves_the_label_named(task, prediction, meant):
    """Only the two words before a label can negate it: "No, it is positive." answers "positive"."""
    for gold in CME_TASKS[task].labels:
        assert CME_TASKS[task].score(prediction, {"output": gold}) == float(gold == meant), (prediction, gold)


def test_an_eval_set_limit_keeps_a_fair_sample_not_the_first_label_or_raw_file(tmp_path):
    """aclImdb lists every positive review before the negative ones, and MMLU's files one subject after another: a
    prefix of the raw order (--limit, or train.py's eval_limit on the written set) held one label or one subject."""
    for label, ids in (("pos", range(50)), ("neg", range(50))):
        (tmp_path / "test" / label).mkdir(parents=True)
        for i in ids:
            (tmp_path / "test" / label / f"{i}_{9 if label == 'pos' else 2}.txt").write_text(f"{label} review {i}")
    assert write_eval_set("imdb", str(tmp_path / "test"), str(tmp_path / "imdb.jsonl"), limit=20) == 20
    kept = [json.loads(line)["output"] for line in (tmp_path / "imdb.jsonl").read_text().splitlines()]
    assert 5 <= kept.count("negative") <= 15
    subjects = []
    for s in range(4):
        subjects.append(str(tmp_path / f"s{s}_test.csv"))
        (tmp_path / f"s{s}_test.csv").write_text("".join(f"subject {s} q{i}?,a,b,c,d,A\n" for i in range(30)))
    write_eval_set("mmlu", subjects, str(tmp_path / "mmlu.jsonl"))
    first = [json.loads(line)["input"].split()[2] for line in (tmp_path / "mmlu.jsonl").read_text().splitlines()[:20]]
    assert len(set(first)) == 4  # the whole set is every record, in an order whose prefixes mix the subjects
    write_eval_set("mmlu", subjects, str(tmp_path / "again.jsonl"))
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "mmlu.jsonl").read_bytes()  # the same order each time


def test_tldr_comparisons_without_a_post_id_are_each_kept(tmp_path):
    rows = [{"info": {"post": f"Post {k}."}, "summaries": [{"text": f" ref {k}", "policy": "ref"}]} for k in "ab"]
    (tmp_path / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = CME_TASKS["oai_sum"].load(str(tmp_path / "comparisons.jsonl"))
    assert [(r["input"], r["output"]) for r in records] == [("Post a.", "ref a"), ("Post b.", "ref b")]


@needs_cme_fixtures
def test_tldr_comparisons_batch_files_hold_json_lines_under_a_json_name(tmp_path):
    """summarize-from-feedback's comparisons/batch*.json are JSON lines (its README: "jsonl files, where each line
    represents a single comparison"), not one JSON value: they load as the same rows written as a .jsonl file."""
    row = _tldr_example(tmp_path)[1]
    rows = [row, dict(row, info=dict(row["info"], id="t3_other", post="Another post."))]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "batch9.json").write_text(text)
    (tmp_path / "batch9.jsonl").write_text(text)
    records = CME_TASKS["oai_sum"].load(str(tmp_path / "batch9.json"))
    assert records == CME_TASKS["oai_sum"].load(str(tmp_path / "batch9.jsonl"))
    assert [r["input"] for r in records] == [row["info"]["post"], "Another post."]
    assert write_eval_set("oai_sum", str(tmp_path / "batch9.json"), str(tmp_path / "oai_sum.jsonl")) == 2
    (tmp_path / "broken.json").write_text(json.dumps(row) + "\n{oops\n")  # a broken line is still named
    with pytest.raises(UserError, match=r"broken.json line 2 is not valid JSON"):
        CME_TASKS["oai_sum"].load(str(tmp_path / "broken.json"))


def test_superglue_rte_jsonl_loads_as_the_glue_tsv_of_the_same_rows(tmp_path):
    """RTE is public as GLUE's TSV and as SuperGLUE's RTE/{train,val,test}.jsonl (premise, hypothesis, label
    entailment/not_entailment, idx; no label in test): both give the same records."""
    rows = [("No weapons were found.", "Weapons were found.", "not_entailment"), ("A cat sat.", "A cat", "entailment")]
    (tmp_path / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n"
                                      + "".join(f"{i}\t{p}\t{h}\t{lab}\n" for i, (p, h, lab) in enumerate(rows)))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"premise": p, "hypothesis": h, "label": lab, "idx": i})
                                                + "\n" for i, (p, h, lab) in enumerate(rows)))
    glue = CME_TASKS["rte"].load(str(tmp_path / "dev.tsv"))
    assert CME_TASKS["rte"].load(str(tmp_path / "val.jsonl")) == glue
    assert [r["output"] for r in glue] == ["not entailment", "entailment"]
    (tmp_path / "test.jsonl").write_text(json.dumps({"premise": "p", "hypothesis": "h", "idx": 0}) + "\n")
    assert [r["output"] for r in CME_TASKS["rte"].load(str(tmp_path / "test.jsonl"))] == [None]
    (tmp_path / "anli.jsonl").write_text(json.dumps({"context": "c", "hypothesis": "h", "label": "e"}) + "\n")
    with pytest.raises(UserError, match=r"anli.jsonl line 1 has the label 'e'; expected"):  # another task's
        CME_TASKS["rte"].load(str(tmp_path / "anli.jsonl"))


def test_an_mmlu_csv_with_windows_line_ends_or_a_blank_last_line_loads_as_the_plain_file(tmp_path):
    """A CRLF copy of a subject file keeps CRLF inside its quoted multi-line questions, and a file may end in a blank
    line, as the other loaders' files may: both load as the LF file does, not with a "\\r" in the prompt or refused."""
    rows = ['"This question refers to the following information.\nA passage, ""quoted"".\nWhat is it?",a,b,c,d,B',
            "q2?,a,b,c,d,A"]
    (tmp_path / "lf_test.csv").write_bytes(("\n".join(rows) + "\n").encode())
    (tmp_path / "crlf_test.csv").write_bytes(("\r\n".join(r.replace("\n", "\r\n") for r in rows) + "\r\n").encode())
    (tmp_path / "blank_test.csv").write_bytes(("\n".join(rows) + "\n\n").encode())
    plain = CME_TASKS["mmlu"].load(str(tmp_path / "lf_test.csv"))
    assert len(plain) == 2 and plain[0]["input"].startswith("Question: This question refers to the following "
                                                            'information.\nA passage, "quoted".\nWhat is it?\n')
    assert CME_TASKS["mmlu"].load(str(tmp_path / "crlf_test.csv")) == plain
    assert CME_TASKS["mmlu"].load(str(tmp_path / "blank_test.csv")) == plain


def test_a_link_at_out_even_one_to_nothing_is_replaced_only_with_overwrite(tmp_path):
    """The name --out is taken by a link (one whose target is gone or not yet made, too): it is the user's, and is
    kept unless --overwrite asks to replace it."""
    raw, out = write_anli(tmp_path / "dev.jsonl", 3), tmp_path / "anli.jsonl"
    os.symlink(tmp_path / "elsewhere" / "anli.jsonl", out)
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        write_eval_set("anli", raw, out)
    assert os.path.islink(out) and os.readlink(out) == str(tmp_path / "elsewhere" / "anli.jsonl")
    assert write_eval_set("anli", raw, out, overwrite=True) == 3 and len(out.read_text().splitlines()) == 3


def test_a_tldr_json_list_broken_midway_is_named_at_the_line_it_breaks_not_read_as_json_lines(tmp_path):
    """Only a second value after a first ("Extra data") makes a .json file JSON lines: a JSON list with an error in it
    is named at that error's line, as json.load finds it."""
    rows = [{"id": f"t3_{i}", "post": f"Post {i}.", "summary": f" sum {i}"} for i in range(3)]
    text = json.dumps(rows, indent=1)
    broken = text.replace('"post": "Post 2."', '"post" "Post 2."')
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads(broken)
    (tmp_path / "tldr.json").write_text(broken)
    with pytest.raises(UserError, match=rf"tldr.json line {e.value.lineno} is not valid JSON \(Expecting ':'"):
        CME_TASKS["oai_sum"].load(str(tmp_path / "tldr.json"))
    (tmp_path / "tldr.json").write_text(text)
    assert [r["output"] for r in CME_TASKS["oai_sum"].load(str(tmp_path / "tldr.json"))] == ["sum 0", "sum 1", "sum 2"]


def test_a_raw_file_that_does_not_exist_is_one_sentence_without_advice_on_a_full_disk(tmp_path, capsys):
    raw = tmp_path / "nope.jsonl"
    assert script_error(tasks.main, ["--task", "anli", "--raw", raw, "--out", tmp_path / "a.jsonl"], capsys) == (
        f"tasks.py: error: {raw} does not exist; check the path to the task's raw file.")
    assert not (tmp_path / "a.jsonl").exists()


def test_an_empty_raw_is_named_as_empty_and_overwrite_is_also_given_as_train_py_gives_a_switch(tmp_path, capsys):
    """--raw= was "error:  does not exist", a blank where the path goes; --overwrite=True, as train.py takes a switch,
    was argparse's "ignored explicit argument"."""
    raw, out = tmp_path / "r1.jsonl", tmp_path / "a.jsonl"
    raw.write_text(json.dumps({"context": "p", "hypothesis": "h", "label": "e"}) + "\n")
    for empty in ("--raw=", "--raw= "):
        assert script_error(tasks.main, ["--task", "anli", empty, "--out", out], capsys) == (
            "tasks.py: error: a --raw path is empty; give the task's raw file, e.g. --raw dev.jsonl.")
    assert not out.exists()
    for overwrite in ("--overwrite=False", "--overwrite=True"):
        out.write_text("kept")
        argv = ["--task", "anli", "--raw", str(raw), "--out", str(out), overwrite]
        if overwrite.endswith("False"):
            assert script_error(tasks.main, argv, capsys).endswith("exists; pass --overwrite to replace it, or "
                                                                   "choose another --out.")
            assert out.read_text() == "kept"
        else:
            tasks.main(argv)
            assert capsys.readouterr().out == f"wrote 1 anli records to {out}\n" and out.read_text() != "kept"


@pytest.mark.parametrize("out, message", [("", "--out is empty; give the file to write, e.g. --out "
                                                 "data/cme_eval/anli.jsonl."),
                                          (" ", "--out is empty; give the file to write, e.g. --out "
                                                "data/cme_eval/anli.jsonl."),
                                          ("sets", "--out {tmp}/sets is a folder; give the file to write, e.g. "
                                                   "{tmp}/sets/anli.jsonl.")])
def test_an_empty_out_or_a_folder_is_named_for_what_it_is_not_for_its_ending(tmp_path, capsys, out, message):
    (tmp_path / "sets").mkdir()
    raw = tmp_path / "r1.jsonl"
    raw.write_text(json.dumps({"premise": "p", "hypothesis": "h", "label": "e"}) + "\n")
    target = str(tmp_path / out) if out.strip() else out
    assert script_error(tasks.main, ["--task", "anli", "--raw", raw, "--out", target], capsys) == \
        "tasks.py: error: " + message.format(tmp=tmp_path)
    assert os.listdir(tmp_path / "sets") == []


BLANK_REFERENCES = [  # task, record: a reference its metric reads as nothing
    ("qa", {"output": ""}), ("qa", {"output": "  \t"}), ("qa", {"output": "Paris", "answers": ["", "¿?"]}),
    ("qa", {"output": "Paris", "answers": ["Paris", "¿?"]}),  # one blank alias: an empty answer matches it
    ("nli", {"output": ""}), ("nli", {"output": " ... "}), ("sentiment", {"output": "\n"}),
    ("summary", {"output": ""}), ("summary", {"output": "  "}), ("summary", {"output": "这部电影很好看。"}),
]


@pytest.mark.parametrize("name, reference", BLANK_REFERENCES)
def test_an_evaluation_record_whose_reference_its_metric_reads_as_nothing_is_refused_naming_its_line(
        tmp_path, name, reference):
    """An empty or blank reference (for ROUGE-L, one without an a-z or 0-9 word, all that it reads) made every answer
    score alike: an empty answer 100 by exact match and accuracy (the chance column too, for accuracy), any answer 0
    by ROUGE-L; the table showed that score without a word. Loading the set now refuses it, naming file and line."""
    import evaluation
    task = evaluation.task_of(name)
    record = {"instruction": "q", "input": "", **reference}
    alike = ([""], 100.0) if task.metric != "rouge_l" else (["this film is good", ""], 0.0)
    assert all(evaluate(task, [answer], [record]) == alike[1] for answer in alike[0])  # what the table would show
    good = {"instruction": "q", "input": "", "output": {"qa": "Paris", "summary": "a fine film"}.get(name) or
            task.labels[0]}  # a label of the task: the label check refuses "neutral" for sentiment
    (tmp_path / f"{name}.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError) as refused:
        evaluation.load_eval_sets({"eval_dir": str(tmp_path), "eval_limit": 0})
    assert str(refused.value).startswith(f"{tmp_path / name}.jsonl line 2 can not be scored as {name}: ")
    assert str(refused.value).endswith(f"give it a reference that {task.metric} reads, or remove the record.")


def test_references_a_metric_can_read_are_loaded_however_short_or_foreign_and_refused_once_blanked():
    """The refusal above is for a reference read as nothing only: an option letter, one label word, a Chinese QA
    answer, an article alone (SQuAD's normalisation drops it, but it is no blank record), one ASCII word in a summary
    all load; blanked, each is refused."""
    import evaluation
    for name, reference in [("choice", {"output": "b"}), ("nli", {"output": "Neutral."}), ("qa", {"output": "曹操"}),
                            ("qa", {"output": "The The", "answers": ["The The", "The The (band)"]}),
                            ("summary", {"output": "电影 ok"}), ("qa", {"output": "", "answers": ["1984"]}),
                            ("qa", {"output": "a"}), ("summary", {"output": "NASA LAUNCHES ROVER"})]:
        task, record = evaluation.task_of(name), {"instruction": "q", "input": "", **reference}
        assert evaluation.check_eval_record(record, "r.jsonl line 1", task) is record, reference
        blanked = {**record, "output": " ", "answers": [" "] * len(record.get("answers", []))}
        with pytest.raises(UserError, match="r.jsonl line 1 can not be scored"):
            evaluation.check_eval_record(blanked, "r.jsonl line 1", task)


STRAY_LABELS = [  # task, a reference that is none of its labels: a typo, a label it lacks, a raw file's own spelling
    ("anli", "entailmnet"), ("anli", "maybe"), ("nli", "not entailment"), ("rte", "neutral"), ("qqp", "1"),
    ("imdb", "yes"), ("sentiment", "Positive review"), ("paraphrase", "duplicates"), ("mmlu", "E"), ("choice", "Q"),
    ("blank", "C"), ("winogrande", "option1"), ("arc", "(B)"), ("nli", "A"),
]


@pytest.mark.parametrize("name, reference", STRAY_LABELS)
def test_a_reference_that_is_none_of_its_tasks_labels_is_refused_when_loaded_naming_line_and_labels(
        tmp_path, name, reference):
    """An accuracy task's reference outside its label set (a typo as "entailmnet", a raw file's "1") was scored without
    a word: the answer that names the label meant scored wrong, and the chance level counted the typo as a label of its
    own. Loading the set now refuses it before any training or scoring, naming file, line, reference and labels."""
    task = evaluation.task_of(name)
    meant = task.labels[0]
    assert evaluate(task, [meant], [{"output": reference}]) == 0.0  # what the table would have shown
    good = {"instruction": "q", "input": "", "output": meant}
    (tmp_path / f"{name}.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(dict(good, output=reference)) + "\n")
    with pytest.raises(UserError) as refused:
        evaluation.load_eval_sets({"eval_dir": str(tmp_path), "eval_limit": 0})
    labels = ", ".join(task.labels)
    assert str(refused.value) == (f"{tmp_path / name}.jsonl line 2 can not be scored as {name}: its reference "
                                  f"{reference!r} is none of {name}'s labels ({labels}); write the label meant, one "
                                  'of those, as its "output", or remove the record.')


def test_every_spelling_of_a_label_that_accuracy_reads_as_it_loads_and_counts_as_that_label():
    """The label check refuses only what accuracy reads as no label: any case, punctuation and underscores around a
    label word ("Not_entailment." is "not entailment"), a lower-case or spaced option letter (" b" is "B"), and every
    letter ARC's prompt can show (load_arc writes up to H) load; chance_level counts each as the label it spells."""
    spellings = {"anli": ["Entailment.", "NEUTRAL", " contradiction\n"], "rte": ["Not_entailment.", "not entailment"],
                 "qqp": ["Not duplicate", "duplicate!"], "imdb": ["Positive", "negative."], "mmlu": ["d", " A "],
                 "winogrande": ["b"], "arc": list("ABCDEFGH") + ["h"], "blank": ["a", "B"], "choice": ["c", "D"],
                 "nli": ["neutral."], "paraphrase": ["Duplicate"], "sentiment": ["POSITIVE"]}
    for name, outputs in spellings.items():
        task = evaluation.task_of(name)
        for output in outputs:
            record = {"instruction": "q", "input": "", "output": output}
            assert evaluation.check_eval_record(record, "r.jsonl line 1", task) is record, (name, output)
            meant = [label for label in task.labels if accuracy(label, output, task.labels) == 1.0]
            assert len(meant) == 1, (name, output)  # one label answers it right: the label it spells
            assert chance_level(task, [record, {"output": meant[0]}]) == 100.0, (name, output)
    assert evaluation.check_eval_record({"instruction": "q", "output": "Paris"}, "qa.jsonl line 1",
                                        evaluation.task_of("qa")) is not None  # exact match has no label set


@needs_cme_fixtures
def test_the_evaluation_sets_tasks_py_and_minicme_write_load_without_a_record_refused(tmp_path, capsys):
    """Every labelled public sample of each CME task, written by tasks.py, and the synthetic suite's sets load whole:
    the label check refuses nothing that the project's own writers produce."""
    raw = {**CME_SAMPLES, "oai_sum": [_tldr_example(tmp_path)[0]],
           "arc": ["arc/ARC-Challenge-Dev.jsonl", "arc/ARC-Challenge-Train.jsonl"],
           "mmlu": [f"mmlu/{s}_{split}.csv" for s in ("abstract_algebra", "high_school_geography", "professional_law")
                    for split in ("dev", "test")]}
    written = {name: write_eval_set(name, [os.path.join(CME_DIR, p) for p in paths], str(tmp_path / "cme" /
                                    f"{name}.jsonl")) for name, paths in raw.items()}
    assert "left out" not in capsys.readouterr().out
    loaded = evaluation.load_eval_sets({"eval_dir": str(tmp_path / "cme"), "eval_limit": 0})
    assert {name: len(records) for name, (_, records) in loaded.items()} == written
    minicme.make_suite(str(tmp_path / "suite"), seed=0, n_train_per_task=8, n_test_per_task=60, n_val_per_task=60,
                       corpus_docs=400)
    for split in ("test", "val"):
        loaded = evaluation.load_eval_sets({"eval_dir": str(tmp_path / "suite" / split), "eval_limit": 0})
        assert {name: len(records) for name, (_, records) in loaded.items()} == dict.fromkeys(minicme.SYNTHETIC_TASKS,
                                                                                              60)


@pytest.mark.parametrize("left_out", ["--task", "--raw", "--out"])
def test_a_required_flag_left_out_is_named_before_anything_is_read(tmp_path, monkeypatch, capsys, left_out):
    """tasks.py without one of its required flags names it in its usage error (exit code 2), and reads
    and writes nothing: write_eval_set would meet the missing flag as None ("unknown task None")."""
    monkeypatch.setattr(tasks, "write_eval_set", lambda *a, **k: pytest.fail("tasks.py ran without a required flag"))
    flags = {"--task": "mmlu", "--raw": tmp_path / "x_test.csv", "--out": tmp_path / "out.jsonl"}
    argv = [f"{k}={v}" for k, v in flags.items() if k != left_out]
    assert usage_error(tasks.main, argv, capsys).endswith(f"error: the following arguments are required: {left_out}")
    assert os.listdir(tmp_path) == []
