"""
The evaluation tasks: the CME benchmark's metrics, its 11 tasks with a loader for each one's public
file format, the authors' record templates, and the writer of evaluation sets.

    python tasks.py --task anli --raw R1/test.jsonl R2/test.jsonl R3/test.jsonl --out eval/anli.jsonl

- metrics: accuracy on a label word or option letter, exact match over answer aliases (SQuAD
  normalisation), ROUGE-L F1; Task and evaluate() score generated answers with them.
- CME_TASKS: the 11 evaluation tasks, each with a loader that returns records in the authors'
  format {"instruction", "input", "output"} (+ "answers" for QA). An evaluation set is a folder of
  <task>.jsonl files; train.py scores each as the task its file name names (evaluation.task_of).
"""
if __name__ == "__main__":  # before the imports: see errors.start_script (closed streams, Ctrl-C while importing)
    import errors
    errors.start_script()

import csv
import json
import os
import random
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Callable, Optional

from data import UserError, read_jsonl
from errors import Parser, exit_with, run_script
from files import blocked_parent, flag_path, read_json, remove_stale_temporaries, special_file, write_atomic

# -----------------------------------------------------------------------------
# Metrics


def normalize_answer(s, articles=False):
    """SQuAD's normalisation: lower case, no punctuation, no articles (unless articles=True), single spaces. Unicode
    punctuation ("。") goes too; SQuAD's ASCII list would keep it."""
    s = "".join(c for c in s.lower() if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    return " ".join((s if articles else re.sub(r"\b(a|an|the)\b", " ", s)).split())


def exact_match(prediction, answers):
    """1.0 if the prediction equals any answer alias after normalisation, else 0.0. An alias of articles alone (the
    band "The The") keeps them, as does a prediction of articles alone: SQuAD's "" would match an empty answer."""
    answers = [answers] if isinstance(answers, str) else answers
    key = lambda s: normalize_answer(s) or normalize_answer(s, articles=True)
    return float(any(key(prediction) == key(a) for a in answers))


# "Answer: B", "The correct option is B", "label: entailment" -> what follows the prefix
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:correct\s+|right\s+|final\s+)?(?:answer|option|choice|label)\b"
                            r"\s*(?:is\b)?\s*[:\-]?\s*", re.I)


# "A or B", "A, or B", "A; B", "A vs. B", "A or option B": a second option after the first
_SECOND_OPTION = re.compile(r"(?:\s*(?:,|;|/|&|\bor\b|\band\b|\bvs\b\.?))+\s*(?:(?:option|choice)\s+)?"
                            r"[(\[]?[A-Za-z](?![A-Za-z0-9])", re.I)


def _option_letter(text):
    """The option letter a prediction starts with ("B", "(b)", "B.", "B) Paris", "A.cellular
    telephone"), or None; None too when it names a second option ("A or B", "A, B", "A B", "A or option B")."""
    m = re.match(r"([(\[])?([A-Za-z])(?![A-Za-z0-9])([)\]])?", text)
    if not m:
        return None
    letter, rest = m.group(2), text[m.end():]
    if letter.islower() and re.search(r"\w", rest) and not (m.group(1) or m.group(3) or rest[0] in ".:"):
        return None  # "a dog" starts with an article, not with option (a); "b!" is option (b)
    # "A. or B": the first letter's period comes before the separator ("A.cellular telephone" has none after it)
    if _SECOND_OPTION.match(rest.removeprefix(".")) or re.fullmatch(r"\s+[(\[]?[A-Z][)\]]?\.?\s*", rest):
        return None
    return letter.upper()


def _words(s):
    return re.sub(r"[\W_]+", " ", s.lower()).split()  # "Not_entailment." -> ["not", "entailment"]


_NEGATIONS = {"not", "no", "non", "never", "t"}  # "t": what is left of "isn't"


def _labels_named(words, labels):
    """The labels that occur in a word list; one inside a longer label that occurs there
    ("duplicate" inside "not duplicate") does not count on its own, and one with a negation among
    the two words before it counts as "not <label>" ("not a duplicate", "non-entailment")."""
    spans = []
    for lw in map(_words, labels):
        spans += [(i, i + len(lw), tuple(lw)) for i in range(len(words) - len(lw) + 1) if words[i:i + len(lw)] == lw]
    named = {(s, e, lw) for s, e, lw in spans
             if not any(s2 <= s and e <= e2 and e2 - s2 > e - s for s2, e2, _ in spans)}

    def negated(s, lw):  # a "not" inside the label named just before ("not entailment, entailment") is that label's
        start = max([s - 2, 0] + [e for _, e, _ in named if e <= s])
        return lw[0] not in _NEGATIONS and bool(_NEGATIONS & set(words[start:s]))
    return {("not",) * negated(s, lw) + lw for s, _, lw in named}


