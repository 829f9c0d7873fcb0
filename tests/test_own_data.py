"""Your own data (examples/owndata.py), the "route" task's split, the chat template, and
`finetune.py --data / --generate` end to end on a tiny random model."""
import json
import re
from pathlib import Path

import pytest

from examples import routing
from examples.owndata import load_jsonl, split
from examples.task import chat

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SHIPPED = EXAMPLES / "data" / "reviews.jsonl"
GOOD = json.dumps({"prompt": "Capital of Peru?", "completion": "Lima"})


def write_lines(tmp_path, *lines) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def chat_line(*messages) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]})


def test_both_forms_become_examples(tmp_path):
    path = write_lines(tmp_path, GOOD, "", chat_line(("system", "Be terse."), ("user", "Hi"),
                                                     ("assistant", "Hello"), ("user", "2+2?"),
                                                     ("assistant", "4")))
    a, b = load_jsonl(path)
    assert a.turns == (("user", "Capital of Peru?"),) and a.answer == "Lima" and a.line == 1
    assert b.turns == (("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello"),
                       ("user", "2+2?")) and b.answer == "4" and b.line == 3  # blank line 2 skipped


BAD_LINES = [  # (line 2's text, exception type, words the message must contain)
    ("{not json", ValueError, "not valid JSON"),
    ('["prompt", "completion"]', TypeError, "expected a JSON object, got list"),
    ('{"prompt": "a"}', ValueError, "missing ['completion']"),
    ('{"prompt": "a", "completion": "b", "label": 1}', ValueError, "unexpected ['label']"),
    ('{"input": "a", "output": "b"}', ValueError, "missing ['completion', 'prompt']"),
    ('{"prompt": 3, "completion": "b"}', TypeError, "'prompt' must be a string, got int"),
    ('{"prompt": "a", "completion": null}', TypeError, "'completion' must be a string"),
    ('{"prompt": "  ", "completion": "b"}', ValueError, "'prompt' is empty"),
    ('{"prompt": "a", "completion": ""}', ValueError, "'completion' is empty"),
    ('{"messages": "hi"}', TypeError, "'messages' must be a list"),
    ('{"messages": []}', ValueError, "'messages' is empty"),
    (chat_line(("user", "a"), ("bot", "b")), ValueError, "role must be one of system, user, assistant, got 'bot'"),
    (chat_line(("user", "a"), ("user", "b")), ValueError, "messages[1].role is 'user' where 'assistant'"),
    (chat_line(("user", "a"), ("assistant", "b"), ("system", "c"), ("assistant", "d")), ValueError,
     "messages[2].role is 'system'"),
    (chat_line(("system", "s"), ("user", "a")), ValueError, "last message must be the assistant's"),
    (chat_line(("user", "a"), ("assistant", "")), ValueError, "messages[1].content is empty"),
    ('{"messages": [{"role": "user", "content": "a", "name": "x"}]}', ValueError, "exactly the keys"),
    ('{"messages": [["user", "a"]]}', TypeError, "messages[0] must be an object"),
]


@pytest.mark.parametrize("text, kind, words", BAD_LINES)
def test_a_malformed_line_is_an_error_naming_its_number(tmp_path, text, kind, words):
    path = write_lines(tmp_path, GOOD, text, GOOD)
    with pytest.raises(kind) as info:
        load_jsonl(path)
    assert "line 2:" in str(info.value) and words in str(info.value), str(info.value)


def test_empty_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ValueError, match="no examples"):
        load_jsonl(write_lines(tmp_path, "", "  "))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(GOOD.encode() + b"\n" + '{"prompt": "caf\xe9", "completion": "x"}'.encode("latin-1"))
    with pytest.raises(ValueError, match="line 2: not UTF-8"):
        load_jsonl(bad)


def test_split_is_seeded_disjoint_and_refuses_empty_sides(tmp_path):
    examples = load_jsonl(write_lines(tmp_path, *[json.dumps({"prompt": f"q{i}", "completion": "a"})
                                                  for i in range(10)]))
    train, held_out = split(examples, 0.3, seed=0)
    assert (len(train), len(held_out)) == (7, 3)
    assert split(examples, 0.3, seed=0) == (train, held_out)
    assert split(examples, 0.3, seed=1) != (train, held_out)
    assert sorted(e.line for e in train + held_out) == list(range(1, 11))
    for fraction in (0.01, 0.99, 0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="eval_fraction"):
            split(examples, fraction)


