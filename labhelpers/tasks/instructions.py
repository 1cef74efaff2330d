"""The ``instructions`` task: everyday requests with verifiable instructions, the general-skill probe of a
real instruct model.

In the style of IFEval (Zhou et al., 2023): each prompt is a short request ("Give advice on saving
money.") with one or two instructions a program can check ("Answer with less than 40 words.", "Wrap
your entire response with double quotation marks."). A response passes when it follows every
instruction of its prompt (IFEval's *prompt-level strict* accuracy); :func:`instruction_accuracy`
gives the *instruction-level* one. Every prompt asks for something (a case, an ending, a list, a title,
keywords...), not only for something to be left out, so an answer that ignores the request passes none.
The instruction ids, their wording and their checks are IFEval's
(``lm_eval/tasks/ifeval``: ``tests/test_instructions.py`` checks ours against them answer by answer);
the prompts are the course's own, because IFEval's are on the hub. Only checks that work offline are
used: no language detection (every prompt is English; the case checks test the case alone) and no
sentence splitting (it needs nltk's ``punkt`` data).

Splits are disjoint by *topic*: a test prompt's topic is in no training or validation prompt. Each row
stores its ``instructions`` (``[{"id": ..., "kwargs": {...}}]``) and a reference answer that follows
them (what replay and instruction tuning train on).
"""

from __future__ import annotations

import json
import random
import re
from typing import Callable, Sequence

from labhelpers.tasks.base import Task, chat_row

# topic: (three statements about it, each without commas)
TOPICS: dict[str, tuple[str, str, str]] = {
    "saving money": ("Set aside a fixed amount on the day you are paid.", "Track what you spend for one month.",
                     "Cancel the subscriptions you no longer use."),
    "the water cycle": ("Water evaporates from seas and lakes.", "The vapour cools into clouds high in the air.",
                        "Rain and snow bring the water back to the ground."),
    "learning to cook rice": ("Rinse the rice until the water runs clear.", "Use about two cups of water for one cup of rice.",
                              "Let it rest with the lid on for ten minutes."),
    "time management": ("Write the three most important tasks of the day first.", "Work in blocks of focused time.",
                        "Say no to meetings without a clear purpose."),
    "recycling at the office": ("Put labelled bins next to every printer.", "Collect paper and cans in separate bins.",
                                "Ask the cleaning team how the waste is sorted."),
    "the history of tea": ("Tea was first drunk in China thousands of years ago.", "Traders carried it to Europe in the 1600s.",
                           "Today it is the most popular drink after water."),
    "why sleep matters": ("Sleep lets the brain store what it learned.", "Too little sleep weakens the immune system.",
                          "Most adults need seven to nine hours a night."),
    "a trip to the mountains": ("Check the weather forecast before you leave.", "Pack warm layers and plenty of water.",
                                "Tell someone which trail you plan to take."),
    "starting to run": ("Begin with short runs at an easy pace.", "Rest at least one day between runs.",
                        "Buy shoes that fit your feet well."),
    "keeping houseplants alive": ("Most houseplants die from too much water.", "Place them near a bright window.",
                                  "Feed them a little fertiliser in spring."),
    "writing a good email": ("Put the main request in the first line.", "Keep the message short and polite.",
                             "Use a subject line that says what it is about."),
    "the solar system": ("Eight planets orbit the Sun.", "Jupiter is the largest of them.",
                         "Earth is the only planet known to hold life."),
    "learning a new language": ("Practise a little every day.", "Speak with native speakers as early as you can.",
                                "Learn the most common words first."),
    "a healthy breakfast": ("Oats with fruit keep you full until lunch.", "Eggs give you protein to start the day.",
                            "Sugary cereals leave you hungry soon after."),
    "cycling to work": ("Cycling is cheaper than driving or the bus.", "Wear a helmet and use lights at night.",
                        "Plan a route on quiet streets."),
    "photography for beginners": ("Keep the light behind you.", "Use the rule of thirds to place your subject.",
                                  "Take many shots and keep the best one."),
    "public speaking": ("Rehearse your talk out loud several times.", "Look at people in the audience as you speak.",
                        "Slow down and pause between ideas."),
    "composting at home": ("Mix green scraps with dry leaves.", "Turn the pile every few weeks.",
                           "Keep meat and dairy out of the bin."),
    "the life of bees": ("Bees collect nectar and pollen from flowers.", "A hive has one queen and thousands of workers.",
                         "Bees pollinate many of the crops we eat."),
    "remote work": ("Keep a fixed place to work at home.", "Start and stop work at set times.",
                    "Call colleagues instead of writing long messages."),
    "reading more books": ("Carry a book with you wherever you go.", "Read for twenty minutes before bed.",
                           "Stop reading a book you do not enjoy."),
    "the moon": ("The Moon orbits the Earth about once a month.", "Its pull causes the tides of the sea.",
                 "People first walked on it in 1969."),
    "a first job interview": ("Learn what the company does before you go.", "Prepare two questions to ask at the end.",
                              "Arrive ten minutes early."),
    "drinking enough water": ("Carry a bottle of water with you.", "Drink a glass with every meal.",
                              "Pale urine is a sign that you drink enough."),
    "volcanoes": ("A volcano is an opening in the crust of the Earth.", "Molten rock called magma rises from below.",
                  "Some volcanoes have been quiet for thousands of years."),
    "board games with friends": ("Choose a game that everyone can learn quickly.", "Explain the rules before the first turn.",
                                 "Keep snacks away from the board."),
    "caring for a dog": ("Walk your dog at least twice a day.", "Take it to a vet once a year.",
                         "Teach it simple commands with rewards."),
    "the invention of printing": ("Gutenberg built a printing press around 1450.", "Books became cheaper and more common.",
                                  "Ideas spread faster across Europe."),
    "packing for a holiday": ("Write a list a few days before you leave.", "Roll your clothes to save space.",
                              "Keep your passport in your hand luggage."),
    "studying for an exam": ("Start revising weeks before the exam.", "Test yourself instead of rereading notes.",
                             "Sleep well the night before."),
}
TOPIC_SPLITS = {"train": 18, "validation": 4, "test": 8}  # topics a split; no topic is in two splits
SPLIT_SIZES = {"train": 200, "validation": 50, "test": 100}

