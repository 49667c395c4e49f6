"""
Tasks, metrics and evaluation data for TeamLoRA's multi-task runs (to be appended to data.py).

    python data.py eval_set --task anli --raw R1/test.jsonl R2/test.jsonl R3/test.jsonl --out eval/anli.jsonl

- metrics of the CME benchmark: accuracy on a label word or option letter, exact match over answer
  aliases (SQuAD normalisation), ROUGE-L F1; Task and evaluate() score generated answers with them.
- CME_TASKS: the 11 evaluation tasks, each with a loader for its public file format that returns
  records in the authors' format {"instruction", "input", "output"} (+ "answers" for QA).
- make_suite(): "mini-CME", a seeded synthetic multi-task suite over a small invented world, with
  the corpus that teaches that world to a tiny base model and a SentencePiece model for it.
"""
import argparse
import csv
import io
import json
import os
import random
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Callable, Optional

import sentencepiece as spm

# -----------------------------------------------------------------------------
# Metrics


def normalize_answer(s):
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces. Unicode
    punctuation ("。") goes too; SQuAD's ASCII list would keep it."""
    s = "".join(c for c in s.lower() if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def exact_match(prediction, answers):
    """1.0 if the prediction equals any answer alias after normalisation, else 0.0."""
    answers = [answers] if isinstance(answers, str) else answers
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


# "Answer: B", "The correct option is B", "label: entailment" -> what follows the prefix
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:correct\s+|right\s+|final\s+)?(?:answer|option|choice|label)\b"
                            r"\s*(?:is\b)?\s*[:\-]?\s*", re.I)


def _option_letter(text):
    """The option letter a prediction starts with ("B", "(b)", "B.", "B) Paris", "A.cellular
    telephone"), or None; None too when it names a second option ("A or B", "A, B", "A B")."""
    m = re.match(r"([(\[])?([A-Za-z])(?![A-Za-z0-9])([)\]])?", text)
    if not m:
        return None
    letter, rest = m.group(2), text[m.end():]
    if letter.islower() and rest.strip() and not (m.group(1) or m.group(3) or rest[0] in ".:"):
        return None  # "a dog" starts with an article, not with option (a)
    if (re.match(r"\s*(?:,|/|&|\bor\b|\band\b)\s*[(\[]?[A-Za-z](?![A-Za-z0-9])", rest, re.I)
            or re.fullmatch(r"\s+[(\[]?[A-Z][)\]]?\.?\s*", rest)):
        return None
    return letter.upper()


def _words(s):
    return re.sub(r"[\W_]+", " ", s.lower()).split()  # "Not_entailment." -> ["not", "entailment"]


def _labels_named(words, labels):
    """The labels that occur in a word list; one inside a longer label that occurs there
    ("duplicate" inside "not duplicate") does not count on its own."""
    spans = []
    for lw in map(_words, labels):
        spans += [(i, i + len(lw), tuple(lw)) for i in range(len(words) - len(lw) + 1) if words[i:i + len(lw)] == lw]
    return {lw for s, e, lw in spans if not any(s2 <= s and e <= e2 and e2 - s2 > e - s for s2, e2, _ in spans)}


def accuracy(prediction, label, labels=None):
    """1.0 if the prediction gives the label: an option letter ("B", "(B)", "B. Paris", "Answer: B")
    or a label word, whatever the case and punctuation ("Entailment." for "entailment"). Given the
    task's label set, a longer answer counts when it names exactly one label, the right one. An
    answer naming two labels ("A or B", "entailment or neutral") is always wrong."""
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


@dataclass
class Task:
    """An evaluation task: how many tokens to generate and how to score them against a record."""
    name: str
    metric: str  # "accuracy" | "exact_match" | "rouge_l"
    max_new_tokens: int
    labels: Optional[tuple] = None  # the allowed outputs of a classification task

    def __post_init__(self):
        if self.metric not in ("accuracy", "exact_match", "rouge_l"):
            raise ValueError(f"task {self.name!r} has metric {self.metric!r}; use accuracy, exact_match or rouge_l.")

    def score(self, prediction, record):
        reference = record.get("output")
        if reference is None:
            raise ValueError(f"a {self.name} record has no reference output; evaluate on a labelled split.")
        if self.metric == "accuracy":
            return accuracy(prediction, reference, self.labels)
        if self.metric == "exact_match":
            return exact_match(prediction, record.get("answers") or [reference])
        return rouge_l(prediction, reference)


