"""benchmarks/training.py's masked mode feeds both providers the same batch: this project
the shifted (input, target) pair of `examples/training.collate`, transformers the whole
sequence with labels aligned to it (the model shifts them). Rebuilding the second from the
first must give back every example's token ids and labels exactly."""
import random

import torch

from benchmarks.training import _hf_inputs
from examples.training import IGNORE, collate

PAD = 0


def test_transformers_inputs_are_the_original_sequences():
    rng = random.Random(0)
    pairs = []
    for _ in range(6):
        n_prompt, n_answer = rng.randint(1, 9), rng.randint(1, 6)
        ids = [rng.randint(1, 99) for _ in range(n_prompt + n_answer)]
        pairs.append((ids, [IGNORE] * n_prompt + ids[n_prompt:]))
    idx, targets = collate(pairs, PAD)
    ids, labels = _hf_inputs(idx, targets, PAD)
    T1 = max(len(i) for i, _ in pairs)
    assert ids.shape == labels.shape == (len(pairs), T1)
    for b, (seq, lab) in enumerate(pairs):
        assert ids[b, :len(seq)].tolist() == seq
        assert (ids[b, len(seq):] == PAD).all()
        # transformers scores position t against labels[t + 1]: the first label is never used
        assert labels[b, 1:len(seq)].tolist() == lab[1:]
        assert (labels[b, len(seq):] == IGNORE).all() and labels[b, 0] == IGNORE
    scored = (labels[:, 1:] != IGNORE).sum()
    assert scored == (targets != IGNORE).sum() == sum(sum(t != IGNORE for t in lab[1:]) for _, lab in pairs)
    assert torch.equal(labels[:, 1:], targets)
