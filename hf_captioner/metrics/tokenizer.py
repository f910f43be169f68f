"""A pure-Python stand-in for the COCO caption evaluation's tokenisation step, so BLEU, CIDEr-D and ROUGE-L need
no Java.

The reference runs Stanford CoreNLP 3.4.1's `PTBTokenizer -preserveLines -lowerCase` and then drops the tokens in
`PUNCTUATIONS`. This module reproduces that pipeline's output for caption text: clitics split off ("dog 's",
"is n't", "ca n't"), quotes turned into `` '' ` ', brackets into -lrb- -rrb- -lsb- ... (which, lower-cased, the
reference does not drop), numbers and abbreviations kept whole, and the same tokens dropped.
"""

from __future__ import annotations

import re

# the tokens pycocoevalcap's tokenizer drops after PTB tokenisation (verbatim list)
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# abbreviations CoreNLP keeps with their period
ABBREVIATIONS = frozenset(
    "mr mrs ms dr st vs etc jr sr inc co ltd mt no prof gen sgt capt col lt rev ave blvd jan feb mar apr aug sep "
    "sept oct nov dec corp bros fig".split()
)
SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}
TYPOGRAPHY = {"“": '"', "”": '"', "„": '"', "‘": "`", "’": "'", "—": " -- ", "–": " -- ", "…": " ... "}
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
CLITIC_SUFFIX = re.compile(r"^(.+?)(n't|'s|'re|'ll|'d|'ve|'m)$")

TOKEN = re.compile(
    r"""
    (?P<ellipsis>\.\.\.+)
  | (?P<dashes>--+)
  | (?P<clitic>(?:'s|'re|'ll|'d|'ve|'m|n't)(?!\w)|'n')
  | (?P<emoticon>[:;]-?[()])
  | (?P<marks>[?!]{2,})
  | (?P<acronym>(?:[^\W\d_]\.){2,}|[^\W\d_]\.(?=[^\W\d_]\.))
  | (?P<word>@?\w+(?:(?:[-./@]|'(?!n')(?=[^\W\d_])|(?<=\d)[,:](?=\d))\w+)*(?:\.(?!\.))?)
  | (?P<quotes>``|'')
  | (?P<other>\S)
    """,
    re.VERBOSE,
)


def ptb_tokenize(caption: str) -> list[str]:
    """Lower-cased PTB tokens of one caption, punctuation dropped, as the COCO caption evaluation sees it."""
    text = "".join(TYPOGRAPHY.get(ch, ch) for ch in caption).lower()
    return [token for token in _ptb_tokens(text) if token not in PUNCTUATIONS]


def _ptb_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        match = TOKEN.match(text, position)
        kind, token = match.lastgroup, match.group()
        start, position = position, match.end()
        if kind in ("word", "acronym"):
            tokens.extend(_split_word(token))
        elif kind == "emoticon":
            tokens.append(token[:-1] + BRACKETS[token[-1]])
        elif kind == "other":
            tokens.append(_single_character(token, text, start, position))
        else:
            tokens.append(token)
    return tokens


def _split_word(token: str) -> list[str]:
    """A word keeps an abbreviation's period; otherwise a final period and a clitic come off as tokens."""
    period = []
    if token.endswith("."):
        stem = token[:-1]
        if stem in ABBREVIATIONS or all(len(part) == 1 and part.isalpha() for part in stem.split(".")):
            return [token]
        token, period = stem, ["."]
    if token in SPLIT_WORDS:
        return [*SPLIT_WORDS[token], *period]
    clitic = CLITIC_SUFFIX.match(token)
    return [*(clitic.groups() if clitic else (token,)), *period]


def _single_character(character: str, text: str, start: int, end: int) -> str:
    """Brackets are escaped; a quote opens (`` or `) before a word after a space, and closes ('' or ') otherwise."""
    if character in BRACKETS:
        return BRACKETS[character]
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    opening = (before.isspace() or before in "([{`") and not after.isspace()
    if character == '"':
        return "``" if opening else "''"
    if character == "'":
        return "`" if opening else "'"
    return character
