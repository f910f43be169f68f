"""Train the caption tokenizer: a SentencePiece model, served as a transformers fast tokenizer.

SentencePiece learns the pieces (and their scores) from the captions; the same model is then written as a
`tokenizers` pipeline (lower-casing normaliser, metaspace splitting, `</s>` appended), so the saved tokenizer loads
with `AutoTokenizer` anywhere, without this package or the sentencepiece runtime.
"""

from __future__ import annotations

import logging
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"  # ids 0, 1, 2, 3, as CaptionerConfig expects


def normalize_caption(caption: str) -> str:
    """NFKC, lower-case and collapse whitespace: the form captions are trained and tokenized in."""
    return " ".join(unicodedata.normalize("NFKC", caption).lower().split())


def caption_normalizer() -> normalizers.Normalizer:
    """The same normalisation inside the tokenizer, so raw user text is tokenized as training text was."""
    return normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )


MODEL_TYPES = ("unigram", "word")


def train_sentencepiece(
    captions: Iterable[str], vocab_size: int, model_prefix: Path, model_type: str = "unigram"
) -> spm.SentencePieceProcessor:
    """Train a SentencePiece model on normalised, non-empty captions.

    "unigram" (sub-words) suits real caption corpora; "word" suits a tiny closed vocabulary like the sample data
    set's, on which unigram's seed pieces degenerate into single letters.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"tokenizer model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    lines = [normalize_caption(c) for c in captions if isinstance(c, str)]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError("train_tokenizer needs at least one non-empty caption")
    # every special token and (unigram) every character, the space's "▁" included, needs a piece of its own
    needed = 4 + (1 if model_type == "word" else len(set("".join(lines)) | {" "}))
    if vocab_size < needed:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for a {model_type} tokenizer of these captions: "
            f"it needs at least {needed} (the 4 special tokens and the pieces every caption needs)"
        )
    corpus = model_prefix.with_suffix(".txt")
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(model_prefix),
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus (the sample data) may not fill the vocabulary
        character_coverage=1.0,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        pad_piece=PAD,
        bos_piece=BOS,
        eos_piece=EOS,
        unk_piece=UNK,
        normalization_rule_name="identity",  # captions are already normalised above
        # SentencePiece silently leaves out lines longer than this (4192 bytes by default): none may be lost
        max_sentence_length=max(4192, max(len(line.encode("utf-8")) for line in lines) + 1),
        num_threads=2,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(model_prefix.with_suffix(".model")))


def fast_tokenizer_from_sentencepiece(sp: spm.SentencePieceProcessor, model_type: str) -> PreTrainedTokenizerFast:
    """The SentencePiece model as a `tokenizers` pipeline with identical pieces, segmentation and ids."""
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if model_type == "word":
        model = models.WordLevel({piece: i for i, piece in enumerate(pieces)}, unk_token=UNK)
    else:
        model = models.Unigram([(piece, sp.get_score(i)) for i, piece in enumerate(pieces)], unk_id=sp.unk_id())
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = caption_normalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, sp.eos_id())])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def train_tokenizer(
    captions: Iterable[str], vocab_size: int = 10000, model_type: str = "unigram"
) -> PreTrainedTokenizerFast:
    """Train the caption tokenizer: ids 0-3 are <pad>, <s>, </s>, <unk>; encoding appends </s>.

    `vocab_size` is an upper bound: a corpus with fewer distinct pieces gives a smaller vocabulary.
    """
    with tempfile.TemporaryDirectory() as folder:
        sp = train_sentencepiece(captions, vocab_size, Path(folder) / "captions", model_type)
        tokenizer = fast_tokenizer_from_sentencepiece(sp, model_type)
    logger.info("Trained a SentencePiece %s tokenizer with %d pieces", model_type, len(tokenizer))
    return tokenizer