def evaluate(task, predictions, records):
    """The task's score over a set of records, as a percentage (mean x 100)."""
    if len(predictions) != len(records) or not records:
        raise ValueError(f"{task.name}: {len(predictions)} predictions for {len(records)} records; "
                         "give one prediction per record.")
    return 100.0 * sum(task.score(p, r) for p, r in zip(predictions, records)) / len(records)


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
        "Determine if the following two sentences are semantically identical or different. Choose 'duplicate' or 'not duplicate'.",
        "Determine the relationship between the following sentences: are they duplicates or not? Select 'duplicate' or 'not duplicate'.",
        "Check if the following questions are semantically equivalent. Choose 'duplicate' if they are equivalent, otherwise select 'not duplicate'.",
        "Analyze the pair of questions to determine if they are asking the same thing. Choose 'duplicate' or 'not duplicate'.",
        "Evaluate the semantic similarity of the following sentences. If they are the same, choose 'duplicate'; if different, choose 'not duplicate'.",
        "Based on the content of these sentences, determine if they are duplicates of each other. Select 'duplicate' or 'not duplicate'.",
        "Judge whether these two sentences have the same meaning. Select 'duplicate' if they do and 'not duplicate' if they do not."],
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
    "answers" holds every alias (duplicates dropped); the first is the output."""
    answers = list(dict.fromkeys(a for a in answers if a))
    return {"instruction": question, "input": "", "output": answers[0] if answers else None, "answers": answers}


# -----------------------------------------------------------------------------
# CME loaders, one per public format. A row without a label (GLUE test files, WinoGrande's test
# split) loads with output None, so the file can still be turned into prompts; write_eval_set
# refuses it. A malformed file stops with its name, the line and what to do. Files are read as
# UTF-8, with or without a byte-order mark.

def _check_exists(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; check the path to the task's raw file.")


def _get(obj, key, where):
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where} has no {key!r} field; check that the file is in this task's format.")
    return obj[key]


def _label(value, mapping, where):
    if value is None or value == "":
        return None
    if value not in mapping:
        raise ValueError(f"{where} has the label {value!r}; expected one of {list(mapping)}.")
    return mapping[value]


def _jsonl(path):
    """(where, object) for each non-empty line of a JSON-lines file."""
    _check_exists(path)
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not valid JSON ({e.msg}); fix or remove that line.") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path} line {n} is not a JSON object; each line must hold one record.")
            yield f"{path} line {n}", obj


def _json(path):
    _check_exists(path)
    with open(path, encoding="utf-8-sig") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno} is not valid JSON ({e.msg}); fix the file.") from None


def _tsv(path, need):
    """(where, row dict) for each row of a GLUE TSV; text mode turns QQP's CRLF into LF."""
    _check_exists(path)
    with open(path, encoding="utf-8-sig") as f:
        header = f.readline().rstrip("\n").split("\t")
        if not set(need) <= set(header):
            raise ValueError(f"{path} has the columns {header}; this task needs {list(need)} in a header line.")
        for n, line in enumerate(f, 2):
            if not line.strip():
                continue
            cells = line.rstrip("\n").split("\t")
            if len(cells) != len(header):
                raise ValueError(f"{path} line {n} has {len(cells)} tab-separated fields where the header has "
                                 f"{len(header)}; fix or remove that row.")
            yield f"{path} line {n}", dict(zip(header, cells))


def load_anli(path):
    """ANLI jsonl of any round (R1/R2/R3, dev or test): context, hypothesis, label e/n/c."""
    labels = {"e": "entailment", "n": "neutral", "c": "contradiction"}
    return [make_record("nli", _label(row.get("label"), labels, where), premise=_get(row, "context", where),
                        hypothesis=_get(row, "hypothesis", where)) for where, row in _jsonl(path)]


def load_rte(path):
    """GLUE RTE TSV: index, sentence1, sentence2, label entailment/not_entailment (none in test)."""
    labels = {"entailment": "entailment", "not_entailment": "not entailment"}
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
                        sentence=_get(row, "sentence", where), option1=_get(row, "option1", where),
                        option2=_get(row, "option2", where)) for where, row in _jsonl(path)]


def load_arc(path):
    """ARC jsonl: question {stem, choices [{text, label}]}, answerKey. Some rows label their choices
    "1".."4" instead of "A".."D"; the letters follow the choices' order either way."""
    records = []
    for where, row in _jsonl(path):
        choices = _get(_get(row, "question", where), "choices", where)
        keys = {str(_get(c, "label", where)): LETTERS[i] for i, c in enumerate(choices)}
        records.append(make_record("choice", _label(row.get("answerKey"), keys, where),
                                   question=_get(row["question"], "stem", where),
                                   options=[_get(c, "text", where) for c in choices]))
    return records


