"""rlhfkit self-instruct: the numbered-list parser, each filter with hand-worked ROUGE-L, the builtin
seed tasks, an end-to-end run against a scripted endpoint (every filter, responses, resume without a
repeated request, the key never written), a run on the tiny local model, and sft training on the output."""

from __future__ import annotations

import json

import pytest

from core_helpers import read_metrics, write_jsonl
from rlhfkit.synthetic.self_instruct import (
    InstructionPool,
    drop_reason,
    load_seed_tasks,
    parse_numbered_list,
)
from scripted_endpoint import ScriptedEndpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------ pieces


def test_numbered_items_are_parsed_with_their_continuation_lines():
    reply = ("Sure! Here are more tasks:\n\n9. Explain how tides\n   work.\n10) Name three rivers.\n"
             "Task 11: Write a limerick.\n12.\n\nI hope these help!\n13. Last one\n- A bullet\n* Another")
    assert parse_numbered_list(reply) == ["Explain how tides work.", "Name three rivers.", "Write a limerick.",
                                          "Last one", "A bullet", "Another"]
    assert parse_numbered_list("No list here, just prose.") == []


@pytest.mark.parametrize("text, reason", [
    ("Tell a joke.", None),                                          # 3 words: the shortest kept
    ("Be brief.", "length"),                                         # 2 words
    ("Describe " + "a very long thing " * 40, "length"),             # 161 words
    ("Draw a cat using only letters of the alphabet.", "keyword"),
    ("Summarise the contents of the attached file.", "keyword"),
    ("Explain how to go to the moon in a rocket.", "keyword"),       # "go to" as two words
    ("Make a roadmap for learning Spanish in a year.", None),        # "map" inside a word is fine
    ('"Stay calm": explain this advice for a crisis.', "format"),
    ("Écrivez un poème sur la mer, en quatre vers.", "format"),      # starts with a non-ASCII letter
])
def test_cheap_filters(text, reason):
    assert drop_reason(text, min_words=3, max_words=150) == reason


def test_rouge_l_against_the_pool_by_hand():
    pool = InstructionPool(["Write a haiku about the first snow of winter.", "Name three rivers in Africa."])
    # tokens: write a haiku about the first snow of (the) winter (season): LCS 9 of 9 and 11 words,
    # P = 9/11, R = 9/9, F1 = 2PR/(P+R) = 18/20 = 0.9
    score, nearest = pool.nearest("Write a haiku about the first snow of the winter season.")
    assert score == pytest.approx(0.9) and nearest.startswith("Write a haiku")
    # "name three" in common with 5 and 4 words: P = 2/4, R = 2/5, F1 = 2 * 0.2 / 0.9 = 4/9
    assert pool.nearest("Name three famous painters.")[0] == pytest.approx(4 / 9)
    pool.add("Name three famous painters.")
    # LCS 4 of 6 candidate and 4 pool words: P = 4/6, R = 4/4, F1 = 2 * (2/3) / (5/3) = 0.8
    score, nearest = pool.nearest("Name three famous painters from Spain.")
    assert score == pytest.approx(0.8) and nearest == "Name three famous painters."
    assert pool.is_duplicate("name three FAMOUS painters!") and not pool.is_duplicate("Name three painters.")


def test_nearest_is_the_maximum_over_every_pool_instruction():
    """The pruned search (a word-count bound per pair) finds what scoring every pair finds."""
    from rouge_score import rouge_scorer

    pool_texts = [t.instruction for t in load_seed_tasks("builtin")]
    candidates = ["Give three tips for staying calm before an exam.", "Rewrite the sentence in the future tense.",
                  "Write a haiku about autumn leaves.", "Explain the difference between a lake and a pond.",
                  "Zebra.", "Sort the numbers from largest to smallest."]
    pool = InstructionPool(pool_texts)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for text in candidates:
        every = [scorer.score(p, text)["rougeL"].fmeasure for p in pool_texts]
        score, nearest = pool.nearest(text)
        assert score == max(every) and (score == 0 or every[pool_texts.index(nearest)] == score)
    assert pool.nearest("Zebra.") == (0.0, "")