def accuracy(prediction, label, labels=None):
    """1.0 if the prediction gives the label: an option letter ("B", "(B)", "B. Paris", "Answer: B")
    or a label word, whatever the case and punctuation ("Entailment." for "entailment"). Given the
    task's label set, a longer answer counts when it names exactly one label, the right one; a
    negated label names its negation ("not a duplicate" is "not duplicate", "not positive" no
    label). An answer naming two labels ("A or B", "entailment or neutral") is always wrong."""
    text = _ANSWER_PREFIX.sub("", prediction, count=1).strip()
    if re.fullmatch(r"[A-Za-z]", label.strip()):
        return float(_option_letter(text) == label.strip().upper())
    words, gold = _words(text), _words(label)
    return float(words == gold or (labels is not None and _labels_named(words, labels) == {tuple(gold)}))


def _lcs_length(a, b):
    """Length of the longest common subsequence of two token lists, one DP row at a time."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] before this pass
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction, reference):
    """ROUGE-L F1 as rouge-score computes it by default: lower case, every run of characters
    outside [a-z0-9] splits tokens, no stemming."""
    p, r = (re.sub(r"[^a-z0-9]+", " ", s.lower()).split() for s in (prediction, reference))
    lcs = _lcs_length(p, r) if p and r else 0
    return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))  # F1 of precision lcs/|p| and recall lcs/|r|


def _label_key(text):
    """A label or reference as accuracy reads it: an option letter in upper case (" b" is "B"), else its words
    ("Entailment." and "entailment" are one label)."""
    letter = re.fullmatch(r"\s*([A-Za-z])\s*", text)
    return letter.group(1).upper() if letter else tuple(_words(text))


@dataclass
class Task:
    """An evaluation task: how many tokens to generate and how to score them against a record."""
    name: str
    metric: str  # "accuracy" | "exact_match" | "rouge_l"
    max_new_tokens: int
    labels: Optional[tuple] = None  # the allowed outputs of a classification task

    def __post_init__(self):
        if self.metric not in ("accuracy", "exact_match", "rouge_l"):
            raise UserError(f"task {self.name!r} has metric {self.metric!r}; use accuracy, exact_match or rouge_l.")

    def score(self, prediction, record):
        reference = record.get("output")
        if reference is None:
            raise UserError(f"a {self.name} record has no reference output; evaluate on a labelled split.")
        if self.metric == "accuracy":
            return accuracy(prediction, reference, self.labels)
        if self.metric == "exact_match":
            # the authors' Chinese QA records answer "<short answer>。<explanation>": score the answer
            return exact_match(prediction.split("。", 1)[0], record.get("answers") or [reference])
        return rouge_l(prediction, reference)

    def stray_label(self, record):
        """Why a classification task's reference is none of its labels as accuracy reads them, or None: a typo
        ("entailmnet") was scored without a word, the answer naming the label meant wrong, and chance_level counted it
        as a label of its own."""
        if self.labels is None or _label_key(record["output"]) in map(_label_key, self.labels):
            return None
        return f"its reference {record['output']!r} is none of {self.name}'s labels ({', '.join(self.labels)})"

    def blank_reference(self, record):
        """Why the metric reads a record's reference as nothing, or None: then every answer scores alike (an empty
        one right by accuracy or exact match, any one 0 by ROUGE-L), and the task's score says nothing."""
        output = record["output"]
        references = (record.get("answers") or [output]) if self.metric == "exact_match" else [output]  # as score reads
        if self.metric != "rouge_l" and not all(map(_words, references)):  # a blank alias: "" matches it
            return "its reference holds no letter or digit, so an empty answer would be right"
        if self.metric == "rouge_l" and not re.search(r"[a-z0-9]", output.lower()):
            return ('its "output" holds no word of a-z or 0-9, all that ROUGE-L reads (as rouge-score does), so '
                    "every answer would score 0")
        return None


def evaluate(task, predictions, records):
    """The task's score over a set of records, as a percentage (mean x 100)."""
    if len(predictions) != len(records) or not records:
        raise UserError(f"{task.name}: {len(predictions)} predictions for {len(records)} records; "
                         "give one prediction per record.")
    return 100.0 * sum(task.score(p, r) for p, r in zip(predictions, records)) / len(records)


def first_sentence(text):
    """The text up to its first sentence end (. ! ? or a line break): ROUGE-L's trivial baseline."""
    return re.split(r"(?<=[.!?])\s+|\n", text.strip(), maxsplit=1)[0]


