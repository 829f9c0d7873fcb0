"""One 4-bit base, many adapters, one batch: each prompt names its adapter (LoRA sec. 4.2).

    python examples/serve.py                          # 4 random adapters, 2 prompts each + the base
    python examples/serve.py --adapter extract=runs/finetune/adapter --adapter route=runs/route/adapter
    python examples/serve.py --quick                  # 2 adapters, 6 new tokens
    python examples/serve.py --bench --threads 1      # tokens/s with 1, 4, 16 adapters in the batch (best of 2)
    python examples/serve.py --plot-only              # redraw serve.png from serve.csv

SmolLM2-135M-Instruct is loaded once with its block linears in NF4 (QLoRA sec. 3). The
adapters are LoRA folders (`--adapter NAME=DIR`, e.g. written by `finetune.py`) or random
ones (B drawn small, so each one visibly changes the answers; for timing). An adapter that
`finetune.py` trained on a built-in task gets that task's held-out examples as its prompts
(scored by exact match); the others get general questions in the chat template. Adapters
that need another base than the shared NF4 one are refused before anything loads: one
trained on an NF3/NF2 base, or one whose init (LoftQ, PiSSA, OLoRA) rewrote its base. The batch is
answered twice: as one mixed batch (`lora.use_adapters`: every row its own adapter, the
base matmuls once for all rows) and adapter by adapter (one batch per adapter, the way a
server without mixed batches works); the answers and tokens/s of both are printed.
`--bench` writes benchmarks/results/serve.csv and serve.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from examples.chat_format import chat_format  # noqa: E402
from examples.llama import left_pad  # noqa: E402
from examples.methods import load_model, lora_config  # noqa: E402
from lora import apply_lora, disable_adapters, load_adapter, set_adapter, use_adapters  # noqa: E402
from lora.inject import lora_layers  # noqa: E402
from lora.mixed_batch import BASE  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 3?",
             "Say hello in Spanish.", "Which planet is closest to the sun?", "What do bees make?"]


def generate_rows(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None) -> list[list[int]]:
    """Greedy continuation with no prompt prefix shared between rows (`Llama.generate`'s
    `share_prefix=False`): in a mixed batch each row's prefix goes through its own adapter,
    and the adapter-by-adapter baseline runs the same way, so the two compare like with like."""
    return model.generate(prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, share_prefix=False)


def add_random_adapters(model, names: list[str], r: int = 16, std: float = 0.02) -> None:
    """LoRA adapters with B ~ N(0, std) (A kaiming, as fresh), one seed per adapter."""
    for i, name in enumerate(names):
        apply_lora(model, lora_config(r, 2 * r, 0.0), adapter_name=name)
        g = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                B = layer.lora_B[name].weight
                B.copy_(torch.randn(B.shape, generator=g) * std)
    model.eval()


def mixed(model, prompts, names, max_new, eos):
    with use_adapters(model, names):
        return generate_rows(model, prompts, max_new, eos)


def one_by_one(model, prompts, names, max_new, eos):
    """One batch per adapter (and one for the base rows), answers put back in row order."""
    out: list = [None] * len(prompts)
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        if name == BASE:
            with disable_adapters(model):
                answers = generate_rows(model, [prompts[i] for i in rows], max_new, eos)
        else:
            set_adapter(model, name)
            answers = generate_rows(model, [prompts[i] for i in rows], max_new, eos)
        for i, a in zip(rows, answers, strict=True):
            out[i] = a
    return out


def timed(fn, *args) -> tuple[list, float]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0


@dataclass(frozen=True)
class Row:
    """One prompt of the batch: its adapter, the text shown, its token ids, and the expected
    answer (None when there is none to score)."""

    adapter: str
    text: str
    ids: list[int]
    expected: str | None = None


def question_rows(tok, adapters: list[str], per_adapter: int, base_row: bool = True) -> list[Row]:
    """`per_adapter` general questions (chat template) for each adapter, then (`base_row`) one
    for the base."""
    fmt, _ = chat_format(tok)
    names = [a for a in adapters for _ in range(per_adapter)] + ([BASE] if base_row else [])
    texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(len(names))]
    return [Row(n, t, tok.encode(fmt.render([("user", t)]))) for n, t in zip(names, texts, strict=True)]


def task_rows(tok, adapter: str, task: str, per_adapter: int) -> list[Row]:
    """The first `per_adapter` held-out examples of a built-in task (`finetune.py`'s default
    split), in that task's prompt, with their answers."""
    from examples.finetune import TASKS, FinetuneConfig
    from examples.task import CHATML, prompt

    split = FinetuneConfig()
    _, held_out = TASKS[task].make_splits(split.n_train, split.n_eval, split.seed)
    return [Row(adapter, ex.source or ex.turns[-1][1], tok.encode(prompt(ex, (), CHATML)), ex.answer)
            for ex in held_out[:per_adapter]]


