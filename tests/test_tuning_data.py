"""Training data and settings: validation with line numbers, answer-only labels, the held-out split,
and the checks that reject a run before any model loads."""

from __future__ import annotations

import json
import time

import pytest

from assistant.errors import BedsideError
from assistant.tuning.config import load_train_config
from assistant.tuning.data import IGNORE_INDEX, Example, load_examples, split_heldout, tokenize_example

pytest_plugins = ["tuning_support"]

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Dose of X?"},
                     {"role": "assistant", "content": "Ten milligrams."}]}
INSTRUCTION = {"instruction": "Name the drug.", "input": "Patient with AF.", "output": "Apixaban."}


@pytest.fixture(scope="module")
def tokenizer(base_model):
    return base_model[1]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_examples_accepts_both_shapes(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(CHAT), "", json.dumps(INSTRUCTION)])
    report = load_examples(path)
    assert report.problems == []
    assert [e.line for e in report.examples] == [1, 3]
    assert report.examples[0].messages == CHAT["messages"]
    assert report.examples[1].messages == [
        {"role": "user", "content": "Name the drug.\n\nPatient with AF."},
        {"role": "assistant", "content": "Apixaban."},
    ]
    assert len(report.sha256) == 64


def test_load_examples_reports_bad_lines(tmp_path):
    lines = [
        json.dumps(INSTRUCTION),
        "{not json",
        json.dumps({"instruction": "No answer"}),
        json.dumps({"messages": [{"role": "user", "content": "Question only"}]}),
        json.dumps({"messages": [{"role": "doctor", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps(["a", "list"]),
        json.dumps({**INSTRUCTION, "messages": CHAT["messages"]}),
    ]
    report = load_examples(write_lines(tmp_path / "data.jsonl", lines))
    problems = dict(report.problems)
    assert len(report.examples) == 1
    assert sorted(problems) == [2, 3, 4, 5, 6, 7]
    assert "invalid JSON" in problems[2]
    assert "`output` is missing" in problems[3]
    assert "last message must be the assistant" in problems[4]
    assert "role 'doctor'" in problems[5]
    assert "JSON object" in problems[6]
    assert "both" in problems[7]


def test_load_examples_keeps_unicode_line_separators(tmp_path):
    # JSON allows U+2028, U+2029 and U+0085 unescaped inside strings; only "\n" ends a JSONL record
    answer = "First line\u2028second line\u2029third\u0085fourth."
    records = [{"instruction": "Keep the separators.", "output": answer}, INSTRUCTION]
    path = tmp_path / "data.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n", encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")

    report = load_examples(path)
    assert report.problems == []
    assert [e.line for e in report.examples] == [1, 2]
    assert report.examples[0].messages[1]["content"] == answer


def test_load_examples_rejects_file_without_valid_lines(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{broken", json.dumps({"text": "plain"})])
    with pytest.raises(BedsideError, match=r"no valid examples \(line 1: invalid JSON.*line 2: has neither"):
        load_examples(path)
    with pytest.raises(BedsideError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")


def test_labels_cover_answer_tokens_only(tokenizer):
    row = tokenize_example(tokenizer, CHAT["messages"], max_length=512)
    assert len(row["input_ids"]) == len(row["labels"])
    answer = [token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert answer == [label for label in row["labels"] if label != IGNORE_INDEX]
    # the answer span is the assistant text plus the template's end-of-turn marker
    assert tokenizer.decode(answer) == "Ten milligrams.<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(CHAT["messages"][:2], add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert row["input_ids"][: len(prompt)] == list(prompt)
    assert all(label == IGNORE_INDEX for label in row["labels"][: len(prompt)])


def test_labels_cover_every_assistant_turn(tokenizer):
    messages = [{"role": "user", "content": "First?"}, {"role": "assistant", "content": "One."},
                {"role": "user", "content": "Second?"}, {"role": "assistant", "content": "Two."}]
    row = tokenize_example(tokenizer, messages, max_length=512)
    labelled = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "One.<|im_end|>\nTwo.<|im_end|>\n"


def test_truncation_keeps_labels_aligned(tokenizer):
    row = tokenize_example(tokenizer, CHAT["messages"], max_length=10)
    assert len(row["input_ids"]) == len(row["labels"]) == 10


def test_heldout_split_is_stable_under_reordering_and_growth():
    examples = [Example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], i)
                for i in range(200)]
    train, heldout = split_heldout(examples, 0.1)
    assert len(train) + len(heldout) == 200
    assert 5 <= len(heldout) <= 40
    assert not {e.key for e in train} & {e.key for e in heldout}

    _, heldout_reversed = split_heldout(list(reversed(examples)), 0.1)
    assert {e.key for e in heldout_reversed} == {e.key for e in heldout}

    grown = examples + [Example([{"role": "user", "content": f"new{i}"}, {"role": "assistant", "content": "x"}], 0)
                        for i in range(50)]
    _, heldout_grown = split_heldout(grown, 0.1)
    assert {e.key for e in heldout} <= {e.key for e in heldout_grown}


def test_heldout_split_small_files():
    two = [Example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}], i)
           for i in range(2)]
    train, heldout = split_heldout(two, 0.1)
    assert (len(train), len(heldout)) == (1, 1)
    assert split_heldout(two[:1], 0.1) == (two[:1], [])
    assert split_heldout(two, 0.0) == (two, [])


def test_train_config_yaml_then_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("specialty: cardiology\ndata: d.jsonl\nlora_r: 4\nlr: 0.001\n"
                      "target_modules: q_proj, v_proj\n", encoding="utf-8")
    config = load_train_config(recipe, {"lora_r": 12, "seed": None})
    assert config.lora_r == 12
    assert config.lr == 0.001
    assert config.seed == 42
    assert config.target_modules == ["q_proj", "v_proj"]
    assert load_train_config(None, {"specialty": "c", "data": "d", "method": "full"}).learning_rate == 2e-5


@pytest.mark.parametrize(("overrides", "message"), [
    ({"method": "prefix"}, "method 'prefix' is invalid"),
    ({"lora_r": 0}, "lora_r = 0 is invalid"),
    ({"eval_fraction": 1.5}, "eval_fraction = 1.5 is invalid"),
    ({"specialty": ""}, "no specialty given"),
    ({"specialty": "../x"}, "specialty '../x' is invalid"),
    ({"lr": "fast"}, "'lr' has invalid value 'fast'"),
])
def test_train_config_rejects_invalid_values(overrides, message):
    values = {"specialty": "cardiology", "data": "d.jsonl", **overrides}
    with pytest.raises(BedsideError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_train_config(None, values)


def test_train_config_rejects_unknown_yaml_key(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("specialty: c\ndata: d\nlearning_rate: 0.1\n", encoding="utf-8")
    with pytest.raises(BedsideError, match="unknown training setting.*learning_rate"):
        load_train_config(recipe)


def test_qlora_without_cuda_rejected_before_loading(tmp_path, tiny_data):
    """The base path does not exist, so any attempt to load a model would fail with another message."""
    import torch

    from assistant.config import Settings
    from assistant.tuning.recipes import train

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: qlora is allowed here")
    config = load_train_config(None, {"specialty": "cardiology", "data": str(tiny_data["cardiology"]),
                                      "method": "qlora", "base": str(tmp_path / "no-such-model")})
    started = time.perf_counter()
    with pytest.raises(BedsideError, match="--method lora") as caught:
        train(config, Settings(adapters_dir=tmp_path / "adapters"))
    assert "CUDA" in str(caught.value)
    # nothing was loaded or written; the bound is loose because the test machine may be shared
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "adapters").exists()