def test_the_builtin_seed_tasks_pass_every_filter_and_are_mutually_distinct():
    tasks = load_seed_tasks("builtin")
    assert len(tasks) >= 20 and all(t.output for t in tasks)
    assert sum(bool(t.input) for t in tasks) >= 5
    assert all(drop_reason(t.instruction, 3, 150) is None for t in tasks)
    pool = InstructionPool([])
    for t in tasks:
        assert not pool.is_duplicate(t.instruction)
        assert pool.nearest(t.instruction)[0] < 0.7, t.instruction
        pool.add(t.instruction)


def test_a_bad_seed_file_names_each_problem(run_cli, tmp_path, no_model_loading):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": "Name a colour.", "output": "Red."},
                                                   {"output": "x"}, {"instruction": "Add.", "input": 3,
                                                                     "output": ""}])
    result = run_cli("self-instruct", "--seed-tasks", seeds, "--output", tmp_path / "o")
    assert result.code == 2
    assert result.errors == [f"error: {seeds}:2: field 'instruction': missing",
                             f"error: {seeds}:3: field 'input': expected a non-empty string",
                             f"error: {seeds}:3: field 'output': expected a non-empty string"]
    assert no_model_loading == []


# ------------------------------------------------------------------------------------ end to end

PROPOSALS = "\n".join([
    "Here are new tasks:",
    "27. Write a haiku about the first snow of the winter season.",   # near-duplicate of a seed task
    "28. Draw a picture of a cat using only letters.",                # keyword
    "29. Be brief.",                                                   # length
    '30. "Stay calm": explain what this advice means.',               # format
    "31. Explain why the sky looks blue on a clear day.",             # kept
    "32. explain why the sky looks blue on a clear day!",             # duplicate
    "33. Suggest three names for a shop that repairs old watches.",   # kept
    "34. Describe the rules of chess for a complete beginner.",       # unused: 2 were wanted
])


def scripted(fail_on: str = ""):
    def respond(body):
        text = body["messages"][-1]["content"]
        if text.startswith("Come up with a series of tasks"):
            return PROPOSALS
        if fail_on and fail_on in text:
            return 401, {"error": {"message": "invalid API key"}}
        return f"Answer: {text}"
    return respond