def check_trained(folders: list[tuple[str, Path]]) -> dict[str, str | None]:
    """name -> the built-in task each adapter folder was trained on (None: own data or unknown).
    ValueError, before anything loads, for a folder this server's shared NF4 base cannot serve."""
    from examples.answer import read_prompt_file
    from examples.finetune import TASKS
    from examples.methods import lora_config_of
    from lora.config import check_adapter_name, rewrites_base

    if len({name for name, _ in folders}) != len(folders):
        raise ValueError(f"--adapter names must be distinct, got {[name for name, _ in folders]}")
    tasks = {}
    for name, folder in folders:
        check_adapter_name(name, f"--adapter {name!r}: NAME")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--adapter {name}: folder not found: {folder}")
        method, task, bits = read_prompt_file(folder, TASKS)
        config = lora_config_of(folder, f"--adapter {name} takes LoRA adapters only")
        if rewrites_base(config.init):
            raise ValueError(f"--adapter {name}: init={config.init!r} rewrote the base it was trained on, so it "
                             "cannot share the NF4 base with other adapters; answer with it alone "
                             "(finetune.py --generate --adapter)")
        if method == "qlora" and bits != 4:
            raise ValueError(f"--adapter {name}: trained on an NF{bits} base (loralab_prompt.json); this "
                             "server's shared base is NF4")
        tasks[name] = task
    return tasks


def serve(model, tok, rows: list[Row], max_new: int, repeat: int = 1) -> dict:
    """Answer `rows` both ways (one mixed batch; adapter by adapter); print and return figures.
    With `repeat` > 1 the two ways alternate and the fastest run of each counts (shared CPU)."""
    names, prompts = [r.adapter for r in rows], [r.ids for r in rows]
    adapters = [n for n in dict.fromkeys(names) if n != BASE]
    t_mixed = t_each = float("inf")
    for _ in range(repeat):
        a, t = timed(mixed, model, prompts, names, max_new, tok.eos_id)
        t_mixed = min(t_mixed, t)
        b, t = timed(one_by_one, model, prompts, names, max_new, tok.eos_id)
        t_each = min(t_each, t)
    tokens = sum(len(x) for x in a)
    right = {}
    for row, ans, ans2 in zip(rows, a, b, strict=True):
        text = tok.decode(ans).strip()
        same = "" if ans == ans2 else "   (adapter by adapter: " + repr(tok.decode(ans2).strip()) + ")"
        mark = ""
        if row.expected is not None:
            ok = text == row.expected.strip()
            right.setdefault(row.adapter, []).append(ok)
            mark = "  [right]" if ok else f"  [expected {row.expected!r}]"
        print(f"[{row.adapter:>8s}] {row.text!r} -> {text!r}{mark}{same}")
    for name, oks in right.items():
        print(f"{name}: {sum(oks)}/{len(oks)} exact")
    agree = sum(x == y for x, y in zip(a, b, strict=True))
    print(f"{len(rows)} prompts over {len(adapters)} adapters + base: mixed batch {tokens / t_mixed:.1f} tokens/s, "
          f"adapter by adapter {sum(len(x) for x in b) / t_each:.1f} tokens/s "
          f"({t_each / t_mixed:.2f}x); identical answers {agree}/{len(rows)}")
    return {"adapters": len(adapters), "rows": len(rows), "mixed_tok_s": tokens / t_mixed,
            "each_tok_s": sum(len(x) for x in b) / t_each, "agree": agree,
            "exact": {k: sum(v) / len(v) for k, v in right.items()}}