REQUESTS = ("Write a short note about {topic}.", "Give advice on {topic}.", "Explain {topic} to a friend.",
            "Write a few lines about {topic} for a newsletter.", "Tell me about {topic}.")
INTROS = ("Here is a short note on {topic}.", "Here is my advice on {topic}.", "Here is how {topic} works.",
          "A few lines on {topic} for the newsletter.", "Here is what to know about {topic}.")
EXTRA = ("Small steps each day add up.", "It is easier than it sounds.", "Anyone can start today.",
         "Ask others what works for them.", "Keep notes so you can see your progress.")
END_PHRASES = ("Is there anything else I can help with?", "Any other questions?",
               "Let me know if you have additional questions.")
KEYWORDS = ("plan", "habit", "simple", "weekly", "budget", "patience", "friends", "morning")
FORBIDDEN = ("very", "really", "always", "never", "basically")
PS_TEXT = "P.S. I hope this helps."

# every instruction, by IFEval id: (draws its kwargs, what the prompt says given them)
INSTRUCTIONS: dict[str, tuple[Callable[[random.Random], dict], Callable[[dict], str]]] = {
    "change_case:english_capital": (lambda rng: {}, lambda kw: "Your entire response should be in English, and in all capital letters."),
    "change_case:english_lowercase": (lambda rng: {}, lambda kw: "Your entire response should be in English, and in all lowercase letters. No capital letters are allowed."),
    "punctuation:no_comma": (lambda rng: {}, lambda kw: "In your entire response, refrain from the use of any commas."),
    "startend:end_checker": (lambda rng: {"end_phrase": rng.choice(END_PHRASES)},
                             lambda kw: f"Finish your response with this exact phrase {kw['end_phrase']} No other words should follow this phrase."),
    "detectable_format:number_bullet_lists": (lambda rng: {"num_bullets": rng.choice((2, 3, 4))},
                                              lambda kw: f"Your answer must contain exactly {kw['num_bullets']} bullet points. Use the markdown bullet points such as:\n* This is point 1. \n* This is point 2"),
    "length_constraints:number_words": (lambda rng: rng.choice([{"relation": "at least", "num_words": n} for n in (30, 40)]
                                                              + [{"relation": "less than", "num_words": n} for n in (20, 30, 40)]),
                                        lambda kw: f"Answer with {kw['relation']} {kw['num_words']} words."),
    "keywords:existence": (lambda rng: {"keywords": sorted(rng.sample(KEYWORDS, 2))},
                           lambda kw: f"Include keywords {', '.join(kw['keywords'])} in the response."),
    "keywords:forbidden_words": (lambda rng: {"forbidden_words": sorted(rng.sample(FORBIDDEN, 2))},
                                 lambda kw: f"Do not include keywords {', '.join(kw['forbidden_words'])} in the response."),
    "startend:quotation": (lambda rng: {}, lambda kw: "Wrap your entire response with double quotation marks."),
    "detectable_format:title": (lambda rng: {}, lambda kw: "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."),
    "detectable_content:postscript": (lambda rng: {"postscript_marker": "P.S."},
                                      lambda kw: "At the end of your response, please explicitly add a postscript starting with P.S."),
    "detectable_format:number_highlighted_sections": (lambda rng: {"num_highlights": rng.choice((1, 2))},
                                                      lambda kw: f"Highlight at least {kw['num_highlights']} sections in your answer with markdown, i.e. *highlighted section*."),
}
# pairs a prompt never combines: they contradict, or one's ending fights the other's
CONFLICTS = {frozenset(p) for p in [
    ("change_case:english_capital", "change_case:english_lowercase"),
    ("startend:end_checker", "startend:quotation"), ("startend:end_checker", "detectable_content:postscript"),
    ("startend:quotation", "detectable_content:postscript"),
    ("detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections"),
    ("length_constraints:number_words", "detectable_format:number_bullet_lists"),
]}


