"""Passkey retrieval (needle in a haystack): the prompts the evaluation scores, and the same task mixed
into training data.

A prompt of `context_length` tokens is haystack text with a needle stating a five-digit key at `depth`
(0: the needle starts the context, 1: it ends right before the question), then the question; the answer
is the key's tokens (moba_train.evaluation scores it exactly).

`moba_train.data.mix` plants the same prompts in training samples (`data.passkey_mix`): the sample's
own tokens are the haystack, the key and the depth are drawn from the run's seed and the sample index.
The evaluation's prompts come from other text (the held-out split) and another seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moba_train.data.preprocess import DataError


@dataclass(frozen=True)
class PasskeySample:
    """One retrieval prompt: `tokens` int64 [p] (haystack, the needle at `needle_start`, haystack, the
    question), and the `answer` int64 [k] that must follow it. The prompt and the answer's first k - 1
    tokens, what the scoring forward pass reads, are the context length: p = context_length - k + 1."""

    tokens: np.ndarray
    answer: np.ndarray
    needle_start: int
    depth: float


def filler_length(needle: tuple[np.ndarray, np.ndarray, np.ndarray], question: np.ndarray,
                  context_length: int) -> int:
    """Haystack tokens a sample of `context_length` holds beside the needle, the question and the answer."""
    before, answer, after = needle
    return context_length - len(before) - len(answer) - len(after) - len(question) - (len(answer) - 1)


def place_needle(haystack: np.ndarray, needle: tuple[np.ndarray, np.ndarray, np.ndarray], question: np.ndarray,
                 context_length: int, depth: float) -> PasskeySample:
    """A sample of `context_length` tokens (see PasskeySample): the first tokens of `haystack` with the
    needle (before, answer, after) inserted after round(depth * filler) of them, then `question`."""
    filler = filler_length(needle, question, context_length)
    if filler < 0:
        raise ValueError(f"a context of {context_length} tokens cannot hold the needle, question and answer "
                         f"({context_length - filler} tokens); use longer contexts")
    if len(haystack) < filler:
        raise DataError(f"the haystack has {len(haystack)} tokens, fewer than the {filler} a context of "
                        f"{context_length} needs; use more validation data or shorter contexts")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth {depth} is not in [0, 1]")
    start = round(depth * filler)
    tokens = np.concatenate([haystack[:start], *needle, haystack[start:filler], question]).astype(np.int64)
    return PasskeySample(tokens, np.asarray(needle[1], dtype=np.int64), start, depth)


class PasskeyTask:
    """Passkey retrieval in real text: a random five-digit key stated in a comment hidden in a haystack
    of validation tokens (at a random place of the stream for every sample), asked for at the end:

        ... haystack ...
        # The pass key is 58231. Remember it.
        ... haystack ...
        # What is the pass key? The pass key is[ 58231]

    Pieces are tokenized separately, so the answer's tokens inside the needle are the answer's tokens.
    Sample (length, depth, index) is a pure function of `seed`."""

    NEEDLE = ("\n# The pass key is", " {key}", ". Remember it.\n")
    QUESTION = "\n# What is the pass key? The pass key is"

    def __init__(self, tokenizer, haystack: np.ndarray, seed: int = 0, digits: int = 5):
        self.haystack = np.asarray(haystack, dtype=np.int64)
        self.seed = seed
        self.digits = digits
        self.tokenizer = tokenizer
        self.before, self.after = self._encode(self.NEEDLE[0]), self._encode(self.NEEDLE[2])
        self.question = self._encode(self.QUESTION)

    def _encode(self, text: str) -> np.ndarray:
        """A method, not a closure: a data-loader worker receives the task pickled (moba_train.data.sampler)."""
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def shortest_context(self) -> int:
        """The fewest tokens a context of any key needs: the needle, the question and the answer, with the key
        at its longest (one token for its space and one per digit)."""
        answer = self.digits + 1
        return len(self.before) + len(self.after) + len(self.question) + 2 * answer - 1

    def needle(self, key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The needle's tokens stating `key`: (before, the key's tokens = the answer, after)."""
        return self.before, self._encode(self.NEEDLE[1].format(key=key)), self.after

    def random_key(self, rng: np.random.Generator) -> int:
        return int(rng.integers(10 ** (self.digits - 1), 10**self.digits))

    def sample(self, context_length: int, depth: float, index: int) -> PasskeySample:
        rng = np.random.default_rng([self.seed, context_length, round(depth * 10**6), index])
        needle = self.needle(self.random_key(rng))
        filler = filler_length(needle, self.question, context_length)
        offset = int(rng.integers(0, max(len(self.haystack) - filler, 0) + 1))
        return place_needle(self.haystack[offset:], needle, self.question, context_length, depth)
