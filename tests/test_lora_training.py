"""A small training run: LoRA on a frozen random MLP fits a target the frozen MLP cannot."""
import torch
from torch import nn

from lora import LoRAConfig, apply_lora, trainable_parameters


def test_lora_fits_low_rank_shifted_target():
    torch.manual_seed(0)
    d, hidden, n = 16, 32, 256
    mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))
    # The target is the same MLP with rank-2 changes to both weights: reachable by LoRA r=4.
    target = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, d))
    target.load_state_dict(mlp.state_dict())
    with torch.no_grad():
        for layer in (target[0], target[2]):
            out_f, in_f = layer.weight.shape
            layer.weight += torch.randn(out_f, 2) @ torch.randn(2, in_f) / 2
    x = torch.randn(n, d)
    y = target(x).detach()
    frozen_before = {k: v.clone() for k, v in mlp.state_dict().items()}

    apply_lora(mlp, LoRAConfig(r=4, alpha=4, target_modules=["0", "2"]))
    trainable, total = trainable_parameters(mlp)
    assert trainable == 4 * (d + hidden) * 2 and trainable < total
    opt = torch.optim.Adam([p for p in mlp.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(300):
        loss = nn.functional.mse_loss(mlp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.1  # the frozen MLP is far from the target
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    for key, value in frozen_before.items():  # the base never moved
        assert torch.equal(mlp.get_submodule(key.rsplit(".", 1)[0]).base_layer.state_dict()[key.rsplit(".", 1)[1]],
                           value)
