"""
mini-CME: a seeded synthetic multi-task suite for CPU runs, and the built-in demo's data and base.

    python minicme.py --out data/mini_cme --seed 0

The suite is a synthetic multi-task suite over an invented world (cities, people, films) whose
facts only its corpus teaches. Like the CME's 22 sources, the tasks share inputs: fact sentences
feed the corpus, NLI premises and reviews; one set of questions feeds closed-book QA, multiple
choice and paraphrase pairs; opinion sentences feed reviews and posts; letters answer both
multiple choice and fill-the-blank. Each task answers in its own convention (label words,
letters, "duplicate", a name, a sentence): one low-rank adapter has to juggle them all, which
is what separate experts can win on.

Each classification task mixes items that a word or phrase of the input decides (a negation, a
near-miss question, a consequence, a year among names) with items that need the input read as
a whole (a changed value, another entity's name, options out of order, the fact itself): a
4M-parameter base fine-tuned for a few minutes learns the first kind, so every method rises above
chance, and the second kind leaves headroom to rank them. Multiple choice decides from the question
in its forms (options listed in a fixed order of kinds); reading a letter off a list, which the rest
of its items need, nothing learns at this scale (see RESULTS.md).

make_suite() writes the suite (records in the authors' format, a pretraining corpus, a SentencePiece
model); build_demo_data() makes whatever of the demo's files a train.py configuration uses and
lacks, and says how to pretrain its base (train.py runs that, before its fine-tuning run).
"""
if __name__ == "__main__":  # before the imports: see errors.start_script (closed streams, Ctrl-C while importing)
    import errors
    errors.start_script()

import io
import json
import os
import random
import re
import sys

import sentencepiece as spm

from data import UserError, check_made_with, prepare, read_summary, write_jsonl
from errors import Parser, exit_with, run_script
from files import (
    LOCK,
    blocked_parent,
    file_sha256,
    flag_path,
    hold,
    let_go,
    read_json,
    remove_stale_temporaries,
    write_atomic,
)
from tasks import LETTERS, TEMPLATES, Task, make_record, qa_record
from tokenizer import Tokenizer

N_CITIES, N_PEOPLE, N_DIRECTORS, N_FILMS = 40, 100, 20, 60
VOCAB_SIZE = 2000  # the suite's tokenizer: SentencePiece makes exactly this many pieces, or refuses
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
        "genre": (["{e} is a {v}.", "{e} belongs to the {v} genre."],
                  ["What genre is {e}?", "What kind of film is {e}?"]),
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
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        name += rng.choice(("", "n", "s"))
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
            "values": {e["name"]: frozenset(e[a] for a in ATTRS[e["kind"]]) for e in entities},  # for _facts
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


# WinoGrande-style twin sentences: a comparison and a consequence; the consequence (the twins'
# trigger) decides whom the blank means. (comparison, what the one with more does, what the other does)
COMPARISONS = [("taller", "could reach the top shelf", "needed a ladder"),
               ("stronger", "carried the heavy box alone", "asked for help with the box"),
               ("older", "remembered the old bridge", "was born after the old bridge fell"),
               ("richer", "paid for the whole dinner", "could not afford the dinner"),
               ("faster", "won the race", "came last in the race"),
               ("louder", "woke up the neighbours", "was never heard in class")]
EXTRAS = {"film": ["{e} won a prize at a festival.", "{e} was very expensive to make.", "{e} has a sequel."],
          "person": ["{e} has two brothers.", "{e} owns a red car.", "{e} speaks three languages."],
          "city": ["{e} has a famous old bridge.", "{e} is crowded in summer.", "{e} has a large airport."]}


def _compare(rng, a, b):
    """(sentence with a blank, the person the blank means): "a is taller than b, so _ needed a ladder"."""
    word, does_more, does_less = rng.choice(COMPARISONS)
    consequence = rng.choice((does_more, does_less))
    return f"{a} is {word} than {b}, so _ {consequence}.", a if consequence == does_more else b


def _not(statement):
    return f"It is not true that {statement[0].lower()}{statement[1:]}" if statement.startswith("The ") else \
        f"It is not true that {statement}"


# One generator per task: (world, rng, index, split) -> record; the index balances the labels.