# ------------------------------------------------------------------------------------------ checks

def _count_words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _highlights(text: str) -> int:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", text) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", text) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double)


def _postscript(text: str, marker: str) -> bool:
    marker = marker.lower()
    pattern = r"\s*p\.\s?s\..*$" if marker == "p.s." else r"\s*p\.\s?p\.\s?s.*$" if marker == "p.p.s" else rf"\s*{marker}.*$"
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


CHECKS: dict[str, Callable[..., bool]] = {
    "change_case:english_capital": lambda r: r.isupper(),
    "change_case:english_lowercase": lambda r: r.islower(),
    "punctuation:no_comma": lambda r: "," not in r,
    "startend:end_checker": lambda r, end_phrase: r.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    "detectable_format:number_bullet_lists": lambda r, num_bullets: (
        len(re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE))
        + len(re.findall(r"^\s*-.*$", r, flags=re.MULTILINE))) == num_bullets,
    "length_constraints:number_words": lambda r, relation, num_words: (
        _count_words(r) < num_words if relation == "less than" else _count_words(r) >= num_words),
    "keywords:existence": lambda r, keywords: all(re.search(k, r, flags=re.IGNORECASE) for k in keywords),
    "keywords:forbidden_words": lambda r, forbidden_words: not any(
        re.search(rf"\b{w}\b", r, flags=re.IGNORECASE) for w in forbidden_words),
    "startend:quotation": lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "detectable_format:title": lambda r: any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r)),
    "detectable_content:postscript": lambda r, postscript_marker: _postscript(r, postscript_marker),
    "detectable_format:number_highlighted_sections": lambda r, num_highlights: _highlights(r) >= num_highlights,
}


def follows(response: str, instruction: dict) -> bool:
    """Whether ``response`` follows one ``{"id": ..., "kwargs": {...}}`` instruction (IFEval's strict check;
    an empty response follows nothing)."""
    if instruction["id"] not in CHECKS:
        raise KeyError(f"unknown instruction {instruction['id']!r}; known: {', '.join(sorted(CHECKS))}")
    return bool(response.strip()) and CHECKS[instruction["id"]](response, **instruction["kwargs"])


def score(rows: Sequence[dict], completions: Sequence[str]) -> list[bool]:
    """Prompt-level strict accuracy: a response passes when it follows every instruction of its row."""
    return [all(follows(c, i) for i in row_instructions(row)) for row, c in zip(rows, completions, strict=True)]


def instruction_accuracy(rows: Sequence[dict], completions: Sequence[str]) -> float:
    """Instruction-level strict accuracy: the share of all instructions, over every row, that were followed."""
    verdicts = [follows(c, i) for row, c in zip(rows, completions, strict=True) for i in row_instructions(row)]
    return sum(verdicts) / len(verdicts)


def row_instructions(row: dict) -> list[dict]:
    """A row's instructions (stored as JSON text, so that ``datasets`` keeps each one's own kwargs)."""
    value = row["instructions"]
    return json.loads(value) if isinstance(value, str) else value


# ------------------------------------------------------------------------------------------ generation