def bench(model, tok, counts, rows: int, max_new: int, out: Path) -> None:
    """tokens/s of a `rows`-prompt batch spread over n adapters: mixed vs adapter by adapter."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import make_row, write_rows

    results = []
    generate_rows(model, [tok.encode("Hello")] * 2, 2, None)  # warm-up (first-call costs off the clock)
    for n in counts:
        names = [f"task{i}" for i in range(n)]
        per = max(1, rows // n)
        r = serve(model, tok, question_rows(tok, names, per), max_new, repeat=2)
        shape = f"smollm2-135m-nf4,rows={r['rows']},new_tokens<={max_new},adapters={n}"
        results += [make_row("serve", "loralab_mixed", shape, "tokens_per_s", r["mixed_tok_s"], "tok/s"),
                    make_row("serve", "adapter_by_adapter", shape, "tokens_per_s", r["each_tok_s"], "tok/s"),
                    make_row("serve", "loralab_mixed", shape, "speedup_vs_adapter_by_adapter",
                             r["mixed_tok_s"] / r["each_tok_s"], "x")]
    try:
        results += bench_peft(counts, rows, max_new)
    except ImportError as err:  # peft / transformers not installed
        print(f"transformers + PEFT skipped: {err}")
    write_rows(out / "serve.csv", results)
    plot(results, out)


LABELS = {"loralab_mixed": "loralab mixed batch (NF4)", "adapter_by_adapter": "adapter by adapter (NF4)",
          "loralab_mixed_dense": "loralab mixed batch (fp32)",
          "peft_mixed_dense": "transformers + PEFT mixed batch (fp32)"}


def plot(results: list[dict], out: Path) -> None:
    """serve.png from the rows of serve.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for provider, label in LABELS.items():
        pts = [(int(x["shape"].split("adapters=")[1]), float(x["value"])) for x in results
               if x["provider"] == provider and x["metric"] == "tokens_per_s"]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--" if "dense" in provider else "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters in the batch")
    ax.set_ylabel("generated tokens / s (CPU)")
    rows = results[0]["shape"].split("rows=")[1].split(",")[0] if results else "?"
    ax.set_title(f"SmolLM2-135M, one batch of {rows} prompts (one on the base)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out / "serve.tmp.png"
    fig.savefig(tmp, dpi=110)
    tmp.replace(out / "serve.png")
    print(out / "serve.csv", out / "serve.png")


def to_peft(model, adapters: list[str]):
    """transformers' LlamaForCausalLM with PEFT holding the same weights and adapters as our
    dense `model` (Q/K rows and the B rows of q_proj/k_proj reordered to HF's RoPE layout)."""
    import warnings

    import peft
    import transformers

    from examples.hf_loader import interleaved_to_half_split

    c = model.config
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, rope_theta=c.rope_base,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings))
    heads = {"q_proj": c.n_heads, "k_proj": c.n_kv_heads}

    def hf_rows(path: str, w: torch.Tensor) -> torch.Tensor:
        leaf = path.rsplit(".", 2)[-2] if path.endswith(".weight") else path.rsplit(".", 1)[-1]
        return interleaved_to_half_split(w, heads[leaf]) if leaf in heads else w

    with torch.no_grad():
        state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        hf.load_state_dict({k: hf_rows(k, v) for k, v in state.items()}, strict=False)
        hf.tie_weights()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = dict(r=16, lora_alpha=32, target_modules=[p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)],
                       init_lora_weights=False)
            pm = peft.get_peft_model(hf, peft.LoraConfig(**cfg), adapter_name=adapters[0])
            for name in adapters[1:]:
                pm.add_adapter(name, peft.LoraConfig(**cfg))
        for path, layer in lora_layers(model):
            target = pm.base_model.model.get_submodule(path)
            for name in adapters:
                target.lora_A[name].weight.copy_(layer.lora_A[name].weight)
                target.lora_B[name].weight.copy_(hf_rows(path, layer.lora_B[name].weight))
                target.scaling[name] = layer.scaling[name]
    return pm.eval()