def chance_level(task, records):
    """What a trivial answer scores on these records, as a percentage: the majority label's rate for a
    classification task, 0 for exact match, and for ROUGE-L the score of the input's first sentence."""
    if not records:
        raise UserError(f"{task.name}: no records to compute a chance level on.")
    if task.metric == "exact_match":
        return 0.0
    if task.metric == "rouge_l":
        return 100.0 * sum(rouge_l(first_sentence(r.get("input") or r["instruction"]), r["output"])
                           for r in records) / len(records)
    stray = next(filter(None, map(task.stray_label, records)), None)  # a typo was counted as a class
    if stray:
        raise UserError(f"{task.name}: a record can not count toward the chance level: {stray}; write the label meant "
                        'as its "output", or remove the record.')
    counts = {}
    for key in (_label_key(r["output"]) for r in records):
        counts[key] = counts.get(key, 0) + 1
    return 100.0 * max(counts.values()) / len(records)


# -----------------------------------------------------------------------------
# Record templates in the style of the authors' 132 records (shared/fixtures/official). Every
# instruction is copied from them except RTE's: they hold no two-way NLI item, so it follows the
# NLI ones. CME evaluation sets use a kind's first phrasing; the synthetic suite samples them all.

TEMPLATES = {
    "nli": ([
        "What kind of relationship exists between the two given sentences: neutral, contradiction, or entailment?",
        "Can you identify the relationship between these two sentences as neutral, contradiction, or entailment?",
        "Identify the connection between the given sentences as either neutral, contradiction, or entailment.",
        "Analyze the connection between the following sentences: neutral, contradiction, or entailment.",
        "Decide the relationship between these sentences: neutral, contradiction, or entailment.",
        "Evaluate the relationship between these two sentences: neutral, contradiction, or entailment.",
        "Decide whether the following statements are neutral, contradiction, or entailment."],
        "Sentence 1: {premise}\nSentence 2: {hypothesis}"),
    "rte": (["Identify the connection between the given sentences as either entailment or not entailment."],
            "Sentence 1: {premise}\nSentence 2: {hypothesis}"),
    "paraphrase": ([
        "Determine if the following two sentences are semantically identical or different. Choose 'duplicate' or "
        "'not duplicate'.",
        "Determine the relationship between the following sentences: are they duplicates or not? Select "
        "'duplicate' or 'not duplicate'.",
        "Check if the following questions are semantically equivalent. Choose 'duplicate' if they are equivalent, "
        "otherwise select 'not duplicate'.",
        "Analyze the pair of questions to determine if they are asking the same thing. Choose 'duplicate' or 'not "
        "duplicate'.",
        "Evaluate the semantic similarity of the following sentences. If they are the same, choose 'duplicate'; "
        "if different, choose 'not duplicate'.",
        "Based on the content of these sentences, determine if they are duplicates of each other. Select "
        "'duplicate' or 'not duplicate'.",
        "Judge whether these two sentences have the same meaning. Select 'duplicate' if they do and 'not "
        "duplicate' if they do not."],
        "Text 1: {text1}\nText 2: {text2}"),
    "sentiment": ([
        "Read the following review and determine if the sentiment is positive or negative.",
        "Determine whether the sentiment in the following passage is positive or negative.",
        "Classify the sentiment of the following review: is it positive or negative?",
        "Based on the content of the following passage, is the sentiment positive or negative?"], "{text}"),
    "summary": ([
        "Write a summary that captures the main ideas of the text:", "Provide a concise summary for the given passage:",
        "Write a concise summary for the provided text:", "Summarize the following text:",
        "Summarize the essential points of the following text:",
        "Condense the following information into a brief summary:"], "{text}"),
    "blank": ([
        "Decide the word represented by the blank in the provided sentence.",
        "Determine the proper word that the blank is substituting in the sentence.",
        "Determine the correct word to fill in the blank in the given sentence."],
        "Sentence: '{sentence}'\nOption A: '{option1}'\nOption B: '{option2}'"),
    "choice": (["Among the options given, choose the correct one."], "Question: {question}\nChoices: {choices}"),
}
LETTERS = "ABCDEFGH"


def make_record(kind, output, instruction=None, **fields):
    """A record of one kind; options=[...] become "A.x, B.y, ..." as in the official records."""
    phrasings, layout = TEMPLATES[kind]
    if "options" in fields:
        fields["choices"] = ", ".join(f"{LETTERS[i]}.{o}" for i, o in enumerate(fields.pop("options")))
    return {"instruction": instruction or phrasings[0], "input": layout.format(**fields), "output": output}


def qa_record(question, answers):
    """Open-domain QA as in the official records: the question is the instruction, no input.
    "answers" holds every alias (duplicates dropped; blank ones too, which an empty answer would match, unless all
    are: evaluation refuses such a record); the first is the output."""
    answers = list(dict.fromkeys(a for a in answers if a))
    answers = [a for a in answers if _words(a)] or answers
    return {"instruction": question, "input": "", "output": answers[0] if answers else None, "answers": answers}


