"""The demo's task (examples/task.py) and its batching (examples/training.py)."""
import json

import pytest
import torch

from examples.task import Example, accuracy, completion, exact_match, make_splits, prompt
from examples.training import IGNORE, collate, encode_example


def test_splits_are_seeded_sized_and_disjoint():
    train, held_out = make_splits(300, 100, seed=0)
    assert (len(train), len(held_out)) == (300, 100)
    assert make_splits(300, 100, seed=0) == (train, held_out)
    assert make_splits(300, 100, seed=1)[1] != held_out
    assert not {e.source for e in train} & {e.source for e in held_out}
    assert len({e.source for e in train + held_out}) == 400


def test_answers_are_the_facts_of_the_sentence():
    for ex in make_splits(50, 50, seed=3)[0] + make_splits(50, 50, seed=3)[1]:
        fields = json.loads(ex.answer)
        assert list(fields) == ["name", "age", "city"]
        assert isinstance(fields["age"], int) and 18 <= fields["age"] <= 90
        for value in fields.values():
            assert str(value) in ex.source and ex.source in ex.turns[-1][1]
        assert ex.answer == json.dumps(fields)  # one canonical spelling


def test_exact_match_and_accuracy():
    ex = Example((("user", "Ana is 30 and lives in Oslo."),), '{"name": "Ana", "age": 30, "city": "Oslo"}')
    assert exact_match(' {"name": "Ana", "age": 30, "city": "Oslo"}\n', ex)
    assert not exact_match('{"name": "Ana", "age": "30", "city": "Oslo"}', ex)
    assert not exact_match('```json\n{"name": "Ana", "age": 30, "city": "Oslo"}\n```', ex)
    assert accuracy([ex.answer, "no"], [ex, ex]) == 0.5
    with pytest.raises(ValueError, match="predictions"):
        accuracy([ex.answer], [ex, ex])
    with pytest.raises(ValueError, match="n_train"):
        make_splits(-1, 10)


def test_prompt_is_chatml_with_shots_as_earlier_turns():
    train, held_out = make_splits(5, 1, seed=0)
    zero = prompt(held_out[0])
    assert zero.startswith("<|im_start|>user\n") and zero.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert held_out[0].source in zero and held_out[0].answer not in zero
    two = prompt(held_out[0], train[:2])
    assert two.count("<|im_start|>assistant\n") == 3 and two.endswith(zero.split("<|im_start|>", 1)[1])
    assert train[0].answer + "<|im_end|>" in two and completion(train[0]) == train[0].answer + "<|im_end|>"


class CharTokenizer:
    """One id per character; enough to check masking and shifting."""

    pad_id = 0

    def encode(self, text):
        return [ord(c) for c in text]


def test_encode_masks_the_prompt_and_collate_shifts():
    tok = CharTokenizer()
    exs = make_splits(2, 0, seed=0)[0]
    pairs = [encode_example(tok, ex) for ex in exs]
    for (ids, labels), ex in zip(pairs, exs, strict=True):
        n_prompt = len(prompt(ex))
        assert labels[:n_prompt] == [IGNORE] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:] == tok.encode(completion(ex))
    idx, targets = collate(pairs, pad_id=tok.pad_id)
    T = max(len(ids) for ids, _ in pairs) - 1
    assert idx.shape == targets.shape == (2, T)
    for b, (ids, labels) in enumerate(pairs):
        n = len(ids) - 1
        assert idx[b, :n].tolist() == ids[:-1] and targets[b, :n].tolist() == labels[1:]
        assert (targets[b, n:] == IGNORE).all() and (idx[b, n:] == tok.pad_id).all()
    # Exactly the answer tokens are scored.
    assert int((targets != IGNORE).sum()) == sum(len(completion(e)) for e in exs)
    assert targets.dtype == torch.long


def test_answer_only_loss_equals_the_full_cross_entropy():
    from examples.llama import Llama, LlamaConfig
    from examples.training import lm_loss

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=128, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                              ffn_dim=24, max_seq_len=256)).double()
    pairs = [encode_example(CharTokenizer(), ex) for ex in make_splits(3, 0, seed=1)[0]]
    idx, targets = collate(pairs, pad_id=0)
    ref = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), targets.flatten(),
                                            ignore_index=IGNORE)
    torch.testing.assert_close(lm_loss(model, idx, targets), ref, atol=1e-12, rtol=1e-12)


def test_held_out_loss_weighs_every_answer_token_the_same():
    from examples.llama import Llama, LlamaConfig
    from examples.training import lm_loss, mean_loss

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=128, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                              ffn_dim=24, max_seq_len=256)).double()
    examples = make_splits(5, 0, seed=2)[0]
    tok = CharTokenizer()
    whole = lm_loss(model, *collate([encode_example(tok, ex) for ex in examples], pad_id=0))
    # Batches of 2, 2 and 1 with different answer lengths: a mean of batch means would differ.
    assert mean_loss(model, tok, examples, batch_size=2) == pytest.approx(whole.item(), rel=1e-12)