def test_self_instruct_against_an_endpoint_filters_responds_and_resumes(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTH_TEST_KEY", "sk-synth-secret-7")
    out = tmp_path / "si"
    flags = ["--model-name", "scripted", "--api-key-env", "SYNTH_TEST_KEY", "--output", out,
             "--num-instructions", "2", "--prompts-per-round", "1", "--concurrency", "1"]
    # one endpoint throughout: the request keys name it (a different URL is a different model)
    with ScriptedEndpoint(scripted(fail_on="watches")) as ep:
        first = run_cli("self-instruct", "--model-url", ep.url, *flags)
        assert ep.headers[0]["Authorization"] == "Bearer sk-synth-secret-7"
        assert len(ep.seen) == 3  # one proposal, the sky's response, the watches' refused response
        assert first.code == 1
        assert first.err.count("\n") == 1 and "error: model endpoint http://127.0.0.1:" in first.err
        assert "HTTP 401: invalid API key" in first.err and "1 answered instruction(s) so far" in first.err
        # what arrived before the error stays in the output
        assert [r["messages"][1]["content"] for r in read(out / "sft.jsonl")] == [
            "Answer: Explain why the sky looks blue on a clear day."]

        ep.respond = scripted()
        ep.seen.clear()
        second = run_cli("self-instruct", "--model-url", ep.url, *flags)
        assert [b["messages"][-1]["content"] for b in ep.seen] == [
            "Suggest three names for a shop that repairs old watches."]  # only the missing request
        assert second.code == 0, second.err
        records = read(out / "sft.jsonl")
        assert [r["messages"] for r in records] == [
            [{"role": "user", "content": text}, {"role": "assistant", "content": f"Answer: {text}"}]
            for text in ("Explain why the sky looks blue on a clear day.",
                         "Suggest three names for a shop that repairs old watches.")]
        stats = json.loads((out / "stats.json").read_text())
        assert {k: stats[k] for k in ("proposed", "kept", "dropped", "unused", "unparseable_replies", "rounds")} == {
            "proposed": 8, "kept": 2, "unused": 1, "unparseable_replies": 0, "rounds": 1,
            "dropped": {"length": 1, "keyword": 1, "format": 1, "duplicate": 1, "rouge": 1}}
        assert "kept 2 of 8 proposed" in second.out and "rouge 1" in second.out
        candidates = read(out / "candidates.jsonl")
        assert [c["status"] for c in candidates] == ["rouge", "keyword", "length", "format", "kept", "duplicate",
                                                     "kept", "unused"]
        assert candidates[0]["rouge_l"] == pytest.approx(0.9)
        assert candidates[0]["nearest"] == "Write a haiku about the first snow of winter."

        ep.seen.clear()
        assert run_cli("self-instruct", "--model-url", ep.url, *flags).code == 0
        assert ep.seen == []  # everything is in the journal
    assert read(out / "sft.jsonl") == records
    for path in out.iterdir():
        assert "sk-synth-secret-7" not in path.read_text(), path


def test_proposal_prompts_show_seed_and_generated_examples(run_cli, tmp_path):
    """Round 2's prompts show the instructions kept in round 1 (at most --generated-examples each)."""
    kept_round_1 = ["Explain why the sky looks blue on a clear day.",
                    "Suggest three names for a shop that repairs old watches.",
                    "Describe the rules of chess for a complete beginner."]
    with ScriptedEndpoint(scripted()) as ep:
        result = run_cli("self-instruct", "--model-url", ep.url, "--model-name", "m", "--output", tmp_path / "o",
                         "--num-instructions", "5", "--max-rounds", "2", "--prompts-per-round", "2",
                         "--examples-per-prompt", "4", "--generated-examples", "1")
        proposals = [b["messages"][0]["content"] for b in ep.seen if "numbered list" in b["messages"][0]["content"]]
    assert result.code == 0, result.err
    assert len(proposals) == 4
    shown = [[line.split(". ", 1)[1] for line in p.split("\n") if line[:1].isdigit()] for p in proposals]
    assert all(len(s) == 4 for s in shown)
    assert all(not set(s) & set(kept_round_1) for s in shown[:2])
    assert all(len(set(s) & set(kept_round_1)) == 1 for s in shown[2:])
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    # round 1's first reply gives the three new instructions; every later one repeats them
    assert stats["kept"] == 3 and stats["rounds"] == 2


def test_self_instruct_on_the_tiny_local_model_counts_everything_and_resumes(run_cli, tiny_lm, tmp_path):
    out = tmp_path / "si"
    flags = ["--model", tiny_lm, "--output", out, "--num-instructions", "2", "--max-rounds", "2",
             "--prompts-per-round", "2", "--max-new-tokens", "24", "--response-max-new-tokens", "8"]
    result = run_cli("self-instruct", *flags)
    assert result.code == 0, result.err
    stats = json.loads((out / "stats.json").read_text())
    assert stats["proposed"] == stats["kept"] + sum(stats["dropped"].values()) + stats["unused"]
    assert stats["unparseable_replies"] <= 4 and stats["rounds"] == (1 if stats["kept"] >= 2 else 2)
    requests = (out / "requests.jsonl").read_text()
    assert len(requests.splitlines()) == 2 * stats["rounds"] + stats["kept"]
    assert "fewer than --num-instructions" in result.out or stats["kept"] == 2
    before = {p.name: p.read_text() for p in out.iterdir() if p.name != "stats.json"}
    assert run_cli("self-instruct", *flags).code == 0
    assert (out / "requests.jsonl").read_text() == requests  # nothing asked again
    assert {p.name: p.read_text() for p in out.iterdir() if p.name != "stats.json"} == before


def test_sft_trains_on_self_instruct_output(run_cli, tiny_lm, tmp_path):
    with ScriptedEndpoint(scripted()) as ep:
        assert run_cli("self-instruct", "--model-url", ep.url, "--model-name", "m", "--output", tmp_path / "si",
                       "--num-instructions", "2", "--prompts-per-round", "1", "--include-seed-tasks").code == 0
    data = tmp_path / "si" / "sft.jsonl"
    assert len(read(data)) == 26 + 2
    result = run_cli("sft", "--model", tiny_lm, "--data", data, "--output", tmp_path / "sft", "--max-steps", "2",
                     "--batch-size", "2", "--max-length", "64", "--no-progress")
    assert result.code == 0, result.err
    assert [row["step"] for row in read_metrics(tmp_path / "sft")] == [1, 2]