# -----------------------------------------------------------------------------
# CME loaders, one per public format. A row without a label (GLUE test files, WinoGrande's test
# split) loads with output None, so the file can still be turned into prompts; write_eval_set
# refuses it. A malformed file, or a field of the wrong JSON type, stops with its name, the line
# and what to do. Files are read as UTF-8, with or without a byte-order mark.

def _check_exists(path):
    if not str(path).strip():  # --raw= with nothing after the "="
        raise UserError("a --raw path is empty; give the task's raw file, e.g. --raw dev.jsonl.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; check the path to the task's raw file.")
    what = special_file(path)
    if what and what != "a folder":  # a folder is aclImdb's split, or refused by write_eval_set
        raise UserError(f"{path} is {what}, not a file; give the task's raw file.")


_KINDS = {  # what a raw file's field may hold, as its messages name it -> the check
    "a string": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
    "a list": lambda v: isinstance(v, list),
    "a list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "a list of objects": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    "a string or a list of strings": lambda v: isinstance(v, str) or _KINDS["a list of strings"](v),
}
_REQUIRED = object()


def _show(value):
    """A raw file's value as JSON, cut short for a message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _get(obj, key, where, kind="a string", default=_REQUIRED):
    """obj[key], checked to be of a kind in _KINDS; the default, if given, when it is absent or null."""
    if not isinstance(obj, dict):
        raise UserError(f"{where} has {_show(obj)} where an object holding {key!r} belongs; check that the file is "
                        "in this task's format.")
    if obj.get(key) is None and default is not _REQUIRED:
        return default
    if key not in obj:
        raise UserError(f"{where} has no {key!r} field; check that the file is in this task's format.")
    if not _KINDS[kind](obj[key]):
        raise UserError(f"{where} has {key!r} set to {_show(obj[key])}, not {kind}; check that the file is in "
                        "this task's format.")
    texts = obj[key] if isinstance(obj[key], list) else [obj[key]]
    try:  # JSON allows "\ud800" alone; the evaluation set, UTF-8, could not hold it
        "".join(t for t in texts if isinstance(t, str)).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f'{where} has {key!r} holding a lone surrogate (like "\\ud800"), not valid Unicode; fix the '
                        "text in the raw file.") from None
    return obj[key]


def _count(n, noun):
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _label(value, mapping, where):
    if value is None or value == "":
        return None
    if not isinstance(value, str) or value not in mapping:  # a list would not even be a dict key
        raise UserError(f"{where} has the label {value!r}; expected one of {list(mapping)}.")
    return mapping[value]


def _jsonl(path):
    """(where, object) for each non-empty line of a task's raw JSON-lines file."""
    _check_exists(path)
    if os.path.isdir(path):  # write_eval_set names the raw file that the task needs, which read_jsonl can not
        raise IsADirectoryError(path)
    yield from read_jsonl(path)


def _json(path, lines_too=False):
    """A JSON file's value; with lines_too, None for JSON lines (a second value after the first)."""
    _check_exists(path)
    if os.path.isdir(path):  # write_eval_set names the raw file that the task needs
        raise IsADirectoryError(path)
    return read_json(path, "pass the task's raw file as downloaded, whole and readable by this user.", any_value=True,
                     lines_too=lines_too, records=True)


def _tsv(path, need):
    """(where, row dict) for each row of a GLUE TSV; text mode turns QQP's CRLF into LF."""
    _check_exists(path)
    with open(path, encoding="utf-8-sig") as f:
        header = f.readline().rstrip("\n").split("\t")
        if not set(need) <= set(header):
            raise UserError(f"{path} has the columns {header}; this task needs {list(need)} in a header line.")
        for n, line in enumerate(f, 2):
            if not line.strip():
                continue
            cells = line.rstrip("\n").split("\t")
            if len(cells) != len(header):
                raise UserError(f"{path} line {n} has {_count(len(cells), 'tab-separated field')} where the header has "
                                 f"{len(header)}; fix or remove that row.")
            yield f"{path} line {n}", dict(zip(header, cells))


def load_anli(path):
    """ANLI jsonl of any round (R1/R2/R3, dev or test): context, hypothesis, label e/n/c."""
    labels = {"e": "entailment", "n": "neutral", "c": "contradiction"}
    return [make_record("nli", _label(row.get("label"), labels, where), premise=_get(row, "context", where),
                        hypothesis=_get(row, "hypothesis", where)) for where, row in _jsonl(path)]


