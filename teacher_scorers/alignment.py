"""Cross-tokenizer alignment: the student's response tokens against the teacher's tokens of the same text.

A teacher with another tokenizer cannot score the student's ids. The scorer decodes the student's response to
text, tokenises that text with the teacher's tokenizer, has the teacher score its own tokens, and maps the result
back by **aligned chunks**: the maximal spans of text at whose two ends both tokenisations have a token boundary.
Inside a chunk neither side's tokens correspond one to one, but both spell the same text after the same context,
so the chunk's log-probability is comparable: the teacher's is the sum of its token logprobs in the chunk, the
student's the sum of its behaviour logprobs. With the same tokenizer on both sides every chunk is one token and
nothing changes.

Boundaries come from decoding: the text of a token sequence is `decode(ids)`, and a token ends at character c when
`decode(ids[:i+1])` is the first c characters of the whole text. A token that ends inside a character (a byte-fallback
or byte-level piece of a multi-byte UTF-8 character: its prefix decodes to U+FFFD) has no boundary, and joins the
next one. A token that decodes to nothing ends where the previous one did and joins the next chunk.

How a chunk's signal reaches the student's tokens (`spread`): each token t of a chunk c gets the teacher logprob
    q_t = b_t * (Q_c / B_c)        (Q_c, B_c: the chunk's teacher and behaviour logprob sums; both <= 0)
and q_t = Q_c / n when B_c is 0 (every token was certain). So
  * the chunk's sum is exact: sum_t q_t = Q_c, so the sequence's reverse-KL estimate sum_t (b_t - q_t), which
    `reverse_kl_pg`'s advantages A_t = q_t - b_t add up to, is the chunk-level one, term for term;
  * every q_t is a log-probability (<= 0), as the wire format and the learner require;
  * the chunk's advantage A_c = Q_c - B_c is shared among its tokens in proportion to their surprisal b_t (the
    tokens where the student's choice was not certain carry the correction); a certain token (b_t = 0) gets none;
  * a chunk of one student token gets exactly Q_c, so identical tokenizers reproduce the plain scores bit for bit.
Why not the whole A_c on every token: the sequence's total would count a chunk n times (long chunks would weigh
more) and q_t = b_t + A_c can exceed 0. Why not all of it on the chunk's last token: the other tokens are part of
the same choice and would get no signal, and q_last can exceed 0 as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole UTF-8 character


class AlignmentError(ValueError):
    """A response the two tokenizers cannot be aligned on (the scorer dead-letters it rather than train on it)."""


def decode(tokenizer, ids: list[int]) -> str:
    """The text of `ids` exactly as written: special tokens kept, no clean-up of spaces (both change offsets).
    A fast tokenizer's Rust decoder directly (what its `decode` calls, less the per-call conversions)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode(list(ids), skip_special_tokens=False)
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


WINDOW = (
    16  # tokens back to the anchor of an incremental decode (a longer run without a boundary decodes in full)
)


def _prefix_end(tokenizer, ids: list[int], i: int, text: str) -> int | None:
    """Where token i ends by the definition: the length of decode(ids[:i+1]) if that is a prefix of `text` and
    does not end inside a character; None otherwise."""
    prefix = decode(tokenizer, ids[: i + 1])
    return len(prefix) if text.startswith(prefix) and REPLACEMENT not in prefix[-1:] else None


