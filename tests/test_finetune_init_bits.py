"""examples/finetune.py --init / --bits: how QLoRA's adapter starts and how many bits its base
keeps (docs/06-starting-points.md), on a tiny random GGUF model."""
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from examples import finetune
from examples.methods import BLOCK_LINEARS, block_linears, load_model, prepare
from lora import LoRALinear
from lora.model_state import lora_configs
from quant import LinearNF4


@pytest.mark.parametrize("argv, message", [
    (["--method", "lora", "--bits", "3"], "bits=3 sets the quantized base of method 'qlora'"),
    (["--method", "lora", "--init", "loftq"], "init='loftq' quantizes the base"),
    (["--method", "adapter", "--init", "pissa"], "init='pissa' starts a LoRA adapter; method 'adapter' has none"),
    (["--init", "loftq", "--compute-dtype", "bfloat16"], "computes in float32 here"),
    (["--compare", "--bits", "2"], "--init and --bits apply to one --method"),
    (["--init", "eva"], "invalid choice: 'eva'"),
    (["--bits", "8"], "invalid choice: 8"),
])
def test_nonsense_combinations_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(argv)
    assert message in capsys.readouterr().err


def test_flags_reach_the_config():
    cfg, _ = finetune.parse_args(["--bits", "2", "--init", "pissa"])
    assert (cfg.method, cfg.bits, cfg.init) == ("qlora", 2, "pissa")
    cfg, _ = finetune.parse_args([])
    assert (cfg.bits, cfg.init) == (4, "kaiming")


@torch.no_grad()
def relative_error(model, originals) -> float:
    """sqrt(sum ||W - (base + s B A)||^2 / sum ||W||^2) over the block linears, float64."""
    num = den = 0.0
    for name, layer in block_linears(model):
        base = layer.base_layer
        W0 = base.dequantize(torch.float32) if isinstance(base, LinearNF4) else base.weight
        BA = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        W = originals[name].double()
        num += float((W - W0.double() - layer.scaling["default"] * BA).pow(2).sum())
        den += float(W.pow(2).sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("init, bits", [("kaiming", 3), ("loftq", 2), ("pissa", 4), ("olora", 3)])
def test_prepare_builds_the_base_and_the_start(tiny_gguf, init, bits):
    torch.manual_seed(0)
    model, _ = load_model("qlora", tiny_gguf, bits=bits, init=init)
    originals = {n: m.weight.detach().clone() for n, m in block_linears(model)} if init != "kaiming" else None
    model, info = prepare(model, "qlora", r=4, alpha=8, init=init, bits=bits)
    layers = block_linears(model)
    assert len(layers) == 2 * len(BLOCK_LINEARS)
    for _, layer in layers:
        assert isinstance(layer, LoRALinear) and layer.base_layer.quant_type == f"nf{bits}"
    assert lora_configs(model)["default"].init == init  # a saved file says which init rewrote the base
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}
    if init == "kaiming":
        assert all(not layer.lora_B["default"].weight.detach().any() for _, layer in layers)
        return
    start = relative_error(model, originals)
    plain = model_with_b_zero(tiny_gguf, bits)
    # LoftQ T=1 keeps Q = quant(W) and adds the best rank-r fit of W - Q: never worse than B = 0.
    # QPiSSA / OLoRA quantize a residual; on this random model they too start closer to W.
    assert start < plain, (start, plain)


def model_with_b_zero(tiny_gguf, bits) -> float:
    model, _ = load_model("qlora", tiny_gguf, bits=4, init="pissa")  # dense (init pissa loads unquantized)
    originals = {n: m.weight.detach().clone() for n, m in block_linears(model)}
    model, _ = prepare(model, "qlora", r=4, alpha=8, bits=bits)
    return relative_error(model, originals)


def test_prepared_base_of_another_width_is_refused(tiny_gguf):
    model, _ = load_model("qlora", tiny_gguf)  # NF4 while loading
    with pytest.raises(ValueError, match="already a nf4 layer; bits=3"):
        prepare(model, "qlora", r=4, alpha=8, bits=3)
    with pytest.raises(ValueError, match="needs its full-precision weight"):
        prepare(model, "qlora", r=4, alpha=8, init="pissa")


def test_loftq_nf3_run_saves_and_reloads_onto_the_rewritten_base(tmp_path, tiny_gguf):
    cfg = finetune.FinetuneConfig(steps=1, batch_size=2, n_train=4, n_eval=2, eval_batch=2, threads=1, show=0, r=4,
                                  alpha=8, out=str(tmp_path / "run"), gguf=str(tiny_gguf), init="loftq", bits=3)
    res = finetune.run(cfg)
    assert (res["init"], res["bits"]) == ("loftq", 3)
    assert res["same_predictions_reloaded"] == 2 and res["acc_reloaded"] == res["acc"]