def load_rte(path):
    """GLUE RTE TSV: index, sentence1, sentence2, label entailment/not_entailment (none in test); or
    SuperGLUE's RTE/{train,val,test}.jsonl: premise, hypothesis, the same labels, idx."""
    labels = {"entailment": "entailment", "not_entailment": "not entailment"}
    if path.endswith(".jsonl"):
        return [make_record("rte", _label(row.get("label"), labels, where), premise=_get(row, "premise", where),
                            hypothesis=_get(row, "hypothesis", where)) for where, row in _jsonl(path)]
    return [make_record("rte", _label(row.get("label"), labels, where), premise=row["sentence1"],
                        hypothesis=row["sentence2"]) for where, row in _tsv(path, ("sentence1", "sentence2"))]


def load_qqp(path):
    """GLUE QQP TSV: id, qid1, qid2, question1, question2, is_duplicate (test: id, question1, question2)."""
    labels = {"1": "duplicate", "0": "not duplicate"}
    return [make_record("paraphrase", _label(row.get("is_duplicate"), labels, where), text1=row["question1"],
                        text2=row["question2"]) for where, row in _tsv(path, ("question1", "question2"))]


def load_winogrande(path):
    """WinoGrande jsonl: sentence with "_" for the blank, option1, option2, answer "1"/"2" -> A/B."""
    return [make_record("blank", _label(row.get("answer"), {"1": "A", "2": "B"}, where),
                        sentence=_blank_sentence(row, where), option1=_get(row, "option1", where),
                        option2=_get(row, "option2", where)) for where, row in _jsonl(path)]


def _blank_sentence(row, where):
    """A WinoGrande sentence, which must hold the "_" that the options fill: without it the prompt asks nothing."""
    sentence = _get(row, "sentence", where)
    if "_" not in sentence:
        raise UserError(f'{where} has a sentence with no "_" for the options to fill ({_show(sentence)}); put the '
                        '"_" where the blank belongs, or check that the file is WinoGrande\'s.')
    return sentence


def load_arc(path):
    """ARC jsonl: question {stem, choices [{text, label}]}, answerKey. Some rows label their choices
    "1".."4" instead of "A".."D"; the letters follow the choices' order either way."""
    records = []
    for where, row in _jsonl(path):
        question = _get(row, "question", where, "an object")
        choices = _get(question, "choices", where, "a list of objects")
        if len(choices) > len(LETTERS):
            raise UserError(f"{where} has {len(choices)} choices, more than the {len(LETTERS)} letters of the "
                            f"prompt ({LETTERS}); check that the file is ARC's.")
        keys = {_get(c, "label", where): LETTERS[i] for i, c in enumerate(choices)}
        if len(keys) < len(choices):  # the answer key would point at the last of the choices of that label
            raise UserError(f"{where} labels two of its choices alike ({[c['label'] for c in choices]}); check that "
                            "the file is ARC's.")
        records.append(make_record("choice", _label(row.get("answerKey"), keys, where),
                                   question=_get(question, "stem", where),
                                   options=[_get(c, "text", where) for c in choices]))
    return records


def load_mmlu(path):
    """MMLU CSV of one subject (data/{dev,test}/<subject>_<split>.csv): no header; question, A, B,
    C, D, answer, with quoted fields that may span lines."""
    _check_exists(path)
    records, start = [], 1
    with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": csv sees the quoted newlines
        reader = csv.reader(f)
        try:
            for row in reader:
                where, start = f"{path} line {start}", reader.line_num + 1  # the line the record starts on
                if not "".join(row).strip():
                    continue  # a blank line, as at the end of a file
                row = [field.replace("\r\n", "\n") for field in row]  # a Windows copy's quoted line breaks
                if len(row) != 6:
                    raise UserError(f"{where} has {_count(len(row), 'field')}; an MMLU row is question, A, B, C, D, "
                                    "answer.")
                records.append(make_record("choice", _label(row[5].strip(), {c: c for c in "ABCD"}, where),
                                           question=row[0].strip(), options=[o.strip() for o in row[1:5]]))
        except csv.Error as e:  # a quote left open makes the rest of the file one field, past csv's size limit
            raise UserError(f"{path} line {start} is not a CSV row ({e}); an MMLU row is question, A, B, C, D, "
                            "answer, each quote closed.") from None
    return records


_DESCRIPTION = re.compile(r'\(description\s+(?:"((?:[^"\\]|\\.)*)"|([^\s()"]+))\)')  # quoted or bare value