def token_ends(tokenizer, ids: list[int]) -> tuple[str, list[int | None]]:
    """The text of `ids` and, per token, the character offset where it ends, or None where it ends inside a
    character (its prefix does not decode to a prefix of the text).

    Incremental, so linear in the response: token i's text is decode(ids[a:i+1]) minus decode(ids[a:a+1]), with
    anchor a the nearest earlier token that ends on a boundary (at most WINDOW back); decoding from an anchor
    token and subtracting its own text keeps what a decoder does at the start of a sequence (SentencePiece drops
    the first space) out of the difference. The piece must sit in the text right after the anchor's end, or the
    token falls back to the definition (a full prefix decode)."""
    text = decode(tokenizer, ids)
    ends: list[int | None] = []
    last: int | None = None  # the latest token with a boundary
    for i in range(len(ids)):
        end, known = None, False
        if last is not None and i - last <= WINDOW:
            anchor = decode(tokenizer, ids[last : last + 1])
            piece = decode(tokenizer, ids[last : i + 1])
            if piece.startswith(anchor):
                piece, start = piece[len(anchor) :], ends[last]
                if REPLACEMENT in piece[-1:]:
                    known = True  # ends inside a character: no boundary
                elif text.startswith(piece, start):
                    end, known = start + len(piece), True
        if not known:
            end = _prefix_end(tokenizer, ids, i, text)
        ends.append(end)
        if end is not None:
            last = i
    if ends and ends[-1] is None:
        ends[-1] = len(text)  # the whole sequence ends where its text does
    return text, ends


@dataclass(frozen=True)
class Chunk:
    """Student tokens [s0, s1) and teacher tokens [t0, t1) spelling text [c0, c1)."""

    s0: int
    s1: int
    t0: int
    t1: int
    c0: int
    c1: int


def _groups(ends: list[int | None], cuts: set[int]) -> list[tuple[int, int, int]]:
    """Token index ranges [i0, i1) ending at a cut offset, with that offset; a token with no boundary, one that
    adds no text, or one ending at an offset not in `cuts` joins the next range. Trailing tokens that add no text
    join the last range."""
    out: list[tuple[int, int, int]] = []
    start, last = 0, 0
    for i, end in enumerate(ends):
        if end is not None and end in cuts and end > last:
            out.append((start, i + 1, end))
            start, last = i + 1, end
    if start < len(ends):
        if not out:
            raise AlignmentError("no common boundary at the end of the text")
        i0, _, end = out[-1]
        out[-1] = (i0, len(ends), end)
    return out


def align(student_ends: list[int | None], teacher_ends: list[int | None], length: int) -> list[Chunk]:
    """The aligned chunks of one text of `length` characters tokenised two ways (`token_ends` of each)."""
    if length == 0:
        raise AlignmentError("the response decodes to no text")
    cuts = {e for e in student_ends if e is not None} & {e for e in teacher_ends if e is not None}
    if length not in cuts:
        raise AlignmentError("the two tokenisations do not both end where the text does")
    s, t = _groups(student_ends, cuts), _groups(teacher_ends, cuts)
    if [e for *_, e in s] != [e for *_, e in t]:  # both cut at every common offset, so this cannot differ
        raise AlignmentError("the two tokenisations cut the text differently")
    chunks, c0 = [], 0
    for (s0, s1, end), (t0, t1, _) in zip(s, t, strict=True):
        chunks.append(Chunk(s0, s1, t0, t1, c0, end))
        c0 = end
    return chunks


def chunk_sums(values: np.ndarray, chunks: list[Chunk], side: str) -> np.ndarray:
    """Per chunk, the float64 sum of `values` over its student ("s") or teacher ("t") tokens."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = ("s0", "s1") if side == "s" else ("t0", "t1")
    return np.array([v[getattr(c, lo) : getattr(c, hi)].sum() for c in chunks], dtype=np.float64)


def spread(behaviour: np.ndarray, teacher_chunk: np.ndarray, chunks: list[Chunk]) -> np.ndarray:
    """Per student token, its share q_t of its chunk's teacher logprob (module docstring): float32, <= 0."""
    b = np.asarray(behaviour, dtype=np.float64)
    q = np.zeros(len(b), dtype=np.float64)
    for c, qc in zip(chunks, teacher_chunk, strict=True):
        n = c.s1 - c.s0
        if n == 1:
            q[c.s0] = qc
            continue
        bc = b[c.s0 : c.s1].sum()
        q[c.s0 : c.s1] = b[c.s0 : c.s1] * (qc / bc) if bc < 0 else qc / n
    return np.minimum(q, 0.0).astype(np.float32)