def _reference(topic: str, kind: int, instructions: Sequence[dict]) -> str:
    """An answer that follows every instruction (checked by :func:`generate`)."""
    kwargs = {i["id"]: i["kwargs"] for i in instructions}
    points = list(TOPICS[topic])
    words = kwargs.get("length_constraints:number_words")
    if words and words["relation"] == "at least":
        points += EXTRA
    intro = INTROS[kind].format(topic=topic)
    if words and words["relation"] == "less than":
        intro, points = "", points[:1 if words["num_words"] <= 20 else 2]
    if "keywords:existence" in kwargs:  # with the intro, which a bullet list keeps
        keep = f"Keep {' and '.join(kwargs['keywords:existence']['keywords'])} in mind."
        intro, points = (f"{intro} {keep}", points) if intro else ("", [*points, keep])
    if "detectable_format:number_highlighted_sections" in kwargs:
        n = kwargs["detectable_format:number_highlighted_sections"]["num_highlights"]
        points = [f"*{p}*" if j < n else p for j, p in enumerate(points)]
    if "detectable_format:number_bullet_lists" in kwargs:
        n = kwargs["detectable_format:number_bullet_lists"]["num_bullets"]
        points = (points + list(EXTRA))[:n] if n > len(points) else points[:n]
        body = "\n".join(f"* {p}" for p in points)
        text = f"{intro}\n\n{body}" if intro else body
    else:
        text = " ".join(p for p in [intro, *points] if p)
    if "detectable_format:title" in kwargs:
        text = f"<<{topic.capitalize()}>>\n\n{text}"
    if "detectable_content:postscript" in kwargs:
        text += f"\n\n{PS_TEXT}"
    if "startend:end_checker" in kwargs:
        text += f"\n\n{kwargs['startend:end_checker']['end_phrase']}"
    if "startend:quotation" in kwargs:
        text = f'"{text}"'
    if "change_case:english_capital" in kwargs:
        text = text.upper()
    if "change_case:english_lowercase" in kwargs:
        text = text.lower()
    return text


def _restrictive(instruction: dict) -> bool:
    """Whether an instruction only forbids (no commas, no such word, fewer than n words): an answer that
    ignores the request, a one-line SQL query say, follows it. Every prompt has at least one instruction
    that asks for something."""
    return instruction["id"] in ("punctuation:no_comma", "keywords:forbidden_words") or (
        instruction["id"] == "length_constraints:number_words" and instruction["kwargs"]["relation"] == "less than")


def _prompts(topics: Sequence[str], n: int, rng: random.Random) -> list[tuple[str, int, list[dict]]]:
    """``n`` distinct (topic, request kind, instructions) problems: a third with one instruction, the rest two,
    never only restrictive ones (:func:`_restrictive`)."""
    ids, topics = sorted(INSTRUCTIONS), sorted(topics)
    seen, out = set(), []
    while len(out) < n:
        topic, kind = rng.choice(topics), rng.randrange(len(REQUESTS))
        chosen = rng.sample(ids, 1 if len(out) % 3 == 0 else 2)
        if len(chosen) == 2 and frozenset(chosen) in CONFLICTS:
            continue
        instructions = [{"id": i, "kwargs": INSTRUCTIONS[i][0](rng)} for i in sorted(chosen)]
        if all(_restrictive(i) for i in instructions):
            continue
        key = (topic, kind, json.dumps(instructions, sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append((topic, kind, instructions))
    return out


def prompt_text(topic: str, kind: int, instructions: Sequence[dict]) -> str:
    """The user's turn: the request, then each instruction's wording (a bullet list's example last, as it
    ends in a list)."""
    ordered = sorted(instructions, key=lambda i: i["id"] == "detectable_format:number_bullet_lists")
    return " ".join([REQUESTS[kind].format(topic=topic), *(INSTRUCTIONS[i["id"]][1](i["kwargs"]) for i in ordered)])


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """Rows of each split; a split's topics are in no other split, and every reference follows its instructions."""
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    rng.shuffle(topics)
    out, start = {}, 0
    for split, n_topics in TOPIC_SPLITS.items():
        mine, start = topics[start:start + n_topics], start + n_topics
        rows = []
        for i, (topic, kind, instructions) in enumerate(_prompts(mine, SPLIT_SIZES[split], rng)):
            answer = _reference(topic, kind, instructions)
            if not all(follows(answer, ins) for ins in instructions):
                raise AssertionError(f"the reference for {topic!r} breaks {instructions}: {answer!r}")
            rows.append(chat_row("instructions", split, i, prompt_text(topic, kind, instructions), answer,
                                 topic=topic, instructions=json.dumps(instructions, sort_keys=True)))
        out[split] = rows
    return out


TASK = Task(name="instructions", format="chat", generate=generate, score=score, max_new_tokens=160)