def load_webqa(path):
    """Baidu's Chinese WebQA, {qid: {"question", "evidences": {eid: {"answer": [...], "evidence"}}}}
    (every evidence's answers but "no_answer"), or English WebQuestions, a JSON list of
    {"utterance", "targetValue": '(list (description X) (description "Y Z"))'}."""
    data, records = _json(path), []
    if isinstance(data, dict):
        for qid, item in data.items():
            where = f"{path} question {qid}"
            evidences = _get(item, "evidences", where, "an object").values()
            answers = [a for ev in evidences for a in _get(ev, "answer", where, "a list of strings")
                       if a != "no_answer"]
            records.append(qa_record(_get(item, "question", where), answers))
        return records
    if not isinstance(data, list):
        raise UserError(f"{path} holds {_show(data)}; pass Baidu WebQA's JSON object or WebQuestions' JSON list.")
    for i, item in enumerate(data):
        where = f"{path} record {i}"
        target = _get(item, "targetValue", where)
        answers = [re.sub(r"\\(.)", r"\1", quoted) or bare for quoted, bare in _DESCRIPTION.findall(target)]
        if not answers:
            raise UserError(f"{where} has the targetValue {target!r}; expected '(list (description ...) ...)'.")
        records.append(qa_record(_get(item, "utterance", where), answers))
    return records


def load_nq(path):
    """NQ-open jsonl: {"question", "answer": [aliases]} (EfficientQA's extra fields are ignored)."""
    records = []
    for where, row in _jsonl(path):
        answers = _get(row, "answer", where, "a string or a list of strings")
        records.append(qa_record(_get(row, "question", where), [answers] if isinstance(answers, str) else answers))
    return records


class _Taken:
    """What a loader has counted over the --raw files of one call: the ids of the TL;DR posts or TriviaQA questions
    taken, and the TL;DR rows of the train split left out."""
    def __init__(self):
        self.ids, self.train_rows = set(), 0


def load_triviaqa(path, taken=None):
    """TriviaQA JSON {"Data": [{"QuestionId", "Question", "Answer": {"Value", "NormalizedValue", "Aliases",
    "NormalizedAliases"}}]}. The output is the normalised value, lower case as in the official
    records; every alias counts for exact match. Files without answers load with output None. A question
    counts once over the files that share `taken` (write_eval_set passes one for all its --raw files):
    web-dev.json and wikipedia-dev.json share questions, with other evidence, and a verified-*-dev.json
    file holds some of its dev file's."""
    records, taken = [], _Taken() if taken is None else taken
    for i, item in enumerate(_get(_json(path), "Data", path, "a list")):
        where = f"{path} record {i}"
        question_id = _get(item, "QuestionId", where, default=None)
        if question_id is not None and question_id in taken.ids:
            continue
        taken.ids.add(question_id)
        a = _get(item, "Answer", where, "an object", default={})
        answers = [_get(a, key, where, default=None) for key in ("NormalizedValue", "Value")]
        for key in ("Aliases", "NormalizedAliases"):
            answers += _get(a, key, where, "a list of strings", default=[])
        records.append(qa_record(_get(item, "Question", where), answers))
    return records


def load_tldr(path, taken=None):
    """OpenAI TL;DR: tldr_3_filtered rows {id, subreddit, title, post, summary}, or
    summarize-from-feedback comparisons {info: {id, post, ...}, summaries: [{text, policy}], split}, which
    count once per post and only when a summary is the human reference (policy "ref"). JSON lines
    (comparisons/batch*.json too, despite the name), or a JSON list or object. The input is the post
    alone, as in the official records. A row of the "train" split is left out: its post is a training post,
    and comparisons/ holds such rows beside those of the evaluation splits valid1 and valid2. A post counts once
    over the files that share `taken` too (write_eval_set passes one for all its --raw files)."""
    data = None if path.endswith(".jsonl") else _json(path, lines_too=True)
    if data is None:
        rows = _jsonl(path)
    else:
        rows = [(f"{path} record {i}", r) for i, r in enumerate(data if isinstance(data, list) else [data])]
    records, taken = [], _Taken() if taken is None else taken
    for where, row in rows:
        info = _get(row, "info", where, "an object", default=None)
        if _get(row, "split", where, default=None) == "train":
            taken.train_rows += 1
            continue
        if info is not None:
            refs = [_get(s, "text", where) for s in _get(row, "summaries", where, "a list of objects")
                    if _get(s, "policy", where, default=None) == "ref"]
            post_id = _get(info, "id", where, default=None)
            if not refs or post_id is not None and post_id in taken.ids:  # a row without an id: a post of its own
                continue
            taken.ids.add(post_id)
            post, summary = _get(info, "post", where), refs[0]
        else:
            post, summary = _get(row, "post", where), _get(row, "summary", where, default=None)
        records.append(make_record("summary", summary and summary.strip(), text=post))  # refs start with a space
    return records