def gen_sentiment(w, rng, i, split):
    positive = i % 2 == 0
    return make_record("sentiment", "positive" if positive else "negative", rng.choice(TEMPLATES["sentiment"][0]),
                       text=_review(w, rng, positive))


def gen_nli(w, rng, i, split):
    """Entailment restates a premise fact in other words. Half the contradictions negate a premise
    fact and half change its value; half the neutral hypotheses add something the world never
    records and half speak of an attribute the premise does not mention. Negations and additions
    show in the hypothesis's own words; the other half needs the premise."""
    label = ("entailment", "neutral", "contradiction")[i % 3]
    e = rng.choice([x for x in w["entities"] if len(_stated(w, x)) >= 2])
    premise_attrs = rng.sample(_stated(w, e), 2)
    sentences = [rng.choice(_statements(e, a)) for a in premise_attrs]
    other, distractor = rng.choice(w["entities"]), None
    if other is not e and _stated(w, other) and rng.random() < 0.5:  # a distractor, as in ANLI's long contexts
        at, distractor = rng.randrange(3), rng.choice(_statements(other, rng.choice(_stated(w, other))))
    shallow = rng.random() < 0.5
    if label == "neutral" and shallow:
        hypothesis = rng.choice(EXTRAS[e["kind"]]).format(e=e["name"])
    elif label == "neutral":  # any value, but never a held-out fact's true one
        attr = rng.choice([a for a in ATTRS[e["kind"]] if a not in premise_attrs])
        value = rng.choice([v for v in w["pools"][attr] if not (v == e[attr] and (e["name"], attr) in w["held"])])
        hypothesis = rng.choice(_statements(e, attr, value))
    else:
        attr = rng.choice(premise_attrs)
        value = e[attr] if label == "entailment" or shallow else rng.choice([v for v in w["pools"][attr]
                                                                              if v != e[attr]])
        hypothesis = rng.choice([s for s in _statements(e, attr, value) if s not in sentences])
        if label == "contradiction" and shallow:
            hypothesis = _not(hypothesis)
    # "F was directed by P" tells P's job: a neutral hypothesis on that job would be entailed or contradicted
    if distractor and not (label == "neutral" and not shallow and attr == "job" and e["name"] in distractor):
        sentences.insert(at, distractor)
    return make_record("nli", label, rng.choice(TEMPLATES["nli"][0]), premise=" ".join(sentences),
                       hypothesis=hypothesis)


# questions on what the world never records: a near miss of a real question (QQP's typical
# non-duplicate asks something else about the same thing)
NEAR_MISSES = {"film": ["Who wrote the music for {e}?", "How long is {e}?", "Who starred in {e}?",
                        "Is {e} worth watching?"],
               "person": ["How old is {e}?", "Is {e} married?", "What car does {e} drive?", "Where does {e} live now?"],
               "city": ["How many people live in {e}?", "What is the weather like in {e}?",
                        "Is {e} a safe place to visit?", "How old is {e}?"]}


NEAR_MISS_SHARE = 0.8  # of the non-duplicates; the rest ask the same thing of another entity


def gen_paraphrase(w, rng, i, split):
    """Two questions: a duplicate asks the same thing in other words. Of the non-duplicates, four
    in five ask a near miss about the same entity (something the world does not record) and one in
    five the same thing about another entity (only the names differ)."""
    duplicate = i % 2 == 0
    e = rng.choice(w["entities"])
    attr = rng.choice(list(ATTRS[e["kind"]]))
    q1, q2 = rng.sample(_questions(e, attr), 2)
    if not duplicate and rng.random() < NEAR_MISS_SHARE:
        q2 = rng.choice(NEAR_MISSES[e["kind"]]).format(e=e["name"])
    elif not duplicate:
        other = rng.choice([x for x in w["entities"] if x["kind"] == e["kind"] and x is not e])
        q2 = rng.choice([q for q in _questions(other, attr) if q.replace(other["name"], e["name"]) != q1])
    return make_record("paraphrase", "duplicate" if duplicate else "not duplicate",
                       rng.choice(TEMPLATES["paraphrase"][0]), text1=q1, text2=q2)


# answer kinds that look alike (invented one-word names) form one group: choice's type-only
# distractors come from other groups
KIND_GROUPS = [("director",), ("year",), ("genre",), ("city", "region", "river"), ("job",), ("pastime",),
               ("product",)]


def _facts(w, name):
    return w["values"].get(name, frozenset())