def test_route_held_out_split_shares_no_entity_with_training():
    for seed in (0, 1):
        train, held_out = routing.make_splits(400, 100, seed)
        assert (len(train), len(held_out)) == (400, 100)
        train_entities = {e for ex in train for e in ex.entities}
        held_entities = {e for ex in held_out for e in ex.entities}
        assert held_entities and not train_entities & held_entities
        for ex in held_out:  # no training name or brand appears anywhere in a held-out message
            assert not any(word in train_entities for word in ex.shown.replace("|", " ").split())
        assert {ex.answer for ex in held_out} == {json.dumps({"topic": t, "team": c})
                                                  for t, c in routing.TEAMS.items()}
    assert routing.make_splits(50, 20, 0) == routing.make_splits(50, 20, 0)


def test_route_answers_follow_the_topic_rule():
    train, _ = routing.make_splits(200, 0, 3)
    for ex in train:
        answer = json.loads(ex.answer)
        topic = answer["topic"]
        assert answer == {"topic": topic, "team": routing.TEAMS[topic]}
        message = ex.shown.split(" | ", 1)[1]
        patterns = [re.escape(t).replace(re.escape("{product}"), ".+") for t in routing.TOPICS[topic][1]]
        assert any(re.fullmatch(p, message) for p in patterns), (message, topic)


def test_shipped_example_file_is_valid_and_json():
    examples = load_jsonl(SHIPPED)
    assert 60 <= len(examples) <= 200
    assert all(set(json.loads(e.answer)) == {"product", "sentiment", "stars"} for e in examples)


def test_chat_template_renders_like_transformers_and_falls_back_to_chatml():
    pytest.importorskip("jinja2")
    from examples.chat_format import chat_format

    smollm2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
               "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
               "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|im_start|>assistant\n' }}{% endif %}")

    class Tok:
        eos_id, bos_id, chat_template = 2, None, smollm2

        def decode(self, ids, skip_special=True):
            return {2: "<|im_end|>"}[ids[0]]

    fmt, how = chat_format(Tok())
    turns = [("user", "Hi")]
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert fmt.render(turns) == system + chat(turns) and fmt.end == "<|im_end|>" and "own" in how
    assert fmt.render([("system", "S"), *turns]) == chat([("system", "S"), *turns])
    Tok.chat_template = None
    fmt, how = chat_format(Tok())
    assert fmt.render(turns) == chat(turns) and "ChatML" in how


# ---- end to end on a tiny random GGUF model (seconds, not minutes) ----

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from test_llama_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, dim=64, n_layers=1, n_heads=4, n_kv=2, ffn=128)
    return path


def test_data_run_on_the_shipped_file_then_generate_with_the_adapter(tmp_path, tiny_gguf, capsys):
    from examples import finetune

    out = tmp_path / "run"
    rc = finetune.main(["--data", str(SHIPPED), "--steps", "2", "--gguf", str(tiny_gguf), "--out",
                        str(out), "--threads", "1", "--eval-batch", "32", "--show", "1",
                        "--method", "lora", "--r", "4"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "your data (reviews.jsonl), 24 held-out examples" in text and "content before / after" in text
    assert "held-out loss by step: 1:" in text and (out / "loss.png").stat().st_size > 1000
    adapter = out / "adapter"
    assert json.loads((adapter / "loralab_prompt.json").read_text()) == {"method": "lora", "task": None, "bits": None}
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    rc = finetune.main(["--generate", "Nice kettle, 5 stars.", "--adapter", str(adapter),
                        "--gguf", str(tiny_gguf), "--max-new-tokens", "3", "--threads", "1"])
    assert rc == 0 and "answer:" in capsys.readouterr().out


def test_bad_data_writes_nothing(tmp_path, tiny_gguf, capsys):
    from examples import finetune

    out = tmp_path / "never"
    path = write_lines(tmp_path, GOOD, '{"prompt": "x"}')
    assert finetune.main(["--data", str(path), "--gguf", str(tiny_gguf), "--out", str(out)]) == 2
    assert "line 2:" in capsys.readouterr().err and not out.exists()
    path = write_lines(tmp_path, GOOD, GOOD)
    assert finetune.main(["--data", str(path), "--eval-fraction", "0.1", "--gguf", str(tiny_gguf),
                          "--out", str(out)]) == 2
    assert "leaves 2 for training and 0 held out" in capsys.readouterr().err and not out.exists()
    assert finetune.main(["--generate", "hi", "--adapter", str(tmp_path / "none"),
                          "--gguf", str(tiny_gguf)]) == 2
    assert "adapter folder not found" in capsys.readouterr().err
