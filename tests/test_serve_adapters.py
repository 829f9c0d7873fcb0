"""examples/serve.py with trained adapters on a tiny random GGUF model: each adapter answers its
own task's held-out prompts in one mixed batch, and adapters that need another base than the
shared NF4 one are refused before the model loads."""
import json
import shutil

import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from examples import finetune, serve  # noqa: E402


def _train(tmp_path, tiny_gguf, name, **kw):
    cfg = finetune.FinetuneConfig(steps=1, batch_size=2, n_train=4, n_eval=2, eval_batch=2, threads=1, show=0,
                                  r=4, alpha=8, out=str(tmp_path / name), gguf=str(tiny_gguf), reload=False, **kw)
    finetune.run(cfg)
    return tmp_path / name / "adapter"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_gguf):
    tmp = tmp_path_factory.mktemp("serve")
    return {"extract": _train(tmp, tiny_gguf, "extract"),
            "route": _train(tmp, tiny_gguf, "route", task="route"),
            "pissa": _train(tmp, tiny_gguf, "pissa", init="pissa"),
            "tmp": tmp}


def test_each_adapter_gets_its_task_prompts_in_one_batch(trained, tiny_gguf, capsys):
    rc = serve.main(["--model", str(tiny_gguf), "--adapter", f"ex={trained['extract']}",
                     "--adapter", f"ro={trained['route']}", "--per-adapter", "2", "--max-new-tokens", "3",
                     "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    _, held_out = finetune.TASKS["route"].make_splits(400, 100, 0)
    assert f"[      ro] {held_out[0].source!r} ->" in out  # route's own held-out messages
    assert out.count("[      ex]") == 2 and out.count("[      ro]") == 2 and out.count("[__base__]") == 1
    assert "ex: " in out and "ro: " in out and " exact" in out  # scored against the tasks' answers
    assert "identical answers 5/5" in out  # the mixed batch equals adapter by adapter


def test_adapters_the_shared_base_cannot_serve_are_refused_before_loading(trained, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the adapters were checked")

    monkeypatch.setattr(serve, "load_model", never)
    nf3 = trained["tmp"] / "nf3"
    shutil.copytree(trained["extract"], nf3)
    info = json.loads((nf3 / "loralab_prompt.json").read_text())
    (nf3 / "loralab_prompt.json").write_text(json.dumps({**info, "bits": 3}))
    cases = [([f"a={nf3}"], "trained on an NF3 base"),
             ([f"a={trained['pissa']}"], "init='pissa' rewrote the base"),
             ([f"a={trained['extract']}", f"a={trained['route']}"], "names must be distinct"),
             ([f"a={trained['tmp'] / 'missing'}"], "folder not found"),
             ([f"__base__={trained['extract']}"], "'__base__' is reserved"),
             ([f"../x={trained['extract']}"], "one safe folder name")]
    for specs, message in cases:
        argv = [x for spec in specs for x in ("--adapter", spec)]
        assert serve.main(argv) == 2
        assert message in capsys.readouterr().err