def _hints(w, v, others):
    """Whether option v and the question's entity, answer or other options would hint at a fact
    (one is a value of another's: a director or a city is an entity too)."""
    return any(v in _facts(w, x) or x in _facts(w, v) for x in others)


# a form's four slots, in order: a person, a year, a place, a thing (the kinds of answer facts have)
SLOTS = [("director",), ("year",), ("city", "region", "river"), ("genre", "job", "pastime", "product")]
FORM_SHARE, OTHER_KIND_SHARE = 0.6, 0.1  # the rest (0.3) have wrong options of the right kind


def gen_choice(w, rng, i, split):
    """A fact's question and four options, the right one at letter i % 4. Six items in ten are
    forms: one option of each slot's kind, listed in the slots' order (a person, a year, a place,
    a thing), so the question's kind decides the letter. One in ten lists options of other kinds
    in a random order (the letter has to be read off the list), and three in ten list options of
    the right kind (knowing the fact decides, and the letter has to be read off the list)."""
    position, draw = i % 4, rng.random()
    while True:  # a form whose slot has no option that keeps clear of the fact (a director's job) is redrawn
        if draw < FORM_SHARE:
            name, attr = rng.choice([f for f in w["facts"][split] if f[1] in SLOTS[position]])
        else:
            name, attr = rng.choice(w["facts"][split])
        e = w["by_name"][name]
        if draw >= FORM_SHARE + OTHER_KIND_SHARE:
            options = rng.sample([v for v in w["pools"][attr] if v != e[attr]], 3)
            break
        groups = [g for g in SLOTS if attr not in g] if draw < FORM_SHARE else \
            rng.sample([g for g in KIND_GROUPS if attr not in g], 6)
        options = []
        for group in groups:
            pool = [v for k in group for v in w["pools"][k] if not _hints(w, v, [e["name"], e[attr], *options])]
            options += [rng.choice(pool)] if pool and len(options) < 3 else []
        if len(options) == 3:
            break
    options.insert(position, e[attr])
    return make_record("choice", LETTERS[position], question=rng.choice(_questions(e, attr)), options=options)