def load_mmlu(path):
    """MMLU CSV of one subject (data/{dev,test}/<subject>_<split>.csv): no header; question, A, B,
    C, D, answer, with quoted fields that may span lines."""
    _check_exists(path)
    records, start = [], 1
    with open(path, encoding="utf-8-sig", newline="") as f:  # newline="": csv sees the quoted newlines
        reader = csv.reader(f)
        for row in reader:
            where, start = f"{path} line {start}", reader.line_num + 1  # the line the record starts on
            if len(row) != 6:
                raise ValueError(f"{where} has {len(row)} fields; an MMLU row is question, A, B, C, D, answer.")
            records.append(make_record("choice", _label(row[5].strip(), {c: c for c in "ABCD"}, where),
                                       question=row[0].strip(), options=[o.strip() for o in row[1:5]]))
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
            evidences = _get(item, "evidences", where).values()
            answers = [a for ev in evidences for a in _get(ev, "answer", where) if a != "no_answer"]
            records.append(qa_record(_get(item, "question", where), answers))
        return records
    for i, item in enumerate(data):
        where = f"{path} record {i}"
        target = _get(item, "targetValue", where)
        answers = [re.sub(r"\\(.)", r"\1", quoted) or bare for quoted, bare in _DESCRIPTION.findall(target)]
        if not answers:
            raise ValueError(f"{where} has the targetValue {target!r}; expected '(list (description ...) ...)'.")
        records.append(qa_record(_get(item, "utterance", where), answers))
    return records


def load_nq(path):
    """NQ-open jsonl: {"question", "answer": [aliases]} (EfficientQA's extra fields are ignored)."""
    records = []
    for where, row in _jsonl(path):
        answers = _get(row, "answer", where)
        records.append(qa_record(_get(row, "question", where), [answers] if isinstance(answers, str) else answers))
    return records


def load_triviaqa(path):
    """TriviaQA JSON {"Data": [{"Question", "Answer": {"Value", "NormalizedValue", "Aliases",
    "NormalizedAliases"}}]}. The output is the normalised value, lower case as in the official
    records; every alias counts for exact match. Files without answers load with output None."""
    records = []
    for i, item in enumerate(_get(_json(path), "Data", path)):
        a = item.get("Answer") or {}
        answers = [a.get("NormalizedValue"), a.get("Value")] + a.get("Aliases", []) + a.get("NormalizedAliases", [])
        records.append(qa_record(_get(item, "Question", f"{path} record {i}"), answers))
    return records


def load_tldr(path):
    """OpenAI TL;DR: tldr_3_filtered rows {id, subreddit, title, post, summary}, or
    summarize-from-feedback comparisons {info: {id, post, ...}, summaries: [{text, policy}]}, which
    count once per post and only when a summary is the human reference (policy "ref"). JSONL, or a
    JSON list or object. The input is the post alone, as in the official records."""
    if path.endswith(".jsonl"):
        rows = _jsonl(path)
    else:
        data = _json(path)
        rows = [(f"{path} record {i}", r) for i, r in enumerate(data if isinstance(data, list) else [data])]
    records, seen = [], set()
    for where, row in rows:
        if "info" in row:
            info = _get(row, "info", where)
            refs = [s["text"] for s in _get(row, "summaries", where) if s.get("policy") == "ref"]
            if not refs or info.get("id") in seen:
                continue
            seen.add(info.get("id"))
            post, summary = _get(info, "post", where), refs[0]
        else:
            post, summary = _get(row, "post", where), row.get("summary")
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
                    raise ValueError(f"{path} line {n} is not 'pos<TAB>review' or 'neg<TAB>review'; fix or remove it.")
                records.append(make_record("sentiment", names[label], text=text))
        return records
    if not any(os.path.isdir(os.path.join(path, lab)) for lab in names):
        raise ValueError(f"{path} has no pos/ or neg/ folder; point at an aclImdb split folder such as aclImdb/test.")
    for lab in (lab for lab in names if os.path.isdir(os.path.join(path, lab))):
        folder, files = os.path.join(path, lab), []
        for name in os.listdir(folder):
            m = re.fullmatch(r"(\d+)_\d+\.txt", name)
            if not m:
                raise ValueError(f"{os.path.join(folder, name)} is not named <id>_<rating>.txt; move it out of {folder}.")
            files.append((int(m.group(1)), name))
        for _, name in sorted(files):
            with open(os.path.join(folder, name), encoding="utf-8-sig") as f:
                records.append(make_record("sentiment", names[lab], text=f.read()))
    return records


@dataclass
class CMETask(Task):
    """A CME evaluation task: a Task plus the loader of its public file format."""
    load: Callable = None  # path -> list of records in the official format
    source: str = ""  # the files load() reads