def load_imdb(path):
    """IMDB as an aclImdb split folder (pos/ and neg/ of <id>_<rating>.txt, e.g. aclImdb/test) or a
    file of 'pos<TAB>review' lines (fastNLP's variant). Reviews keep their <br /> tags, as the
    official records do."""
    _check_exists(path)
    names, records = {"pos": "positive", "neg": "negative"}, []
    if not os.path.isdir(path):
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                label, tab, text = line.rstrip("\n").partition("\t")
                if not line.strip():
                    continue
                if not tab or label not in names:
                    raise UserError(f"{path} line {n} is not 'pos<TAB>review' or 'neg<TAB>review'; fix or remove it.")
                records.append(make_record("sentiment", names[label], text=text))
        return records
    if not any(os.path.isdir(os.path.join(path, lab)) for lab in names):
        raise UserError(f"{path} has no pos/ or neg/ folder; point at an aclImdb split folder such as aclImdb/test.")
    for lab in (lab for lab in names if os.path.isdir(os.path.join(path, lab))):
        folder, files = os.path.join(path, lab), []
        for name in (n for n in os.listdir(folder) if not n.startswith(".")):  # not macOS's .DS_Store and the like
            m = re.fullmatch(r"(\d+)_\d+\.txt", name)
            if not m:
                raise UserError(f"{os.path.join(folder, name)} is not named <id>_<rating>.txt; move it out of "
                                f"{folder}.")
            files.append((int(m.group(1)), name))
        for _, name in sorted(files):
            _check_exists(os.path.join(folder, name))
            try:
                with open(os.path.join(folder, name), encoding="utf-8-sig") as f:
                    records.append(make_record("sentiment", names[lab], text=f.read()))
            except UnicodeDecodeError as e:
                review = os.path.join(folder, name)
                raise UserError(f"{review} is not UTF-8 text ({e.reason}); save it as UTF-8.") from None
    return records


@dataclass
class CMETask(Task):
    """A CME evaluation task: a Task plus the loader of its public file format."""
    load: Callable = None  # path -> list of records in the official format
    source: str = ""  # the files load() reads


CME_TASKS = {t.name: t for t in [
    CMETask("oai_sum", "rouge_l", 128, None, load_tldr,
            "tldr_3_filtered/*.jsonl or summarize-from-feedback comparisons/batch*.json"),
    CMETask("imdb", "accuracy", 8, ("positive", "negative"), load_imdb, "aclImdb/test folder or label<TAB>review file"),
    CMETask("anli", "accuracy", 8, ("entailment", "neutral", "contradiction"), load_anli,
            "anli_v1.0/R*/{dev,test}.jsonl"),
    CMETask("qqp", "accuracy", 8, ("duplicate", "not duplicate"), load_qqp, "GLUE QQP/{train,dev,test}.tsv"),
    CMETask("rte", "accuracy", 8, ("entailment", "not entailment"), load_rte,
            "GLUE RTE/{train,dev,test}.tsv or SuperGLUE RTE/{train,val,test}.jsonl"),
    CMETask("winogrande", "accuracy", 4, ("A", "B"), load_winogrande, "winogrande_1.1/{train_*,dev,test}.jsonl"),
    CMETask("arc", "accuracy", 4, tuple(LETTERS), load_arc,  # every letter its prompt can show (load_arc)
            "ARC-V1-Feb2018/ARC-*/ARC-*-{Train,Dev,Test}.jsonl"),
    CMETask("mmlu", "accuracy", 4, tuple("ABCD"), load_mmlu, "data/{dev,test}/<subject>_<split>.csv"),
    CMETask("webqa", "exact_match", 64, None, load_webqa, "WebQA.v1.0/*.ann.json or webquestions.examples.*.json"),
    CMETask("nq", "exact_match", 32, None, load_nq, "nq_open/NQ-open.{train,dev}.jsonl"),
    CMETask("triviaqa", "exact_match", 32, None, load_triviaqa, "triviaqa-rc/qa/*.json"),
]}