def gen_blank(w, rng, i, split):
    """WinoGrande-like twins: "Ana is taller than Bo, so _ needed a ladder." The consequence decides
    whom the blank means; 15% of items list the options out of the sentence's order. The names come
    from outside the world."""
    a, b = rng.sample(w["story_names"], 2)
    while True:
        sentence, meant = _compare(rng, a, b)
        options = [a, b] if rng.random() < 0.85 else [b, a]
        answer = "AB"[options.index(meant)]
        if answer == "AB"[i % 2]:
            break
    return make_record("blank", answer, rng.choice(TEMPLATES["blank"][0]), sentence=sentence,
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


VERDICTS = (["All in all, I liked it.", "I would happily watch it again.", "Well worth a ticket."],
            ["All in all, I did not like it.", "I would not watch it again.", "Not worth a ticket."])


def _story(w, rng):
    """A comparison and its consequence, the blank task's skill in plain words. It names world
    people, never the story names that the blank task uses, so no test answer is written here."""
    a, b = (p["name"].split()[0] for p in rng.sample(w["entities"][N_CITIES:N_CITIES + N_PEOPLE], 2))
    sentence, meant = _compare(rng, a, b)
    return sentence.replace("_", meant)


def _reasoning(w, rng):
    """A fact restated in other words, or a false claim corrected: the NLI and paraphrase skills
    in plain words (statements only: the QA questions' wording never reaches the corpus)."""
    e = rng.choice(w["entities"])
    attr = rng.choice(list(ATTRS[e["kind"]]))
    s1, s2 = rng.sample(_statements(e, attr), 2)
    if rng.random() < 0.5:
        return f"{s1} In other words: {s2}"
    wrong = rng.choice([v for v in w["pools"][attr] if v != e[attr]])
    return f"Some say that {rng.choice(_statements(e, attr, wrong))} That is wrong. {s1}"


# Ordinary prose that uses the tasks' label words and letters, as any real corpus does. Without it
# the base never sees those tokens, pretraining pushes their logits far down everywhere, and only
# full fine-tuning (which retrains the output embedding) can lift them: adapters could not.
USAGE = ["Plan A was to take the train, and plan B was to walk.", "The flat has rooms A, B, C and D.",
         "{p} got an A in history and a B in maths.", "Gate C is closed today, so please use gate D.",
         "Vitamin C is good for you, and so is vitamin D.", "The bus goes from stop A to stop B.",
         "The critics were positive about {f}.", "Reviews of {f} were mostly negative.",
         "{p} stayed neutral in the argument.", "The blood test came back negative.",
         "{p} is always positive in the morning.", "The clerk threw away the duplicate of the letter.",
         "{p} keeps a duplicate key under the mat.", "What {p} said was a contradiction of what {q} wrote.",
         "The two reports are in contradiction.", "The logic class covered entailment and proof.",
         "In the exam on entailment, {p} did well.", "The colour of the wall is a neutral grey.",
         "A fact is not duplicate news.", "The answer was positive, not negative."]


def _usage(w, rng):
    people = [p["name"] for p in w["entities"][N_CITIES:N_CITIES + N_PEOPLE]]
    return " ".join(s.format(p=rng.choice(people), q=rng.choice(people), f=rng.choice(w["films"])["name"])
                    for s in rng.sample(USAGE, 3))


def _corpus(w, rng, n_docs):
    """Plain-text documents, the kind of text a base model is pretrained on: half are encyclopedia
    entries stating every fact of one entity (each entity several times, in varied words); a
    quarter are reviews and posts, ending the way such text does (a verdict, a "TL;DR:" line); a
    quarter are plain prose: a comparison and its consequence, a fact restated or a false claim
    corrected, and sentences that use the label words and letters in their everyday senses. The
    tasks' instructions, questions and answers never appear: the base learns the skills, and
    instruction tuning has to map them onto each task's format."""
    docs = []
    for j in range(n_docs // 2):
        e = w["entities"][j % len(w["entities"])]
        facts = [rng.choice(_statements(e, a)) for a in ATTRS[e["kind"]]]
        rng.shuffle(facts)
        if e["kind"] == "person":
            facts.append(f"As a {e['job']}, {e['name'].split()[0]} {JOBS[e['job']]}.")
        docs.append(" ".join(facts))
    for j in range(n_docs // 4):
        positive = rng.random() < 0.5
        if j % 2:
            docs.append(f"{_review(w, rng, positive)} {rng.choice(VERDICTS[0 if positive else 1])}")
        else:
            post, summary = _post(w, rng, positive)
            docs.append(f"{post} TL;DR: {summary}")
    for j in range(n_docs - len(docs)):
        docs.append((_story, _reasoning, _usage)[j % 3](w, rng))
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
        # byte fallback needs every character and byte as a piece besides unk, bos and eos: fewer is no vocabulary
        least = 3 + 256 + len(set().union(*lines))
        if vocab_size < least:
            raise UserError(f"vocab_size={vocab_size} is too small for the suite's text; use at least {least} (its "
                            "characters, the 256 bytes and 3 special pieces).") from None
        most = re.search(r"value <= (\d+)", str(e))  # SentencePiece names the most pieces this text has
        raise UserError(f"vocab_size={vocab_size} is more pieces than SentencePiece can find in the suite's text"
                        f"{f' (at most {most.group(1)})' if most else ''}; lower vocab_size or raise corpus_docs.") \
            from None
    return model.getvalue()


# each task's share of the training records, times n_train_per_task: the tasks that decide from a
# word or two of a long input get more, the summaries (many answer tokens each) and reviews fewer
TRAIN_WEIGHT = {"sentiment": 0.6, "nli": 1.6, "paraphrase": 1.6, "choice": 1.6, "blank": 1.6, "qa": 1.0, "summary": 0.3}


def _item(record):
    """What makes a record the item it is: the lines of its input (its instruction where it has none, as QA's),
    without their labels ("Text 1: "), in any order, case and spacing aside. The instruction is one of the task's
    phrasings, and two questions asked the other way round (or two options listed so) are still one item."""
    lines = (record["input"] or record["instruction"]).split("\n")
    return frozenset(" ".join(line.split(": ", 1)[-1].lower().split()) for line in lines)


class Busy(UserError):
    """make_suite's refusal of a folder that another build writes now (the demo passes it on as it stands)."""


class Unwritable(UserError):
    """The demo's refusal to build its files in a folder it can not write (train.py passes it on as it stands)."""


MAX_SIZE = 100_000  # records a task, corpus documents, pieces: far more than a world of 660 facts needs
VERSION = 2  # suite.json's; 1 (unnamed): val and test repeated training items under another phrasing
BUILDING = ".building"  # in a folder while make_suite writes it; suite.json replaces it at the end
SUITE_FILES = ("train.jsonl", "corpus.txt", "tokenizer.model", "suite.json", BUILDING)


def _check_out_dir(out_dir):
    """Refuse a folder that make_suite would spoil: a file, a finished suite (and what was built from
    it), or a folder of other files. A folder of a build cut short (BUILDING in it) is taken up again."""
    if not str(out_dir).strip():  # --out= was a bare "[Errno 2] No such file or directory: ''"
        raise UserError("--out is empty; give a folder for the suite, e.g. --out data/mini_cme.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} is a file, not a folder; choose another folder for the suite.")
    names = sorted(set(os.listdir(out_dir)) - {LOCK}) if os.path.isdir(out_dir) else []  # LOCK: a build held it
    if "suite.json" in names:
        raise UserError(f"{out_dir} already holds a mini-CME suite; choose another folder, or delete that one "
                        "(and what was built from it) to build it again.")
    # a build cut short leaves only what make_suite writes (and its temporaries, NAME.tmpPID): with anything else, a
    # BUILDING there is not ours to take up, and the user's train.jsonl would be written over
    others = [n for n in names if re.sub(r"\.tmp\d+$", "", n) not in (*SUITE_FILES, "val", "test")]
    if names and (BUILDING not in names or others):
        raise UserError(f"{out_dir} already holds files that are not a mini-CME suite "
                        f"({', '.join((others or names)[:3])}); choose a new or empty folder.")
    if blocked := blocked_parent(os.path.join(out_dir, BUILDING)):  # the folder, or the nearest one it is made in
        raise UserError(f"{out_dir} can not be written: {blocked}; choose another folder for the suite.")


def make_suite(out_dir, seed=0, n_train_per_task=1500, n_test_per_task=150, n_val_per_task=100, corpus_docs=6000,
               vocab_size=VOCAB_SIZE):
    """Write mini-CME to out_dir and return its summary:
        train.jsonl         every task's training records, shuffled: the official format plus "task"
        val/<task>.jsonl    one validation set per task, for choices (learning rates): never the test set
        test/<task>.jsonl   one evaluation set per task (with "answers" for QA), scored only in final runs
        corpus.txt          pretraining text for a tiny base model, documents separated by blank lines
        tokenizer.model     SentencePiece, trained on the corpus and the training records
        suite.json          the summary, written last: its presence means the suite is complete
    The same seed gives byte-identical files. QA and choice test sets ask facts that only corpus.txt
    states; no val or test record repeats the item of another record of the suite (_item: its input, whatever
    the instruction's phrasing or its lines' order): a val or test size the world has too few such items for is
    refused. A second build into out_dir while this one writes it is refused (files.hold: out_dir keeps the lock
    file, .lock)."""
    if type(seed) is not int:  # the world is drawn from the seed's text: 0.0 and True made other worlds than 0 and 1
        raise UserError(f"seed={seed!r} is not an integer; give the suite's seed as one, e.g. seed=0.")
    w = build_world(seed)
    if type(corpus_docs) is int and corpus_docs < 2 * len(w["entities"]):
        raise UserError(f"corpus_docs={corpus_docs} is too small; use at least {2 * len(w['entities'])} so that "
                         "every entity's facts reach the corpus.")
    for key, n in (("n_train_per_task", n_train_per_task), ("n_test_per_task", n_test_per_task),
                   ("n_val_per_task", n_val_per_task), ("vocab_size", vocab_size), ("corpus_docs", corpus_docs)):
        if type(n) is not int or n < 1:  # 0 wrote empty sets, which every later step refuses (or scores as nothing)
            raise UserError(f"{key}={n!r} is not a positive number; give each size as a positive integer.")
        if n > MAX_SIZE:  # a typo's extra zeros ran until the memory was full, with no message
            raise UserError(f"{key}={n} is more than mini-CME is made for; give at most {MAX_SIZE}.")
    _check_out_dir(out_dir)  # before the work; again below, once the folder is held
    # test before val: the test sets stay what they were when val was smaller
    sizes = {"train": n_train_per_task, "test": n_test_per_task, "val": n_val_per_task}
    data = {split: {} for split in sizes}
    for name, generate in _GENERATORS.items():
        seen = set()
        for split, n in sizes.items():
            rng, records = random.Random(f"{seed}-{name}-{split}"), []
            n = max(1, round(n * TRAIN_WEIGHT[name])) if split == "train" else n  # summary had none at 1
            for i in range(n):
                for _ in range(100):  # retry an item seen before; the world has only so many
                    record = generate(w, rng, i, split)
                    if split == "train" or _item(record) not in seen:
                        break
                else:  # a repeat kept would be scored as new (it was, silently)
                    taken = "training or test" if split == "val" else "training"
                    raise UserError(f"n_{split}_per_task={n} asks for more {name} items than mini-CME's world has "
                                    f"that no {taken} record holds (it ran out after {i}); ask for fewer, or for fewer "
                                    f"{taken} records.")
                seen.add(_item(record))
                records.append(record)
            data[split][name] = records
    train = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"], "task": name}
             for name, records in data["train"].items() for r in records]
    random.Random(f"{seed}-mix").shuffle(train)
    docs = _corpus(w, random.Random(f"{seed}-corpus"), corpus_docs)
    texts = docs + [line for r in train for field in ("instruction", "input", "output")
                    for line in r[field].split("\n")]
    tokenizer = _train_tokenizer([t for t in texts if t], vocab_size)

    summary = {"version": VERSION, "seed": seed, "vocab_size": vocab_size, "corpus_docs": len(docs),
               "corpus_chars": sum(map(len, docs)), "entities": len(w["entities"]), "held_out_facts": len(w["held"]),
               "train": len(train), "val": sum(map(len, data["val"].values())),
               "tasks": {name: {"metric": t.metric, "max_new_tokens": t.max_new_tokens,
                                "labels": t.labels and list(t.labels), **{s: len(data[s][name]) for s in sizes}}
                         for name, t in SYNTHETIC_TASKS.items()}}
    if busy := hold(out_dir, SUITE_FILES):  # and removes the temporaries of a build stopped by Ctrl-C or kill
        raise Busy(f"{out_dir} is being built by {busy}; wait for that build to end, or choose another folder.")
    try:
        _check_out_dir(out_dir)  # again, now held: a build that ended meanwhile left its suite there
        write_atomic(os.path.join(out_dir, BUILDING), "")  # a build of ours: one cut short may start again here
        for split in ("val", "test"):
            remove_stale_temporaries(os.path.join(out_dir, split), [f"{name}.jsonl" for name in _GENERATORS])
            for name, records in data[split].items():
                write_jsonl(os.path.join(out_dir, split, f"{name}.jsonl"), records)
        write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
        write_atomic(os.path.join(out_dir, "corpus.txt"), "\n\n".join(docs) + "\n")
        write_atomic(os.path.join(out_dir, "tokenizer.model"), tokenizer)
        write_atomic(os.path.join(out_dir, "suite.json"), json.dumps(summary, indent=1) + "\n")
        os.remove(os.path.join(out_dir, BUILDING))
    finally:
        let_go(out_dir)
    return summary


# -----------------------------------------------------------------------------
# The built-in demo (`python train.py` with no arguments): made on first use, nothing downloaded

ROOT = "data/mini_cme"
DEMO = dict(data_dir=f"{ROOT}/tokens", eval_dir=f"{ROOT}/test", tokenizer=f"{ROOT}/tokenizer.model",
            init_from=f"{ROOT}/base.pt")  # train.py's defaults
# train.py settings that pretrain the demo base: about 3 epochs of the 245K-token corpus, 64
# documents (about 2,600 tokens) a step
PRETRAIN = dict(adapter="none", init_from="scratch", model="small", batch_mode="pack", max_len=256, batch_size=64,
                learning_rate=3e-3, warmup_iters=30, max_iters=300, eval_interval=300, eval_dir="",
                out_dir=f"{ROOT}/pretrain", data_dir=f"{ROOT}/corpus_tokens", tokenizer=DEMO["tokenizer"])


def halves(doc):
    """A document as two halves joined by </s>. A real base has seen </s> as an input followed by
    more text (its pretraining stream separates documents with it); a tiny base pretrained on
    whole documents has not, and adapters cannot retrain the embedding of the </s> that ends every
    prompt, so adapters learn the first answer token far more slowly than full fine-tuning does."""
    sentences = doc.split(". ")
    if len(sentences) < 2:
        return doc
    cut = len(sentences) // 2
    return ". ".join(sentences[:cut]) + ".</s>" + ". ".join(sentences[cut:])


def _check_writable(path):
    """Before the demo writes path: its files are built under the current folder, and where that can not be written
    deleting them (train.py's fix for damaged ones) is not the fix; running elsewhere is."""
    if blocked := blocked_parent(path):
        raise Unwritable(f"the demo builds its files in {ROOT} under the current folder, which can not be written: "
                         f"{blocked}; run train.py from a folder you can write to.")


def build_demo_data(cfg):
    """Make whatever of the demo's suite and shards the train.py config `cfg` uses and lacks.
    Returns the train.py settings that pretrain the demo base when cfg uses it and it is missing
    (the caller runs them and moves model.pt to cfg["init_from"]), else None."""
    uses = {k: cfg[k] == v for k, v in DEMO.items()}
    if not any(uses.values()):
        return None
    if not os.path.isfile(f"{ROOT}/suite.json"):
        _check_writable(f"{ROOT}/suite.json")
        print(f"building the synthetic mini-CME suite in {ROOT} (once)...")
        make_suite(ROOT, seed=0)
    try:  # train.py names what is wrong with the files it reads
        old = read_json(f"{ROOT}/suite.json", fix="").get("version", 1) < VERSION
    except (ValueError, TypeError):  # read_json's UserError is a ValueError
        old = False
    if old:
        print(f"warning: {ROOT} was built by an older minicme.py, whose validation and test sets repeat training "
              f"items (their scores come out too high); delete {ROOT} to build it anew (a few minutes).",
              file=sys.stderr)
    if uses["data_dir"] and not os.path.isfile(f"{cfg['data_dir']}/summary.json"):
        _check_writable(f"{cfg['data_dir']}/summary.json")
        prepare([f"{ROOT}/train.jsonl"], DEMO["tokenizer"], cfg["data_dir"], max_len=256, val_fraction=0.03, quiet=True)
    if not uses["init_from"] or os.path.isfile(cfg["init_from"]):
        return None
    _check_writable(f"{PRETRAIN['out_dir']}/ckpt.pt")  # the base's pretraining, then base.pt beside its folder
    _check_writable(cfg["init_from"])
    corpus = PRETRAIN["data_dir"]
    if not os.path.isfile(f"{corpus}/summary.json"):
        with open(f"{ROOT}/corpus.txt", encoding="utf-8") as f:
            docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
        write_jsonl(f"{ROOT}/corpus.jsonl", [{"text": halves(d)} for d in docs])
        prepare([f"{ROOT}/corpus.jsonl"], DEMO["tokenizer"], corpus, max_len=256, quiet=True)
    # a first run started minutes before this one pretrains it now (its folder is made then; a mistake in this run's
    # settings leaves none): this run's out_dir is not in the way
    if os.path.isdir(PRETRAIN["out_dir"]) and (busy := hold(PRETRAIN["out_dir"])):
        raise Busy(f"the demo's base is being pretrained by {busy} (in {PRETRAIN['out_dir']}); wait for it to end, "
                   "then run again.")
    return dict(PRETRAIN)


def shards_made_with(data_dir):
    """The summary.json of data_dir's shards, which train.py's dry run checks the tokenizer against
    (data.check_made_with) without making or reading a shard, refusing first what the run refuses from it alone; for
    the demo's shards not yet prepared, what build_demo_data will record: the demo tokenizer's SHA-256 once the suite is
    built, before that its size alone (the same seed builds the same bytes: a copy of an earlier build's tokenizer
    passes the run, and so here); None where nothing is known (a data_dir not there yet: the README's recipe may be
    dry-run before its step 1 prepares the data)."""
    if (data_dir != DEMO["data_dir"] and os.path.exists(data_dir)) or os.path.exists(f"{data_dir}/summary.json"):
        return read_summary(data_dir, "train")  # as the run's TokenDataset reads it first, in the same sentences
    if data_dir != DEMO["data_dir"]:
        return None
    if not os.path.exists(DEMO["tokenizer"]):
        return dict(vocab_size=VOCAB_SIZE, tokenizer=dict(path=DEMO["tokenizer"]))
    tok = Tokenizer(DEMO["tokenizer"])  # as prepare records it
    return dict(vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                tokenizer=dict(path=tok.path, sha256=file_sha256(tok.path)))


def incomplete(e):
    """The refusal of the demo's files where one could not be read or made (data.py's messages name its flags, the
    tokenizer's a checkpoint; the demo's files are ours): deleted, train.py builds them anew."""
    return UserError(f"the demo's files in {ROOT} are incomplete ({str(e).split(';')[0].rstrip('.')}); "
                     f"delete {ROOT} and run again to build them anew (a few minutes).")


def check_demo_files(cfg):
    """The demo's files a run reads or builds in, checked before it does (train.py's build_demo, and its dry run), in
    build_demo_data's order: its tokenizer.model damaged, a folder it prepares shards in not a folder, or (once the
    folders it writes first are found writable) its tokenizer.model missing where the suite is built and the run reads
    it (to prepare shards, or as its tokenizer) are refused as the demo's damaged files are (incomplete), not in the
    tokenizer's or data.py's words nor as a current folder that can not be written."""
    pretrained = cfg["init_from"] == DEMO["init_from"] and not os.path.exists(DEMO["init_from"])  # first, with it
    uses = pretrained or any(cfg[key] == DEMO[key] for key in ("tokenizer", "data_dir"))
    prepared = [DEMO["data_dir"]] if cfg["data_dir"] == DEMO["data_dir"] else []
    prepared += [PRETRAIN["data_dir"]] if pretrained else []  # the base's corpus, before it is pretrained
    prepared = [folder for folder in prepared if not os.path.isfile(f"{folder}/summary.json")]  # not prepared yet
    try:
        if uses and os.path.exists(DEMO["tokenizer"]):  # not there before the suite: made with it
            Tokenizer(DEMO["tokenizer"])
        for folder in prepared:
            if os.path.lexists(folder) and not os.path.isdir(folder):
                raise UserError(f"{folder} is not a folder")
        if (cfg["tokenizer"] == DEMO["tokenizer"] or prepared) and os.path.isfile(f"{ROOT}/suite.json"):
            if DEMO["data_dir"] in prepared:  # what build_demo_data writes before it first reads the tokenizer
                _check_writable(f"{DEMO['data_dir']}/summary.json")
            elif pretrained:
                _check_writable(f"{PRETRAIN['out_dir']}/ckpt.pt")
                _check_writable(DEMO["init_from"])
            Tokenizer(DEMO["tokenizer"])  # missing: the suite is incomplete
    except Unwritable:  # running elsewhere is the fix, not deleting
        raise
    except UserError as e:
        raise incomplete(e) from None


def check_own_tokenizer(cfg):
    """A tokenizer of one's own with the demo's shards, which are the demo tokenizer's: refused before anything is
    built for the run (the suite, the shards), in the sentence of its dry run and of the run's train.datasets
    (data.check_made_with)."""
    own = cfg["tokenizer"] != DEMO["tokenizer"] and os.path.exists(cfg["tokenizer"])
    if own and cfg["data_dir"] == DEMO["data_dir"]:
        check_made_with(cfg["data_dir"], shards_made_with(cfg["data_dir"]), Tokenizer(cfg["tokenizer"]))


def check_demo(cfg):
    """What train.py's build_demo (and its dry run) refuses first, before the demo's files are built or read: the
    demo's files damaged (check_demo_files), then a tokenizer of one's own with its shards (check_own_tokenizer)."""
    check_demo_files(cfg)
    check_own_tokenizer(cfg)


def main(argv=None):
    parser = Parser(prog="minicme.py", description="Write the synthetic mini-CME suite (deterministic from the seed).")
    parser.add_argument("--out", required=True, type=flag_path, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="any integer (default 0: the demo's suite)")
    args = parser.parse_args(argv)
    try:
        summary = make_suite(args.out, args.seed)
    except (UserError, OSError) as e:
        exit_with(e, "minicme.py: ")
    print(f"mini-CME in {args.out}: {summary['train']} training records over {len(summary['tasks'])} tasks, "
          f"{summary['corpus_docs']} corpus documents, a {summary['vocab_size']}-piece tokenizer")


if __name__ == "__main__":
    run_script(main)