CME_TASKS = {t.name: t for t in [
    CMETask("oai_sum", "rouge_l", 128, None, load_tldr, "tldr_3_filtered/*.jsonl or summarize-from-feedback comparisons"),
    CMETask("imdb", "accuracy", 8, ("positive", "negative"), load_imdb, "aclImdb/test folder or label<TAB>review file"),
    CMETask("anli", "accuracy", 8, ("entailment", "neutral", "contradiction"), load_anli, "anli_v1.0/R*/{dev,test}.jsonl"),
    CMETask("qqp", "accuracy", 8, ("duplicate", "not duplicate"), load_qqp, "GLUE QQP/{train,dev,test}.tsv"),
    CMETask("rte", "accuracy", 8, ("entailment", "not entailment"), load_rte, "GLUE RTE/{train,dev,test}.tsv"),
    CMETask("winogrande", "accuracy", 4, ("A", "B"), load_winogrande, "winogrande_1.1/{train_*,dev,test}.jsonl"),
    CMETask("arc", "accuracy", 4, tuple("ABCDE"), load_arc, "ARC-V1-Feb2018/ARC-*/ARC-*-{Train,Dev,Test}.jsonl"),
    CMETask("mmlu", "accuracy", 4, tuple("ABCD"), load_mmlu, "data/{dev,test}/<subject>_<split>.csv"),
    CMETask("webqa", "exact_match", 64, None, load_webqa, "WebQA.v1.0/*.ann.json or webquestions.examples.*.json"),
    CMETask("nq", "exact_match", 32, None, load_nq, "nq_open/NQ-open.{train,dev}.jsonl"),
    CMETask("triviaqa", "exact_match", 32, None, load_triviaqa, "triviaqa-rc/qa/*.json"),
]}


def _write_atomic(path, content):
    """Write text or bytes under a temporary name, then rename: a half-written file never looks complete."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        f.write(content.encode("utf-8") if isinstance(content, str) else content)
    os.replace(path + ".tmp", path)


def _jsonl_text(records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_eval_set(task_name, raw_path, out_path, limit=None):
    """Load a CME task's raw file (a path, or a list of them, e.g. ANLI's three rounds) and write an
    evaluation set in the official format: a JSON list for .json, JSON lines for .jsonl. Returns
    the number of records written."""
    if task_name not in CME_TASKS:
        raise ValueError(f"unknown task {task_name!r}; choose one of {', '.join(CME_TASKS)}.")
    if not out_path.endswith((".json", ".jsonl")):
        raise ValueError(f"{out_path} must end in .json (a JSON list) or .jsonl (one record per line).")
    paths = [raw_path] if isinstance(raw_path, (str, os.PathLike)) else list(raw_path)
    records = [r for p in paths for r in CME_TASKS[task_name].load(str(p))]
    unlabelled = sum(r["output"] is None for r in records)
    if unlabelled:
        raise ValueError(f"{unlabelled} of {len(records)} records in {', '.join(map(str, paths))} have no label "
                         "(a test split without answers?); build the evaluation set from a labelled split such as dev.")
    records = records[:limit] if limit else records
    text = _jsonl_text(records) if out_path.endswith(".jsonl") else json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    _write_atomic(out_path, text)
    return len(records)


def main_eval_set(argv=None):
    """python data.py eval_set --task NAME --raw PATH [PATH ...] --out FILE.json[l] [--limit N]"""
    parser = argparse.ArgumentParser(prog="data.py eval_set", description="Write a CME evaluation set in the "
                                     "official record format from a task's raw files.")
    parser.add_argument("--task", required=True, choices=list(CME_TASKS))
    parser.add_argument("--raw", required=True, nargs="+", help="the task's raw file(s), or aclImdb's split folder")
    parser.add_argument("--out", required=True, help="output: .json (a list) or .jsonl")
    parser.add_argument("--limit", type=int, default=None, help="keep the first N records")
    args = parser.parse_args(argv)
    try:
        n = write_eval_set(args.task, args.raw, args.out, args.limit)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {n} {args.task} records to {args.out}")


# -----------------------------------------------------------------------------
# mini-CME: a synthetic multi-task suite over an invented world (cities, people, films) whose
# facts only its corpus teaches. Like the CME's 22 sources, the tasks share inputs: fact sentences
# feed the corpus, NLI premises and reviews; one set of questions feeds closed-book QA, multiple
# choice and paraphrase pairs; opinion sentences feed reviews and posts; letters answer both
# multiple choice and fill-the-blank. Each task answers in its own convention (label words,
# letters, "duplicate", a name, a sentence): one low-rank adapter has to juggle them all, which
# is what separate experts can win on.

N_CITIES, N_PEOPLE, N_DIRECTORS, N_FILMS = 40, 100, 20, 60
HELD_OUT = 0.3  # share of facts that only corpus.txt states: the QA and choice test sets ask these
GENRES = ["drama", "comedy", "western", "thriller", "musical", "documentary", "romance", "horror", "mystery", "fantasy"]
JOBS = {"film director": "spends long days on film sets", "painter": "mixes colours all day",
        "sailor": "spends weeks at sea", "doctor": "treats sick people", "teacher": "marks homework every evening",
        "baker": "gets up before dawn to bake bread", "singer": "warms up before every concert",
        "farmer": "watches the sky for rain", "pilot": "flies across the country",
        "lawyer": "argues cases in court", "carpenter": "builds tables and chairs"}
PASTIMES = {"chess": "studies chess openings", "fishing": "owns many fishing rods", "gardening": "grows tomatoes",
            "cycling": "rides a bike everywhere", "knitting": "knits scarves for friends",
            "swimming": "goes to the pool every morning", "rowing": "rows on the lake at dawn",
            "hiking": "owns good walking boots"}
PRODUCTS = ["glass", "silk", "cheese", "clocks", "wine", "paper", "honey", "salt", "lamps", "carpets"]
TITLE_WORDS = ("Silver Last Hidden Broken Golden Quiet Burning Frozen Lonely Secret Distant Crimson".split(),
               "Harbor Lantern Winter Garden River Crown Mirror Road Island Letter Tower Promise".split())
SYLLABLES = "ba be bi bo da de di do ka ke ki ko la le li lo ma me mi mo na ne ni no ra re ri ro sa se si so " \
            "ta te ti to va ve vi vo".split()

# kind -> attribute -> (statements, questions). Statements appear in the corpus and in task inputs;
# questions never appear in the corpus, so QA must link two phrasings of one fact.
ATTRS = {
    "film": {
        "director": (["{e} was directed by {v}.", "{v} directed {e}.", "{v} is the director of {e}."],
                     ["Who directed {e}?", "who is the director of {e}", "Which filmmaker made {e}?"]),
        "year": (["{e} came out in {v}.", "{e} was released in {v}.", "{e} first reached cinemas in {v}."],
                 ["When was {e} released?", "In what year did {e} come out?", "what year did {e} come out"]),
        "genre": (["{e} is a {v}.", "{e} belongs to the {v} genre."], ["What genre is {e}?", "What kind of film is {e}?"]),
        "city": (["{e} was filmed in {v}.", "The cameras for {e} rolled in {v}.", "{e} was shot on location in {v}."],
                 ["Where was {e} filmed?", "In which city was {e} shot?"])},
    "person": {
        "city": (["{e} comes from {v}.", "{e} was born in {v}.", "{v} is the home town of {e}."],
                 ["Where does {e} come from?", "What is the home town of {e}?", "where was {e} born"]),
        "job": (["{e} works as a {v}.", "{e} earns a living as a {v}.", "By trade, {e} is a {v}."],
                ["What does {e} do for a living?", "What is the job of {e}?"]),
        "pastime": (["The favourite pastime of {e} is {v}.", "Of all pastimes, {e} likes {v} best."],
                    ["What is the favourite pastime of {e}?", "Which pastime does {e} like best?"])},
    "city": {
        "region": (["{e} is a city in {v}.", "{e} lies in the region of {v}."],
                   ["In which region is {e}?", "Where is {e} located?"]),
        "river": (["The {v} river flows through {e}.", "{e} stands on the banks of the {v}."],
                  ["Which river flows through {e}?", "What river is {e} on?"]),
        "product": (["{e} is known for its {v}.", "The {v} of {e} is famous across the land."],
                    ["What is {e} known for?", "What is {e} famous for?"])},
}


def _aliases(attr, v):
    """The answers exact match accepts for a fact; the first is the record's output."""
    return {"director": [v, v.split()[-1]], "river": [v, f"{v} river"], "genre": [v, f"{v} film"]}.get(attr, [v])