def write_eval_set(task_name, raw_path, out_path, limit=None, overwrite=False):
    """Load a CME task's raw file (a path, or a list of them, e.g. ANLI's three rounds) and write an
    evaluation set in the official format, its records in a fixed shuffled order (limit keeps the first
    ones): a JSON list for .json, JSON lines for .jsonl. Returns the number of records written. An
    existing out_path is replaced only with overwrite."""
    if task_name not in CME_TASKS:
        raise UserError(f"unknown task {task_name!r}; choose one of {', '.join(CME_TASKS)}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit {limit!r} is not a number of records to keep; give --limit N with N >= 1, "
                        "or leave it out to keep every record.")
    out_path = os.fspath(out_path)
    if not out_path.strip():
        raise UserError(f"--out is empty; give the file to write, e.g. --out data/cme_eval/{task_name}.jsonl.")
    if os.path.isdir(out_path):  # before its name's ending: a folder is named as what it is
        raise UserError(f"--out {out_path} is a folder; give the file to write, e.g. {out_path}/{task_name}.jsonl.")
    if not out_path.endswith((".json", ".jsonl")):
        raise UserError(f"{out_path} must end in .json (a JSON list) or .jsonl (one record per line).")
    folder, (named, ext) = os.path.dirname(out_path), os.path.splitext(os.path.basename(out_path))
    if named in CME_TASKS and named != task_name:  # <task>.jsonl is scored as that task (evaluation.task_of)
        raise UserError(f"--out {out_path} is named for the task {named}, and train.py would score these {task_name} "
                        f"records as {named}'s; name it {os.path.join(folder, task_name + ext)}.")
    blocker = blocked_parent(out_path)
    if blocker:
        raise UserError(f"--out {out_path} can not be written: {blocker}; choose another --out.")
    paths = [raw_path] if isinstance(raw_path, (str, os.PathLike)) else list(raw_path)
    real = [os.path.realpath(p) for p in paths]
    if len(set(real)) < len(real):  # a shell glob and a name, or a name twice: every record would count twice
        twice = next(p for p, r in zip(paths, real) if real.count(r) > 1)
        raise UserError(f"--raw names {twice} more than once; give each raw file once.")
    for p in paths:
        if os.path.exists(out_path) and os.path.exists(p) and os.path.samefile(out_path, p):
            raise UserError(f"{out_path} is both --out and a --raw file; writing would replace the raw file, "
                            "so choose another --out.")
    if os.path.lexists(out_path) and not overwrite:  # checked before the raw files are read: they can be large
        raise UserError(f"--out {out_path} exists; pass --overwrite to replace it, or choose another --out.")
    records, load, taken = [], CME_TASKS[task_name].load, _Taken()
    for p in map(os.fspath, paths):
        try:
            records += load(p, taken) if load in (load_tldr, load_triviaqa) else load(p)  # counted once over files
        except UnicodeDecodeError as e:
            where = f"a file in {p}" if os.path.isdir(p) else p
            raise UserError(f"{where} is not UTF-8 text ({e.reason}); save it as UTF-8.") from None
        except IsADirectoryError:
            raise UserError(f"{p} is a folder; pass the task's raw file ({CME_TASKS[task_name].source}).") from None
    unlabelled = sum(r["output"] is None for r in records)
    if unlabelled:
        raise UserError(f"{unlabelled} of {len(records)} records in {', '.join(map(str, paths))} have no label "
                         "(a test split without answers?); build the evaluation set from a labelled split such as dev.")
    whys = [CME_TASKS[task_name].blank_reference(r) for r in records]
    blank = [why for why in whys if why]
    if blank and len(blank) == len(records):
        raise UserError(f"none of the {len(records)} records in {', '.join(map(str, paths))} can be scored as "
                        f"{task_name} (one: {blank[0]}); check that the --raw files are the task's.")
    if blank:  # evaluation refuses such a record (every answer would score alike): left out, and said
        print(f"left out {len(blank)} of {len(records)} records that can not be scored as {task_name} (one: "
              f"{blank[0]})")
        records = [r for r, why in zip(records, whys) if not why]
    if not records and taken.train_rows:
        raise UserError(f"no comparison in {', '.join(map(str, paths))} is of the valid1 or valid2 split and has a "
                        "human reference summary (those of the train split are left out: their posts are training "
                        "posts); pass the batch files that hold valid1 or valid2 comparisons, or "
                        "tldr_3_filtered's test.jsonl.")
    if not records:  # evaluation refuses an empty set; better to say so now
        raise UserError(f"no records in {', '.join(map(str, paths))}; check that the --raw files are the task's and "
                        "not empty.")
    # a fixed shuffle: a prefix (--limit, train.py's eval_limit) is then a fair sample, not one label's or one raw
    # file's records (aclImdb lists every positive review first, MMLU one subject after another)
    random.Random(0).shuffle(records)
    records = records if limit is None else records[:limit]
    text = ("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) if out_path.endswith(".jsonl")
            else json.dumps(records, ensure_ascii=False, indent=1) + "\n")
    remove_stale_temporaries(folder or ".", [os.path.basename(out_path)])  # what a killed tasks.py half wrote there
    write_atomic(out_path, text)
    return len(records)


def main(argv=None):
    parser = Parser(prog="tasks.py", description="Write a CME evaluation set in the official record format from a "
                    "task's public raw files.")
    parser.add_argument("--task", required=True, choices=list(CME_TASKS))
    parser.add_argument("--raw", required=True, nargs="+", type=flag_path,
                        help="the task's raw file(s), or aclImdb's split folder")
    parser.add_argument("--out", required=True, type=flag_path, help="output: .json (a list) or .jsonl")
    parser.add_argument("--limit", type=int, default=None, help="keep N records (the first of a fixed shuffle)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    try:
        n = write_eval_set(args.task, args.raw, args.out, args.limit, args.overwrite)
    except (UserError, OSError) as e:
        exit_with(e, "tasks.py: ")
    print(f"wrote {n} {args.task} records to {args.out}")


if __name__ == "__main__":
    run_script(main)