def test_generate_rebuilds_the_base_the_adapter_was_trained_on(tmp_path, tiny_gguf, monkeypatch):
    """`--generate --adapter` reads the base's bits (loralab_prompt.json) and the init (the
    adapter's config): an NF3 + LoftQ adapter gets the NF3 base LoftQ rewrote, the exact tensors
    of the training run's own reload, not an NF4 base."""
    import json

    from examples import answer as answer_mod
    from examples.methods import reload_adapter

    cfg = finetune.FinetuneConfig(steps=1, batch_size=2, n_train=4, n_eval=2, eval_batch=2, threads=1, show=0, r=4,
                                  alpha=8, out=str(tmp_path / "run"), gguf=str(tiny_gguf), init="loftq", bits=3,
                                  reload=False)
    finetune.run(cfg)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "loralab_prompt.json").read_text()) == {"method": "qlora", "task": cfg.task,
                                                                         "bits": 3}
    seen = {}

    def spy(model, method, directory, compute_dtype, bits):
        reload_adapter(model, method, directory, compute_dtype, bits=bits)
        seen["state"] = model.state_dict()

    monkeypatch.setattr(answer_mod, "reload_adapter", spy)
    tasks = {name: spec.wrap for name, spec in finetune.TASKS.items()}
    assert isinstance(answer_mod.answer("hello", adapter, str(tiny_gguf), tasks=tasks, max_new_tokens=2), str)

    def built(bits):
        model, _ = load_model("qlora", tiny_gguf, bits=bits, init="loftq")
        reload_adapter(model, "qlora", adapter, bits=bits)
        return model.state_dict()

    same = built(3)
    assert seen["state"].keys() == same.keys()
    assert all(torch.equal(seen["state"][k], same[k]) for k in same)
    # the bits matter: the file records its NF3 base, and an NF4 LoftQ base is refused
    with pytest.raises(ValueError, match="nf3:64:1:2 in the file, nf4:64:1 here"):
        built(4)


def test_prompt_file_bits(tmp_path):
    import json

    from examples.answer import read_prompt_file, write_prompt_file

    tasks = {"t": None}
    assert read_prompt_file(tmp_path, tasks) == ("qlora", None, 4)  # no file: PEFT's QLoRA on NF4
    write_prompt_file(tmp_path, "qlora", "t", 2)
    assert read_prompt_file(tmp_path, tasks) == ("qlora", "t", 2)
    write_prompt_file(tmp_path, "lora", None, 4)  # bits are QLoRA's only
    assert read_prompt_file(tmp_path, tasks) == ("lora", None, None)
    path = tmp_path / "loralab_prompt.json"
    path.write_text(json.dumps({"method": "qlora", "task": None}))  # written before "bits" existed
    assert read_prompt_file(tmp_path, tasks) == ("qlora", None, 4)
    for info, message in (({"bits": 5}, "bits must be one of"), ({"bits": "3"}, "bits must be one of"),
                          ({"bits": True}, "bits must be one of"), ({"bits": None}, "bits must be one of"),
                          ({"method": "lora", "bits": 4}, "bits must be null for method 'lora'"),
                          ({"extra": 1}, "keys 'method', 'task' and 'bits'")):
        path.write_text(json.dumps({"method": "qlora", "task": None, **info}))
        with pytest.raises(ValueError, match=message):
            read_prompt_file(tmp_path, tasks)
    with pytest.raises(ValueError, match="bits must be one of"):
        write_prompt_file(tmp_path, "qlora", None, 8)


def test_generate_flags():
    cfg, args = finetune.parse_args(["--generate", "hi", "--init", "loftq", "--bits", "3"])  # after training
    assert (cfg.init, cfg.bits, args.generate) == ("loftq", 3, "hi")
    with pytest.raises(SystemExit):
        finetune.parse_args(["--generate", "hi", "--adapter", "x", "--bits", "3"])


def test_generate_refuses_a_non_lora_adapter_before_loading_the_model(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from examples import answer as answer_mod
    from lora import add_prompt_tuning, save_adapter

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    save_adapter(add_prompt_tuning(transformers.LlamaForCausalLM(cfg), 3), tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapter was checked")

    monkeypatch.setattr(answer_mod, "load_model", never)
    with pytest.raises(ValueError, match="holds a PROMPT_TUNING adapter; --generate answers with LoRA adapters only"):
        answer_mod.answer("hello", tmp_path)
