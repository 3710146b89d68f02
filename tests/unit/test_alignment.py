"""Cross-tokenizer alignment (teacher_scorers/alignment.py, vocab_map.py) on hand-made pairs of tokenizers, against
float64 references written from the definitions: chunk boundaries from each token's text, chunk sums, the spread
of a chunk's logprob over its student tokens, the vocabulary mapping and the tail; and the edge cases (multi-byte
UTF-8 split into byte tokens, whitespace and newlines, a text the teacher cannot reproduce)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from opd.protocol import LOGPROB_FLOOR
from teacher_scorers.alignment import AlignmentError, align, chunk_sums, spread, token_ends
from teacher_scorers.vocab_map import VocabMap
from tests.tokenizer_pairs import ADDITION_CORPUS, bpe_tokenizer, byte_level_bpe, char_tokenizer

ALPHABET = "0123456789+="


@pytest.fixture(scope="module")
def pair():
    return char_tokenizer(), bpe_tokenizer(ADDITION_CORPUS, 60, ALPHABET)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _reference_chunks(student_pieces: list[str], teacher_pieces: list[str]) -> list[tuple[int, int]]:
    """(student tokens, teacher tokens) per chunk, from cumulative piece lengths: the common offsets cut."""
    s_ends = np.cumsum([len(p) for p in student_pieces]).tolist()
    t_ends = np.cumsum([len(p) for p in teacher_pieces]).tolist()
    cuts = sorted(set(s_ends) & set(t_ends))
    out, si, ti = [], 0, 0
    for c in cuts:
        sj = s_ends.index(c) + 1
        tj = t_ends.index(c) + 1
        out.append((sj - si, tj - ti))
        si, ti = sj, tj
    return out


def test_chunks_are_the_spans_between_common_boundaries(pair):
    student, teacher = pair
    text = "123+45=168"
    s_ids, t_ids = _ids(student, text), _ids(teacher, text)
    t_pieces = [teacher.decode([i]) for i in t_ids]
    assert any(len(p) > 1 for p in t_pieces), "the BPE should merge digits"
    s_text, s_ends = token_ends(student, s_ids)
    t_text, t_ends = token_ends(teacher, t_ids)
    assert s_text == t_text == text
    chunks = align(s_ends, t_ends, len(text))
    got = [(c.s1 - c.s0, c.t1 - c.t0) for c in chunks]
    assert got == _reference_chunks(list(text), t_pieces)
    assert [text[c.c0 : c.c1] for c in chunks] == t_pieces  # the BPE's tokens each start and end on a char
    assert chunks[0].s0 == chunks[0].t0 == 0 and chunks[-1].s1 == len(s_ids) and chunks[-1].t1 == len(t_ids)


def test_chunk_sums_and_the_spread_match_float64_references(pair):
    rng = np.random.default_rng(0)
    student, teacher = pair
    text = "77+105=182"
    s_ids, t_ids = _ids(student, text), _ids(teacher, text)
    chunks = align(token_ends(student, s_ids)[1], token_ends(teacher, t_ids)[1], len(text))
    b = np.log(rng.uniform(0.05, 1.0, len(s_ids))).astype(np.float32)
    b[3] = 0.0  # a certain token
    lp_t = np.log(rng.uniform(0.05, 1.0, len(t_ids))).astype(np.float32)
    Q = chunk_sums(lp_t, chunks, "t")
    q = spread(b, Q, chunks)
    for c, qc in zip(chunks, Q, strict=True):
        want_q = math.fsum(float(x) for x in lp_t[c.t0 : c.t1])
        assert qc == pytest.approx(want_q, abs=1e-12)
        bc = math.fsum(float(x) for x in b[c.s0 : c.s1])
        n = c.s1 - c.s0
        for j in range(c.s0, c.s1):
            want = want_q if n == 1 else (float(b[j]) * want_q / bc if bc < 0 else want_q / n)
            assert float(q[j]) == pytest.approx(want, rel=1e-6, abs=1e-6)
        assert math.fsum(float(x) for x in q[c.s0 : c.s1]) == pytest.approx(want_q, rel=1e-5, abs=1e-5)
    assert (q <= 0).all()
    # reverse_kl_pg's advantages add up to the chunk-level reverse-KL estimate
    assert math.fsum(float(x) for x in q - b) == pytest.approx(float(Q.sum()) - float(b.sum()), abs=1e-4)


def test_the_same_tokenizer_gives_one_token_chunks_and_exact_scores(pair):
    student, _ = pair
    ids = _ids(student, "9+9=18")
    text, ends = token_ends(student, ids)
    chunks = align(ends, ends, len(text))
    assert all(c.s1 - c.s0 == 1 and c.t1 - c.t0 == 1 for c in chunks)
    lp = np.array([-0.1, -2.5, -1e-7, -3.0, -0.7, -0.2], dtype=np.float32)
    assert np.array_equal(spread(np.full(6, -1.0, np.float32), chunk_sums(lp, chunks, "t"), chunks), lp)


def test_a_multi_byte_character_split_into_byte_tokens_is_one_chunk():
    text = "a é 中 b\n"
    student = char_tokenizer("aéb 中\n")
    teacher = byte_level_bpe(["a b a b", "ab ba"], 270)  # no merge for é or 中: several byte tokens each
    t_ids = _ids(teacher, text)
    assert len(t_ids) > len(text), "é and 中 are byte tokens"
    t_text, t_ends = token_ends(teacher, t_ids)
    assert t_text == text and None in t_ends  # a byte token ends inside a character: no boundary there
    s_text, s_ends = token_ends(student, _ids(student, text))
    chunks = align(s_ends, t_ends, len(text))
    spans = [text[c.c0 : c.c1] for c in chunks]
    assert "".join(spans) == text and "é" in spans and "中" in spans


def test_whitespace_and_newlines_align_when_both_keep_them():
    text = "12 + 3\n\n= 15 "
    student = char_tokenizer("0123456789+= \n")
    teacher = byte_level_bpe([text * 3, "1 2 3\n"], 280)
    s_text, s_ends = token_ends(student, _ids(student, text))
    t_text, t_ends = token_ends(teacher, _ids(teacher, text))
    assert s_text == t_text == text
    chunks = align(s_ends, t_ends, len(text))
    assert "".join(text[c.c0 : c.c1] for c in chunks) == text


def test_texts_the_two_tokenisations_cannot_share_are_refused():
    with pytest.raises(AlignmentError, match="no text"):
        align([], [], 0)
    with pytest.raises(AlignmentError, match="end where the text does"):
        align([1, 2], [1, 3], 3)


def test_the_vocabulary_map_matches_exact_token_texts_and_roles(pair):
    student, teacher = pair
    vmap = VocabMap(student, teacher, len(student), len(teacher))
    for tid in range(len(teacher)):
        text = teacher.decode([tid])
        sid = int(vmap.to_student[tid])
        if tid in teacher.all_special_ids:
            continue
        if len(text) == 1:
            assert student.decode([sid]) == text
        else:
            assert sid == -1  # "12" has no student token
    for role in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert vmap.to_student[getattr(teacher, role)] == getattr(student, role)
    same = VocabMap(student, student, len(student), len(student))
    assert np.array_equal(same.to_student, np.arange(len(student)))


def test_a_mapped_top_k_moves_unmatched_mass_to_the_tail_float64(pair):
    student, teacher = pair
    vmap = VocabMap(student, teacher, len(student), len(teacher))
    multi = next(
        i for i in range(len(teacher)) if len(teacher.decode([i])) > 1 and i not in teacher.all_special_ids
    )
    one = _ids(teacher, "7")[0]
    two = _ids(teacher, "+")[0]
    ids = np.array([multi, one, two, teacher.eos_token_id])
    lp = np.log(np.array([0.5, 0.2, 0.1, 0.05]))
    tail = float(np.log(0.15))
    out_ids, out_lp, new_tail, share = vmap.map_topk(ids, lp.astype(np.float32), tail, 4)
    s7, splus = _ids(student, "7")[0], _ids(student, "+")[0]
    assert out_ids[:3].tolist() == [s7, splus, student.eos_token_id]
    assert len(set(out_ids.tolist())) == 4 and out_lp[3] == LOGPROB_FLOOR
    assert new_tail == pytest.approx(math.log(0.15 + 0.5), abs=1e-6)
    assert share == pytest.approx(0.35 / 0.85, abs=1e-6)
    # identical vocabularies: the row, its tail and a full share come back unchanged
    same = VocabMap(student, student, len(student), len(student))
    sid = np.array([4, 9, 2, 7])
    r_ids, r_lp, r_tail, r_share = same.map_topk(sid, lp.astype(np.float32), tail, 4)
    assert r_ids.tolist() == sid.tolist() and np.array_equal(r_lp, lp.astype(np.float32))
    assert r_tail == tail and r_share == pytest.approx(1.0)
    # no tail from the backend: the unmatched entries just leave the row (the learner's 1 - sum counts them)
    assert vmap.map_topk(ids, lp.astype(np.float32), None, 4)[2] is None


def test_the_step_record_averages_the_alignment_figures_of_the_aligned_trajectories():
    from learner.learner import alignment_figures
    from tests.scored import scored_trajectories

    trajs = scored_trajectories(3, topk=0)
    assert alignment_figures(trajs) == {}  # a teacher of the student's tokenizer: no figures
    for t, chunks, matched in zip(trajs[:2], (1, 2), (0.5, None), strict=True):
        t.teacher_chunks, t.teacher_topk_matched = chunks, matched
    tokens = len(trajs[0].response_token_ids) + len(trajs[1].response_token_ids)
    assert alignment_figures(trajs) == {
        "alignment_chunks_per_response": 1.5,
        "alignment_tokens_per_chunk": tokens / 3,
        "topk_matched_mass": 0.5,
    }


def test_the_incremental_boundaries_equal_the_definition_on_random_text():
    """token_ends decodes from a nearby anchor (linear time); each end must be what the definition gives: the
    length of decode(ids[:i+1]) when that is a prefix of the text and ends on a whole character."""
    from teacher_scorers.alignment import _prefix_end, decode

    rng = np.random.default_rng(3)
    words = ["the", "quick", "12", "+", "=", "é", "中文", "\n\n", " ", "brown"]
    text = "".join(rng.choice(words) for _ in range(400))
    for tok in (
        byte_level_bpe([text[:300], "the quick brown"], 300),
        char_tokenizer("".join(sorted(set(text)))),
    ):
        ids = _ids(tok, text)
        got_text, ends = token_ends(tok, ids)
        want = [_prefix_end(tok, ids, i, got_text) for i in range(len(ids))]
        want[-1] = len(got_text) if want[-1] is None else want[-1]
        assert got_text == decode(tok, ids) == text and ends == want


def test_byte_fallback_tokens_of_one_character_are_one_chunk():
    """A SentencePiece-style byte fallback: a character outside the vocabulary is written as its UTF-8 bytes
    (<0xC3> <0xA9> for é); the first byte token ends inside the character, so it has no boundary."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<s>", "</s>", "<unk>", *"abc "]
    vocab = {t: i for i, t in enumerate(base + [f"<0x{b:02X}>" for b in range(256)])}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    raw.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    teacher = PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="</s>"
    )
    student = char_tokenizer("abcé ")
    text = "ab é c"
    t_ids = _ids(teacher, text)
    assert [teacher.convert_ids_to_tokens(i) for i in t_ids][3:5] == ["<0xC3>", "<0xA9>"]
    t_text, t_ends = token_ends(teacher, t_ids)
    assert t_text == text and t_ends[3] is None and t_ends[4] == 4
    s_text, s_ends = token_ends(student, _ids(student, text))
    chunks = align(s_ends, t_ends, len(text))
    e = next(c for c in chunks if text[c.c0 : c.c1] == "é")
    assert (e.s1 - e.s0, e.t1 - e.t0) == (1, 2)
