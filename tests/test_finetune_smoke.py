"""The fine-tuning pipeline (examples/finetune.py) end to end on a tiny random GGUF model."""
import json
import math

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from test_llama_gguf import write_tiny_gguf

from examples import finetune
from examples.gguf_loader import load_llama
from examples.methods import BLOCK_LINEARS, base_weight_bytes, prepare
from examples.task import make_splits
from examples.training import TrainConfig, train
from lora import LoRALinear
from quant import LinearNF4


def small_cfg(tmp_path, tiny_gguf, **kw):
    base = dict(steps=3, batch_size=2, n_train=8, n_eval=3, eval_batch=2, threads=1, show=2,
                out=str(tmp_path / "run"), gguf=str(tiny_gguf))
    return finetune.FinetuneConfig(**{**base, **kw})


def test_qlora_run_saves_reloads_and_scores_the_same(tmp_path, tiny_gguf):
    res = finetune.run(small_cfg(tmp_path, tiny_gguf))
    assert len(res["losses"]) == 3 and all(math.isfinite(x) for x in res["losses"])
    assert res["acc_reloaded"] == res["acc"] and res["same_predictions_reloaded"] == 3
    assert res["content_reloaded"] == res["content"] and 0 <= res["content_before"] <= 1
    assert 0 < res["trainable_params"] < res["all_params"]
    assert res["base_stored_bytes"] < res["base_bf16_bytes"] / 3.5  # 4.127 bits vs 16 (QLoRA sec. 3)
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(BLOCK_LINEARS) and config["r"] == 16
    from safetensors.torch import load_file
    keys = load_file(adapter / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert res["saved_bytes"] >= (adapter / "adapter_model.safetensors").stat().st_size
    assert len(res["examples"]) == 2


def test_prepare_qlora_swaps_every_block_linear(tiny_gguf):
    model, _ = load_llama(tiny_gguf)
    bf16, stored = base_weight_bytes(model)
    assert stored == 2 * bf16  # fp32 weights
    model, info = prepare(model, "qlora", r=4, alpha=8)
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
            assert isinstance(module, LoRALinear) and isinstance(module.base_layer, LinearNF4)
    assert type(model.lm_head) is torch.nn.Linear  # the tied output head stays as it is
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert info["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_training_lowers_the_loss(tiny_gguf):
    torch.manual_seed(0)
    model, tok = load_llama(tiny_gguf)
    model, _ = prepare(model, "lora", r=8, alpha=16)
    examples = make_splits(4, 0, seed=0)[0]
    result = train(model, tok, examples, TrainConfig(steps=12, batch_size=4, lr=1e-2, warmup=1))
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses


def test_cli_errors_are_clear(tmp_path, tiny_gguf, capsys):
    with pytest.raises(SystemExit):
        finetune.main(["--method", "dora"])
    assert "unknown method 'dora'" in capsys.readouterr().err
    assert finetune.main(["--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path)]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    other = tmp_path / "gpt2.gguf"
    write_tiny_gguf(other, arch="gpt2")
    assert finetune.main(["--gguf", str(other), "--out", str(tmp_path)]) == 2
    assert "unsupported GGUF architecture 'gpt2'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method"):
        prepare(torch.nn.Linear(2, 2), "bitfit")


def test_compare_table_chart_and_rows(tmp_path, capsys):
    from examples.compare import bar_chart, print_comparison, worker_command
    from examples.report import rows_of

    def fake(method, acc, trainable, saved, rss, sps, stored):
        return {"method": method, "acc": acc, "acc_before": 0.0, "trainable_params": trainable,
                "all_params": 1000, "trainable_pct": trainable / 10, "saved_bytes": saved,
                "peak_rss_bytes": rss, "seconds_per_step": sps, "base_bf16_bytes": 200,
                "base_stored_bytes": stored, "eval_seconds": 1.0, "total_seconds": 5.0, "steps": 3}

    results = [fake("zero-shot", 0.0, 0, 0, 100, None, 400), fake("full", 0.9, 1000, 4000, 300, 2.0, 400),
               fake("lora", 0.95, 10, 40, 200, 1.0, 400), fake("qlora", 0.94, 10, 40, 150, 1.5, 52)]
    print_comparison(results)
    out = capsys.readouterr().out
    assert "QLoRA / LoRA: block weights 0.130x, peak RSS 0.75x, time per step 1.50x" in out
    assert "LoRA / full fine-tuning: trainable parameters 0.0100x" in out
    assert bar_chart(results, tmp_path / "c.png").stat().st_size > 1000
    rows = rows_of(results[3], benchmark="finetune_compare")
    assert {r["metric"] for r in rows} >= {"accuracy", "peak_rss_bytes", "saved_bytes", "trainable_params"}
    cfg = finetune.FinetuneConfig(out=str(tmp_path), steps=7, task="route")
    cmd = worker_command(cfg, "lora", tmp_path / "lora.json")
    assert cmd[cmd.index("--steps") + 1] == "7" and "--no-reload" in cmd and "--lr" not in cmd
    assert cmd[cmd.index("--task") + 1] == "route"
    assert "--steps" not in worker_command(finetune.FinetuneConfig(out=str(tmp_path)), "lora", tmp_path / "x")
    plain = worker_command(finetune.FinetuneConfig(out=str(tmp_path)), "lora", tmp_path / "x")
    assert "--grad-checkpointing" not in plain and "--data" not in plain
    cfg = finetune.FinetuneConfig(out=str(tmp_path), grad_checkpointing=True, data="my.jsonl", eval_fraction=0.3)
    cmd = worker_command(cfg, "qlora", tmp_path / "q.json")  # every method of a comparison alike
    assert "--grad-checkpointing" in cmd and cmd[cmd.index("--data") + 1] == "my.jsonl"
    assert cmd[cmd.index("--eval-fraction") + 1] == "0.3"


def test_quantizing_while_loading_equals_quantizing_after(tiny_gguf):
    from examples.methods import load_model, quantize_blocks

    direct, _ = load_model("qlora", tiny_gguf)
    after, _ = load_llama(tiny_gguf)
    quantize_blocks(after, torch.float32)
    sd_direct, sd_after = direct.state_dict(), after.state_dict()
    assert sd_direct.keys() == sd_after.keys()
    assert any(k.endswith("weight_packed") for k in sd_direct)
    for k in sd_direct:
        assert torch.equal(sd_direct[k], sd_after[k]), k
    idx = torch.tensor([[5, 9, 2, 6, 5, 3]])
    torch.testing.assert_close(direct(idx), after(idx), atol=0, rtol=0)


def test_route_task_run_and_its_default_steps(tmp_path, tiny_gguf):
    res = finetune.run(small_cfg(tmp_path, tiny_gguf, task="route", method="lora", steps=None,
                                 reload=False, n_train=4))
    assert res["task_name"] == "message routing" and res["steps"] == finetune.TASKS["route"].steps
    assert res["content"] is not None and '"team"' in res["examples"][0]["expected"]
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        finetune.run(small_cfg(tmp_path, tiny_gguf, task="sort"))


def test_bottleneck_adapter_run(tmp_path, tiny_gguf):
    res = finetune.run(small_cfg(tmp_path, tiny_gguf, method="adapter", steps=2, reload=False))
    assert len(res["losses"]) == 2 and res["saved_bytes"] > 0
    assert 0 < res["trainable_params"] < res["all_params"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()


def test_prompt_tuning_method_trains_only_the_soft_prompt_and_generates_with_it(tiny_gguf):
    torch.manual_seed(0)
    model, tok = load_llama(tiny_gguf)
    init = tok.encode("name age city")
    wrapped, info = prepare(model, "prompt", prompt_init=init)
    p = wrapped.prompt.num_virtual_tokens
    assert info["trainable_params"] == p * model.config.dim
    # With the soft prompt equal to the embeddings of some tokens, generating behind it is
    # generating from those tokens written in front of every prompt.
    prefix = (init * p)[:p]
    prompts = [tok.encode("Ann is 30.")[:4], tok.encode("Bob, 41, Rome")[:6]]
    got = wrapped.generate(prompts, max_new_tokens=5)
    want = model.generate([prefix + q for q in prompts], max_new_tokens=5)
    assert got == want
    examples = make_splits(4, 0, seed=0)[0]
    before = wrapped.prompt.prompt_embeddings.detach().clone()
    frozen = model.model.embed_tokens.weight.detach().clone()
    result = train(wrapped, tok, examples, TrainConfig(steps=6, batch_size=4, lr=3e-2, warmup=1))
    assert result.losses[-1] < result.losses[0]
    assert not torch.equal(wrapped.prompt.prompt_embeddings, before)
    assert torch.equal(model.model.embed_tokens.weight, frozen)


@pytest.mark.parametrize("argv, out", [
    ([], "runs/finetune"),  # make demo's folder
    (["--method", "lora"], "runs/finetune"),
    (["--task", "route"], "runs/route"),
    (["--data", "my.jsonl"], "runs/own_data"),
    (["--compare"], "runs/compare"),
    (["--task", "route", "--out", "elsewhere"], "elsewhere"),
])
def test_each_kind_of_run_has_its_own_default_folder(argv, out):
    """Training on another task or on your own file must not overwrite the demo's adapter."""
    cfg, _ = finetune.parse_args(argv)
    assert cfg.out == out
