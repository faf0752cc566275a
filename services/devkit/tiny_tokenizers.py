"""CLIP and T5 tokenizers learnt from a built-in prompt corpus, identical in every process.

No vocab files exist offline, so the vocabularies are made here. The CLIP BPE uses its own merge
loop because `tokenizers`' BpeTrainer breaks ties in hash order and differs between processes.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from functools import lru_cache

from transformers import CLIPTokenizer, T5Tokenizer

# Prompt-like English: the words a user or a test is likely to type, so they tokenize into few pieces.
CORPUS = """
a photo of a cat sitting on a wooden table, soft light, high detail
a portrait of an old man with a grey beard, studio lighting, sharp focus
a beautiful landscape with mountains and a lake at sunrise, golden hour
a city street at night with neon lights and rain, cinematic, wide angle
an astronaut riding a horse on the moon, digital art, trending
a dog running through a green field of flowers in spring
a painting of a castle on a hill under a stormy sky, oil on canvas
a close up photograph of a red rose with water drops, macro lens
a cozy cabin in a snowy forest, warm light in the windows, winter evening
a futuristic city skyline with flying cars, blue and orange sunset
a bowl of fresh fruit on a kitchen counter, natural light, still life
a young woman reading a book in a cafe, film grain, shallow depth of field
an ancient temple in the jungle covered in moss, morning fog
a sailing boat on the ocean with big waves, dramatic clouds
a watercolor illustration of a small village by the river
a black and white photo of a bridge in the mist, minimalist
a robot playing the piano in an empty concert hall, detailed, realistic
a mountain road through autumn trees with red and yellow leaves
a desert with sand dunes under a starry night sky, milky way
a bird standing on a branch, bokeh background, wildlife photography
a plate of pasta with tomato sauce and basil, food photography
a knight in silver armor holding a sword, fantasy concept art
a lighthouse on a rocky coast at dusk, long exposure
a cute fox in the snow, soft fur, winter, highly detailed
a modern living room with large windows and plants, interior design
a steam train crossing a stone bridge in the valley, vintage photo
a portrait of a girl with blue eyes and freckles, natural makeup
a waterfall in a tropical forest, lush green, sunlight through the trees
an underwater scene with coral reef and colorful fish, clear water
a street market in the old town, people walking, busy, summer day
a dragon flying over the mountains, epic, matte painting
a cup of coffee and a croissant on a table by the window, morning
an abstract pattern of circles and lines, vibrant colors, geometric
a small house on the beach with palm trees, sunny, blue sky
a tiger resting in the tall grass, golden light, national geographic
a snowy mountain peak above the clouds, aerial view, 4k, 8k, ultra hd
a pencil sketch of a horse, black and white, simple lines
a glass of wine on a wooden bar, dim light, reflections
a child flying a kite in the park, happy, bright colors
an owl at night in the forest, moonlight, mysterious
a photo of a cat, a photo of a dog, a photo of a person, a photo of a car
best quality, masterpiece, photorealistic, 3d render, anime style, low poly
"""

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Enough merges for whole common words; more only grows the embedding tables.
CLIP_MERGES = 600

# CLIP's pre-tokenizer keeps these apart (its \p{L}/\p{N} classes, for an ASCII corpus).
_CLIP_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")
_T5_WORD = re.compile(r"[A-Za-z0-9]+")
_PRINTABLE = [chr(c) for c in range(33, 127)]


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, in the order real CLIP numbers its first 256 ids."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    # Whitespace and control bytes are moved past 255 so every symbol is a visible character.
    chars.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in chars)})
    return chars


def _clip_words() -> Counter[tuple[str, ...]]:
    """Corpus words as byte-level symbols, the last carrying CLIP's end-of-word mark."""
    chars = _byte_chars()
    words: Counter[tuple[str, ...]] = Counter()
    for word in _CLIP_WORD.findall(CORPUS.lower()):
        symbols = [chars[b] for b in word.encode()]
        symbols[-1] += "</w>"
        words[tuple(symbols)] += 1
    return words


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merges learnt from CORPUS, laid out like real CLIP's."""
    words = _clip_words()
    merges: list[tuple[str, str]] = []
    while len(merges) < CLIP_MERGES:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        # Most frequent pair; equal counts go to the lexicographically smallest, so every run agrees.
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        words = Counter({_merge(word, best): count for word, count in words.items()})
    alphabet = list(_byte_chars().values())
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + ["".join(pair) for pair in merges]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """A CLIP tokenizer (77 tokens); SDXL's second one pads with "!"."""
    vocab, merges = clip_vocab()
    # The BPE backend accepts only (left, right) tuples, whatever transformers' annotation says.
    pairs: list = list(merges)
    return CLIPTokenizer(vocab=dict(vocab), merges=pairs, pad_token=pad_token, model_max_length=77)


@lru_cache(maxsize=1)
def t5_vocab() -> list[tuple[str, float]]:
    """Unigram pieces with log-frequency scores: whole corpus words, then single characters."""
    words = Counter(_T5_WORD.findall(CORPUS))
    word_total = sum(words.values())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    # Sorted by (-count, word) so the ids do not depend on dict order.
    for word, count in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        pieces.append(("▁" + word, math.log(count / word_total)))
    # Every printable character alone and word-initial, so no ASCII input falls to <unk>; scored
    # below any whole word so that known words stay one piece.
    floor = math.log(1 / word_total) - 1.0
    pieces.append(("▁", floor))
    seen = {piece for piece, _ in pieces}
    for ch in _PRINTABLE:
        for piece in ("▁" + ch, ch):
            if piece not in seen:
                pieces.append((piece, floor - 1.0))
                seen.add(piece)
    return pieces


def t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer (<pad>=0, </s>=1, <unk>=2) for SD3's and Flux's third/second text encoder."""
    # transformers 5 has one T5 tokenizer class; T5TokenizerFast is an alias of it.
    return T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0, model_max_length=512)