@torch.no_grad()
def peft_generate(pm, prompts: list[list[int]], names: list[str], max_new: int, eos: int | None) -> list[list[int]]:
    """PEFT's mixed batch through transformers' generate (greedy), cut at each row's eos."""
    idx, valid = left_pad(prompts, "cpu")
    out = pm.generate(input_ids=idx, attention_mask=valid.long(), adapter_names=names, max_new_tokens=max_new,
                      do_sample=False, pad_token_id=0 if eos is None else eos)[:, idx.shape[1]:]
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def bench_peft(counts, rows: int, max_new: int) -> list[dict]:
    """Dense (fp32) SmolLM2: our mixed batch vs transformers + PEFT's mixed batch, same weights."""
    from benchmarks.common import make_row

    model, tok = load_model("lora", None)
    model.eval()
    add_random_adapters(model, [f"task{i}" for i in range(max(counts))])
    pm = to_peft(model, [f"task{i}" for i in range(max(counts))])
    fmt, _ = chat_format(tok)
    generate_rows(model, [tok.encode("Hello")] * 2, 2, None)  # warm-up, both stacks
    peft_generate(pm, [tok.encode("Hello")] * 2, [BASE, BASE], 2, None)
    out = []
    for n in counts:
        names = [f"task{i}" for i in range(n) for _ in range(max(1, rows // n))] + [BASE]
        prompts = [tok.encode(fmt.render([("user", QUESTIONS[i % len(QUESTIONS)])])) for i in range(len(names))]
        best = {"loralab_mixed_dense": float("inf"), "peft_mixed_dense": float("inf")}
        for _ in range(2):
            a, t = timed(mixed, model, prompts, names, max_new, tok.eos_id)
            best["loralab_mixed_dense"] = min(best["loralab_mixed_dense"], t)
            b, t = timed(peft_generate, pm, prompts, names, max_new, tok.eos_id)
            best["peft_mixed_dense"] = min(best["peft_mixed_dense"], t)
        agree = sum(x == y for x, y in zip(a, b, strict=True))
        tokens = {"loralab_mixed_dense": sum(map(len, a)), "peft_mixed_dense": sum(map(len, b))}
        shape = f"smollm2-135m-fp32,rows={len(names)},new_tokens<={max_new},adapters={n}"
        for k, t in best.items():
            out.append(make_row("serve", k, shape, "tokens_per_s", tokens[k] / t, "tok/s"))
        out.append(make_row("serve", "loralab_mixed_dense", shape, "speedup_vs_peft_mixed_dense",
                            (tokens["loralab_mixed_dense"] / best["loralab_mixed_dense"])
                            / (tokens["peft_mixed_dense"] / best["peft_mixed_dense"]), "x"))
        print(f"dense fp32, {n} adapters: loralab {tokens['loralab_mixed_dense'] / best['loralab_mixed_dense']:.1f} "
              f"tokens/s, transformers+PEFT {tokens['peft_mixed_dense'] / best['peft_mixed_dense']:.1f} tokens/s; "
              f"identical answers {agree}/{len(names)}")
    return out


def parse_adapter(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"--adapter must be NAME=DIR, got {spec!r}")
    return name, Path(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", type=parse_adapter, action="append", default=[],
                   help="NAME=DIR of a saved LoRA adapter (repeatable); default: random adapters")
    p.add_argument("--random", type=int, default=4, help="number of random adapters (without --adapter)")
    p.add_argument("--per-adapter", type=int, default=2, help="prompts per adapter")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default 16 (40 with --adapter: a task's JSON answer)")
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 random adapters, 6 new tokens")
    p.add_argument("--bench", action="store_true", help="tokens/s with 1, 4, 16 adapters (16 prompts)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--plot-only", action="store_true", help="redraw serve.png from serve.csv")
    a = p.parse_args(argv)
    if a.plot_only:
        from benchmarks.common import read_rows

        plot(read_rows(a.out / "serve.csv"), a.out)
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.quick:
        a.random, a.max_new_tokens, a.per_adapter = 2, 6, 1
    if a.max_new_tokens is None:
        a.max_new_tokens = 40 if a.adapter else 16
    if a.max_new_tokens < 1 or a.per_adapter < 1:
        p.error("--max-new-tokens and --per-adapter must be >= 1")
    if a.bench and a.adapter:
        p.error("--bench times random adapters; it does not take --adapter")
    try:
        tasks = check_trained(a.adapter)  # before the model loads
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model, tok = load_model("qlora", a.model)  # NF4 block linears, float32 compute
    model.eval()
    if a.bench:
        counts = [1, 2] if a.quick else [1, 4, 16]
        add_random_adapters(model, [f"task{i}" for i in range(max(counts))])
        bench(model, tok, counts, 4 if a.quick else 16, a.max_new_tokens, a.out)
        return 0
    if a.adapter:
        rows = []
        for name, folder in a.adapter:
            load_adapter(model, folder, adapter_name=name)
            rows += (task_rows(tok, name, tasks[name], a.per_adapter) if tasks[name] is not None
                     else question_rows(tok, [name], a.per_adapter, base_row=False))
        rows += question_rows(tok, [], 0)  # one base row
    else:
        names = [f"task{i}" for i in range(a.random)]
        add_random_adapters(model, names)
        rows = question_rows(tok, names, a.per_adapter)
    serve(model, tok, rows, a.max_new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