def _invent(rng, n, taken):
    """n new made-up names, so that no fact can be known from anywhere but the corpus."""
    out = []
    while len(out) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize() + rng.choice(("", "n", "s"))
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def build_world(seed):
    """The entities (dicts of attributes), the facts held out of every task input, and the pools
    that wrong answers are drawn from."""
    rng, taken = random.Random(f"world-{seed}"), set()
    regions, rivers = _invent(rng, 6, taken), _invent(rng, 20, taken)
    cities = [{"kind": "city", "name": c, "region": rng.choice(regions), "river": rng.choice(rivers),
               "product": rng.choice(PRODUCTS)} for c in _invent(rng, N_CITIES, taken)]
    city_names = [c["name"] for c in cities]
    names = zip(_invent(rng, N_PEOPLE, taken), _invent(rng, N_PEOPLE, taken))
    people = [{"kind": "person", "name": f"{first} {last}", "city": rng.choice(city_names),
               "job": "film director" if i < N_DIRECTORS else rng.choice(list(JOBS)[1:]),
               "pastime": rng.choice(list(PASTIMES))} for i, (first, last) in enumerate(names)]
    titles = rng.sample([f"The {a} {b}" for a in TITLE_WORDS[0] for b in TITLE_WORDS[1]], N_FILMS)
    films = [{"kind": "film", "name": t, "director": people[i % N_DIRECTORS]["name"], "genre": rng.choice(GENRES),
              "year": str(rng.randint(1950, 2020)), "city": rng.choice(city_names)} for i, t in enumerate(titles)]
    entities = cities + people + films
    facts = [(e["name"], a) for e in entities for a in ATTRS[e["kind"]]]
    rng.shuffle(facts)
    held = facts[:int(HELD_OUT * len(facts))]
    pools = {"director": [p["name"] for p in people[:N_DIRECTORS]], "year": [str(y) for y in range(1950, 2021)],
             "genre": GENRES, "city": city_names, "job": list(JOBS), "pastime": list(PASTIMES), "region": regions,
             "river": rivers, "product": PRODUCTS}
    return {"entities": entities, "films": films, "cities": city_names, "by_name": {e["name"]: e for e in entities},
            "held": set(held), "facts": {"train": facts[len(held):], "val": held, "test": held}, "pools": pools,
            "story_names": _invent(rng, 40, taken)}  # first names for posts and blanks, never world people


