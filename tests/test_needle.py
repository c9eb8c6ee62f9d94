"""Long-context evaluation: the needle generator and scorer, needle runs on Gemma 3 270M, and long-chunk KLD."""
from __future__ import annotations

import pytest

from qaq_gguf import needle
from qaq_gguf.evaluate import CacheConfig, evaluate, read_text_file


class WordTokenizer:
    """One token per whitespace-separated word (ids from a growing vocabulary); BOS = 0."""
    bos = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = [""]

    def __call__(self, text: str) -> list[int]:
        out = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            out.append(self.vocab[w])
        return out

    def text(self, toks) -> str:
        return " ".join(self.words[t] for t in toks)


HAY = "\n".join(f"Sentence number {i} of the haystack talks about nothing. It ends here." for i in range(40))


@pytest.mark.parametrize("kind", needle.KINDS)
def test_case_places_every_needle_at_its_depth(kind):
    tok = WordTokenizer()
    depths = needle.depth_grid(5)
    case = needle.make_case(tok, kind, 600, depths, HAY, seed=3)
    assert case.tokens[0] == 0 and 0 not in case.tokens[1:]
    longest_q = max(len(n.question) for n in case.needles)
    assert len(case.tokens) + longest_q + needle.MAX_ANSWER_TOKENS == 600  # the context fills the length exactly
    body = len(case.tokens) - 1
    positions = [n.position for n in case.needles]
    assert positions == sorted(positions) and len(set(positions)) == 5
    for n in case.needles:
        sentence, question = needle._phrases(kind, n.key, n.value)
        got = tok.text(case.tokens[n.position:n.position + len(tok(sentence))])
        assert got == " ".join(sentence.split())  # the needle's sentence, whole, at its position
        assert tok.text(n.question) == " ".join(question.split())
        assert abs(n.position - 1 - n.depth * body) <= 40  # nearest sentence boundary (sentences are <= 12 words)
    assert case.needles[0].position == 1 and case.needles[-1].position > body - 40
    assert len({n.value for n in case.needles}) == 5 and len({n.key for n in case.needles}) == 5
    if kind == "niah":
        assert "haystack" in tok.text(case.tokens)
    else:
        assert "grass" in tok.text(case.tokens)


def test_cases_are_deterministic_and_seeded():
    a = needle.make_case(WordTokenizer(), "niah", 400, [0.5], HAY, seed=1)
    b = needle.make_case(WordTokenizer(), "niah", 400, [0.5], HAY, seed=1)
    c = needle.make_case(WordTokenizer(), "niah", 400, [0.5], HAY, seed=2)
    assert a == b
    assert (a.needles[0].value, a.needles[0].key) != (c.needles[0].value, c.needles[0].key)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="haystack"), "unknown needle kind"),
    (dict(depths=[]), "at least one depth"),
    (dict(depths=[1.5]), r"fractions in \[0, 1\]"),
    (dict(length=40), "no room"),
    (dict(haystack=""), "needs a haystack"),
    (dict(haystack="\n\n"), "no sentences"),
])
def test_bad_case_arguments_are_refused(kwargs, match):
    args = dict(kind="niah", length=400, depths=[0.5], haystack=HAY) | kwargs
    with pytest.raises(ValueError, match=match):
        needle.make_case(WordTokenizer(), args["kind"], args["length"], args["depths"], args["haystack"])


def test_scorer_takes_the_first_number():
    assert needle.is_correct("4825193.", "4825193")
    assert needle.is_correct(" 4825193, and then 12", "4825193")
    assert not needle.is_correct("48251930", "4825193")
    assert not needle.is_correct("12 or 4825193", "4825193")
    assert not needle.is_correct("I do not know", "4825193")
    assert needle.depth_grid(1) == [0.5] and needle.depth_grid(3) == [0.0, 0.5, 1.0]


def test_needle_run_on_gemma(gemma, eval_text):
    """The whole run on the real model: the reference and an identical f16 config give the same answers, the f16
    cache finds the needles in a short context, and the bits and cells are reported per config."""
    cfgs = [CacheConfig("f16 again", type_k="f16", type_v="f16"), CacheConfig("q8_0", type_k="q8_0", type_v="q8_0")]
    res = needle.run(gemma, cfgs, kind="niah", lengths=[768], depths=[0.0, 0.5, 1.0], haystack=eval_text,
                     n_threads=2, progress=False)
    ref, again, q8 = res["configs"]
    assert [r["label"] for r in res["configs"]] == ["f16", "f16 again", "q8_0"]
    assert again["agree_f16"] == 100.0 and again["cells"] == ref["cells"]
    assert ref["correct"] >= 2, ref["cells"]  # three needles in 768 tokens: the f16 cache finds them
    assert q8["avg_bits"] == pytest.approx(8.5) and ref["avg_bits"] == pytest.approx(16.0)
    assert len(q8["cells"]) == 3 and all(c["length"] == 768 for c in q8["cells"])
    assert "768" in needle.table(res)


def test_needle_run_refuses_lengths_past_the_training_context(gemma):
    with pytest.raises(ValueError, match="training context"):
        needle.run(gemma, [], kind="passkey", lengths=[65536], depths=[0.5], progress=False)


def test_long_chunk_kld_equals_the_1024_harness_on_its_first_chunk(gemma, eval_text):
    """Scored from position 512 on, a 2048-token chunk's KLD over positions 512..1022 is the 1024-token harness's
    KLD on the first chunk: same tokens, causal attention."""
    cfg = [CacheConfig("q4_0", type_k="q4_0", type_v="q4_0")]
    short = evaluate(gemma, eval_text, cfg, n_ctx=1024, n_chunks=1, n_threads=2, progress=False)
    long = evaluate(gemma, eval_text, cfg, n_ctx=2048, n_chunks=1, n_threads=2, progress=False,
                    score_from=512, position_edges=[1023])
    first = long["results"][0]["by_position"][0]
    assert (first["from"], first["to"], first["n"]) == (512, 1023, short["settings"]["n_tokens_scored"])
    assert first["kld"] == pytest.approx(short["results"][0]["kld"], rel=1e-3, abs=1e-6)
    assert first["top1"] == pytest.approx(short["results"][0]["top1"], abs=0.3)
    assert long["settings"]["n_tokens_scored"] == 2047 - 512
    with pytest.raises(ValueError, match="position edges"):
        evaluate(gemma, eval_text, cfg, n_ctx=1024, n_chunks=1, progress=False, position_edges=[300])
