"""Incremental detokenization, stop strings and the reasoning splitter."""

from pdmesh.openai.reasoning import ReasoningParser
from pdmesh.tokenizer import StopStringMatcher


def stream_decode(tok, ids, prompt=()):
    d = tok.detokenizer(prompt)
    return "".join(d.step(t) for t in ids) + d.flush()


def test_detokenizer_matches_full_decode_multibyte(tokenizer):
    for text in ["Hello, world!", "日本語のテキスト", "emoji 🎉🚀 mix é à ü", "a  b\n\nc\t", "Ωmega≈≠"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert stream_decode(tokenizer, ids) == tokenizer.decode(ids)


def test_detokenizer_never_emits_partial_characters(tokenizer):
    ids = tokenizer.encode("🎉🚀", add_special_tokens=False)
    assert len(ids) > 2  # byte-level pieces
    d = tokenizer.detokenizer()
    pieces = [d.step(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + d.flush() == "🎉🚀"


def test_detokenizer_with_prompt_context(tokenizer):
    prompt = tokenizer.encode("The answer is", add_special_tokens=False)
    out = tokenizer.encode(" forty-two.", add_special_tokens=False)
    full = tokenizer.decode(prompt + out)
    assert tokenizer.decode(prompt) + stream_decode(tokenizer, out, prompt) == full


def feed_all(m, parts):
    out, hit = "", False
    for p in parts:
        text, hit = m.feed(p)
        out += text
        if hit:
            return out, True
    return out + m.flush(), False


def test_stop_string_split_across_deltas():
    m = StopStringMatcher(["END"])
    assert feed_all(m, ["hello E", "N", "D more"]) == ("hello ", True)


def test_stop_string_holdback_released_when_not_a_match():
    m = StopStringMatcher(["END"])
    text, hit = m.feed("abc EN")
    assert (text, hit) == ("abc ", False)
    text, hit = m.feed("x")
    assert (text, hit) == ("ENx", False)


def test_stop_string_earliest_wins_and_include():
    m = StopStringMatcher(["b", "abc"], include_in_output=True)
    assert m.feed("xxabcd") == ("xxabc", True)  # "abc" starts before "b"
    assert feed_all(StopStringMatcher([]), ["a", "b"]) == ("ab", False)


def run_parser(p, parts):
    r, c = "", ""
    for part in parts:
        a, b = p.feed(part)
        r, c = r + a, c + b
    a, b = p.flush()
    return r + a, c + b


def test_reasoning_split_streamed_tags():
    assert run_parser(ReasoningParser(), ["<th", "ink>let me ", "think</thi", "nk>\n\nAnswer", " 42"]) == (
        "let me think", "Answer 42")


def test_reasoning_absent_and_late_tags_are_content():
    assert run_parser(ReasoningParser(), ["Hi ", "<think>x</think>"]) == ("", "Hi <think>x</think>")
    assert run_parser(ReasoningParser(), ["<", "b>bold"]) == ("", "<b>bold")


def test_reasoning_opened_by_template():
    assert run_parser(ReasoningParser(in_reasoning=True), ["step 1", "</think>", "done"]) == ("step 1", "done")
    assert run_parser(ReasoningParser(in_reasoning=True), ["unfinished </thi"]) == ("unfinished </thi", "")