def _statements(e, attr, v=None):
    return [t.format(e=e["name"], v=e[attr] if v is None else v) for t in ATTRS[e["kind"]][attr][0]]


def _questions(e, attr):
    return [t.format(e=e["name"]) for t in ATTRS[e["kind"]][attr][1]]


def _stated(w, e):
    """The attributes of e that task inputs may state (held-out facts live in the corpus only)."""
    return [a for a in ATTRS[e["kind"]] if (e["name"], a) not in w["held"]]


ASPECTS = ["acting", "story", "music", "ending", "camera work", "dialogue", "pacing", "cast"]
GOOD, BAD = "wonderful brilliant moving superb charming clever".split(), "dull awful clumsy boring weak silly".split()
OPENINGS = ["I watched {} last night.", "My friends dragged me to {}.", "I finally caught {} on television."]
FEELINGS = (["The people here are friendly.", "I already love my new street.", "Work has been exciting so far."],
            ["I do not know anyone here yet.", "Most evenings I sit alone in my flat.", "I miss my old friends a lot."])
FILLERS = ["The tickets were expensive.", "It rained the whole week.", "My phone broke on the way home."]
CLOSINGS = ["Am I overthinking this?", "Has anyone else felt this way?", "Any advice would be appreciated."]


def _opinions(rng, positive):
    """Three opinion sentences on different aspects, two or three of them with the given polarity."""
    polarities = [positive] * rng.choice((2, 3))
    polarities += [not positive] * (3 - len(polarities))
    rng.shuffle(polarities)
    out = []
    for p, a in zip(polarities, rng.sample(ASPECTS, 3)):
        good, bad = rng.choice(GOOD), rng.choice(BAD)
        out.append(rng.choice([f"The {a} was {good}.", f"I loved the {a}.", f"The {a} was not {bad} at all."] if p
                              else [f"The {a} was {bad}.", f"I could not stand the {a}.", f"The {a} was not {good}."]))
    return out


def _review(w, rng, positive):
    film = rng.choice(w["films"])
    text = rng.choice(OPENINGS).format(film["name"])
    if _stated(w, film):
        text += " " + rng.choice(_statements(film, rng.choice(_stated(w, film))))
    return text + rng.choice([" ", " ", "<br /><br />"]) + " ".join(_opinions(rng, positive))  # IMDB's <br /> tags


def _post(w, rng, positive):
    """A TL;DR-like first-person post and its reference summary."""
    if rng.random() < 0.5:
        film, rel = rng.choice(w["films"]), rng.choice(["friend", "sister", "brother", "cousin"])
        city = rng.choice([c for c in w["cities"] if c != film["city"]])  # no hint where the film was shot
        post = (f"Last {rng.choice(['Monday', 'Friday', 'Sunday'])} I went to see {film['name']} with my {rel} "
                f"{rng.choice(w['story_names'])} in {city}. " + " ".join(_opinions(rng, positive)))
        summary = f"Saw {film['name']} with my {rel} in {city} and {'loved it' if positive else 'did not like it'}."
    else:
        (a, b), job = rng.sample(w["cities"], 2), rng.choice(list(JOBS))
        post = (f"I ({rng.randint(19, 45)}{rng.choice('mf')}) just moved from {a} to {b} to start a job as a {job}. "
                + " ".join(rng.sample(FEELINGS[0 if positive else 1], 2)))
        summary = f"Moved from {a} to {b} for a {job} job and {'love it so far' if positive else 'feel lonely'}."
    return f"{post} {rng.choice(FILLERS)} {rng.choice(CLOSINGS)}", summary


# One generator per task: (world, rng, index, split) -> record; the index balances the labels.

def gen_sentiment(w, rng, i, split):
    positive = i % 2 == 0
    return make_record("sentiment", "positive" if positive else "negative", rng.choice(TEMPLATES["sentiment"][0]),
                       text=_review(w, rng, positive))


def gen_nli(w, rng, i, split):
    """Entailment restates a premise fact in other words, contradiction changes its value, neutral
    speaks of an attribute the premise does not mention."""
    label = ("entailment", "neutral", "contradiction")[i % 3]
    e = rng.choice([x for x in w["entities"] if len(_stated(w, x)) >= 2])
    premise_attrs = rng.sample(_stated(w, e), 2)
    sentences = [rng.choice(_statements(e, a)) for a in premise_attrs]
    other = rng.choice(w["entities"])
    if other is not e and _stated(w, other) and rng.random() < 0.5:  # a distractor, as in ANLI's long contexts
        sentences.insert(rng.randrange(3), rng.choice(_statements(other, rng.choice(_stated(w, other)))))
    if label == "neutral":  # any value, but never a held-out fact's true one
        attr = rng.choice([a for a in ATTRS[e["kind"]] if a not in premise_attrs])
        value = rng.choice([v for v in w["pools"][attr] if not (v == e[attr] and (e["name"], attr) in w["held"])])
    else:
        attr = rng.choice(premise_attrs)
        value = e[attr] if label == "entailment" else rng.choice([v for v in w["pools"][attr] if v != e[attr]])
    hypothesis = rng.choice([s for s in _statements(e, attr, value) if s not in sentences])
    return make_record("nli", label, rng.choice(TEMPLATES["nli"][0]), premise=" ".join(sentences), hypothesis=hypothesis)


def gen_paraphrase(w, rng, i, split):
    duplicate = i % 2 == 0
    e = rng.choice(w["entities"])
    attr = rng.choice(list(ATTRS[e["kind"]]))
    q1, q2 = rng.sample(_questions(e, attr), 2)
    if not duplicate and rng.random() < 0.5:  # same entity, another attribute
        q2 = rng.choice(_questions(e, rng.choice([a for a in ATTRS[e["kind"]] if a != attr])))
    elif not duplicate:  # same attribute, another entity
        q2 = rng.choice(_questions(rng.choice([x for x in w["entities"] if x["kind"] == e["kind"] and x is not e]), attr))
    return make_record("paraphrase", "duplicate" if duplicate else "not duplicate",
                       rng.choice(TEMPLATES["paraphrase"][0]), text1=q1, text2=q2)


def gen_choice(w, rng, i, split):
    name, attr = rng.choice(w["facts"][split])
    e, position = w["by_name"][name], i % 4
    options = rng.sample([v for v in w["pools"][attr] if v != e[attr]], 3)
    options.insert(position, e[attr])
    return make_record("choice", LETTERS[position], question=rng.choice(_questions(e, attr)), options=options)


def gen_blank(w, rng, i, split):
    """WinoGrande-like: whom does the blank stand for? The names come from outside the world."""
    names, kind = rng.sample(w["story_names"], 2), rng.choice(("job", "pastime", "city"))
    values = rng.sample(w["cities"] if kind == "city" else list(JOBS if kind == "job" else PASTIMES), 2)
    target = rng.randrange(2)
    clue = f"knows the streets of {values[target]} better" if kind == "city" else {**JOBS, **PASTIMES}[values[target]]
    first = {"job": "{} is a {} and {} is a {}", "pastime": "{} loves {} while {} prefers {}",
             "city": "{} grew up in {} but {} grew up in {}"}[kind].format(names[0], values[0], names[1], values[1])
    answer = "AB"[i % 2]
    options = [names[target], names[1 - target]] if answer == "A" else [names[1 - target], names[target]]
    return make_record("blank", answer, rng.choice(TEMPLATES["blank"][0]), sentence=f"{first}, so _ {clue}.",
                       option1=options[0], option2=options[1])


def gen_qa(w, rng, i, split):
    name, attr = rng.choice(w["facts"][split])
    e = w["by_name"][name]
    return qa_record(rng.choice(_questions(e, attr)), _aliases(attr, e[attr]))


def gen_summary(w, rng, i, split):
    post, summary = _post(w, rng, rng.random() < 0.5)
    return make_record("summary", summary, rng.choice(TEMPLATES["summary"][0]), text=post)


SYNTHETIC_TASKS = {t.name: t for t in [
    Task("sentiment", "accuracy", 8, ("positive", "negative")),
    Task("nli", "accuracy", 8, ("entailment", "neutral", "contradiction")),
    Task("paraphrase", "accuracy", 8, ("duplicate", "not duplicate")),
    Task("choice", "accuracy", 4, ("A", "B", "C", "D")),
    Task("blank", "accuracy", 4, ("A", "B")),
    Task("qa", "exact_match", 16),
    Task("summary", "rouge_l", 48),
]}
_GENERATORS = {"sentiment": gen_sentiment, "nli": gen_nli, "paraphrase": gen_paraphrase, "choice": gen_choice,
               "blank": gen_blank, "qa": gen_qa, "summary": gen_summary}


def _corpus(w, rng, n_docs):
    """Plain-text documents: half are encyclopedia entries stating every fact of one entity (each
    entity several times, in varied words), half are reviews and posts."""
    docs = []
    for j in range(n_docs // 2):
        e = w["entities"][j % len(w["entities"])]
        facts = [rng.choice(_statements(e, a)) for a in ATTRS[e["kind"]]]
        rng.shuffle(facts)
        if e["kind"] == "person":
            facts.append(f"As a {e['job']}, {e['name'].split()[0]} {JOBS[e['job']]}.")
        docs.append(" ".join(facts))
    for j in range(n_docs - len(docs)):
        docs.append(_review(w, rng, rng.random() < 0.5) if j % 2 else _post(w, rng, rng.random() < 0.5)[0])
    rng.shuffle(docs)
    return docs


def _train_tokenizer(lines, vocab_size):
    """A LLaMA-like SentencePiece model: BPE, byte fallback (no text is unknown), split digits, no
    normalisation, unk=0 bos=1 eos=2 and no pad id. One thread keeps the result deterministic."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, split_digits=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece could not build {vocab_size} pieces ({e}); lower vocab_size or raise "
                         "corpus_docs.") from None
    return model.getvalue()


def make_suite(out_dir, seed=0, n_train_per_task=1500, n_test_per_task=150, n_val_per_task=20, corpus_docs=2000,
               vocab_size=2000):
    """Write mini-CME to out_dir and return its summary:
        train.jsonl         every task's training records, shuffled: the official format plus "task"
        val.jsonl           the same, small (with "answers" for QA)
        test/<task>.jsonl   one evaluation set per task (with "answers" for QA)
        corpus.txt          pretraining text for a tiny base model, documents separated by blank lines
        tokenizer.model     SentencePiece, trained on the corpus and the training records
        suite.json          the summary, written last: its presence means the suite is complete
    The same seed gives byte-identical files. QA and choice test sets ask facts that only corpus.txt
    states; no val or test prompt repeats another prompt of the suite."""
    w = build_world(seed)
    if corpus_docs < 2 * len(w["entities"]):
        raise ValueError(f"corpus_docs={corpus_docs} is too small; use at least {2 * len(w['entities'])} so that "
                         "every entity's facts reach the corpus.")
    if os.path.exists(os.path.join(out_dir, "suite.json")):
        os.remove(os.path.join(out_dir, "suite.json"))  # a rebuild cut short must not look complete
    sizes = {"train": n_train_per_task, "val": n_val_per_task, "test": n_test_per_task}
    data = {split: {} for split in sizes}
    for name, generate in _GENERATORS.items():
        seen = set()
        for split, n in sizes.items():
            rng, records = random.Random(f"{seed}-{name}-{split}"), []
            for i in range(n):
                for _ in range(100):  # retry a prompt seen before; a tiny world may run out of new ones
                    record = generate(w, rng, i, split)
                    if split == "train" or (record["instruction"], record["input"]) not in seen:
                        break
                seen.add((record["instruction"], record["input"]))
                records.append(record)
            data[split][name] = records
    train = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"], "task": name}
             for name, records in data["train"].items() for r in records]
    val = [{**r, "task": name} for name, records in data["val"].items() for r in records]
    random.Random(f"{seed}-mix").shuffle(train)
    random.Random(f"{seed}-mix-val").shuffle(val)
    docs = _corpus(w, random.Random(f"{seed}-corpus"), corpus_docs)
    texts = docs + [line for r in train for field in ("instruction", "input", "output") for line in r[field].split("\n")]
    tokenizer = _train_tokenizer([t for t in texts if t], vocab_size)

    for name, records in data["test"].items():
        _write_atomic(os.path.join(out_dir, "test", f"{name}.jsonl"), _jsonl_text(records))
    _write_atomic(os.path.join(out_dir, "train.jsonl"), _jsonl_text(train))
    _write_atomic(os.path.join(out_dir, "val.jsonl"), _jsonl_text(val))
    _write_atomic(os.path.join(out_dir, "corpus.txt"), "\n\n".join(docs) + "\n")
    _write_atomic(os.path.join(out_dir, "tokenizer.model"), tokenizer)
    summary = {"seed": seed, "vocab_size": vocab_size, "corpus_docs": len(docs), "corpus_chars": sum(map(len, docs)),
               "entities": len(w["entities"]), "held_out_facts": len(w["held"]), "train": len(train), "val": len(val),
               "tasks": {name: {"metric": t.metric, "max_new_tokens": t.max_new_tokens,
                                "labels": t.labels and list(t.labels), **{s: len(data[s][name]) for s in sizes}}
                         for name, t in SYNTHETIC_TASKS.items()}}
    _write_atomic(os.path.join(out_dir, "suite.json"), json.dumps(summary, indent=1) + "\n")
    return summary
