import csv
import json

import pytest
import torch

from transformer2.adapters import LoRAAdapter
from transformer2.lora import attach_lora, count_lora_parameters, lora_config, train_lora
from transformer2.models import build_tiny_random
from transformer2.rl import RLObjectiveConfig
from transformer2.sft import NextTokenConfig
from transformer2.svf import count_svf_parameters
from transformer2.training import LoopConfig

from .test_rl import DOCS



def llama3_8b_on_meta():
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256))


def test_paper_parameter_counts_on_llama3_8b_without_weights():
    model = llama3_8b_on_meta()
    assert count_lora_parameters(model, lora_config(rank=16, target_modules=["q_proj", "v_proj"])) == 6_815_744
    assert count_svf_parameters(model, "mlp") == 393_216
    assert count_lora_parameters(model.config) == 6_815_744  # from the config alone; default = paper's LoRA
    assert not any("lora" in n for n, _ in model.named_modules())  # the model itself is never modified


def test_lora_config_defaults_are_the_papers_and_count_matches_peft():
    cfg = lora_config()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, sorted(cfg.target_modules)) == (16, 32, 0.05, ["q_proj", "v_proj"])
    model, _ = build_tiny_random("llama")
    expected = count_lora_parameters(model)
    adapter = LoRAAdapter(attach_lora(model, cfg))
    assert adapter.num_parameters == expected == 2 * 16 * ((64 + 64) + (64 + 32))  # 2 layers, q 64→64, v 64→32
    assert all("lora_" in n for n in adapter.params)


def frozen_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def test_lora_with_the_rl_objective_runs_through_fit(tmp_path, monkeypatch):
    monkeypatch.setattr("transformer2.tasks.score_batch",
                        lambda task, docs, texts, **k: [i % 2 == 0 for i in range(len(texts))])
    model, tokenizer = build_tiny_random("llama")
    model.eval()
    result, adapter = train_lora(model, tokenizer, "gsm8k", DOCS, DOCS[:2],
                                 LoopConfig(steps=2, batch_size=2, eval_every=1, lr=0.01, grad_clip=1.0),
                                 run_dir=tmp_path / "run", objective="reinforce",
                                 reinforce=RLObjectiveConfig(max_new_tokens=4), max_new_tokens=4, eval_batch_size=2)
    peft_model = adapter.model
    before = frozen_weights(peft_model)
    assert len(result.history) == 2 and all("reward" in h and "grad_norm" in h for h in result.history)
    assert [v["step"] for v in result.validations] == [0, 1, 2]
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in result.best_state.items())
    assert all(torch.equal(p, before[n]) for n, p in peft_model.named_parameters() if n in before)


def test_best_adapter_round_trips_through_peft_from_pretrained(tmp_path):
    from peft import PeftModel

    model, tokenizer = build_tiny_random("llama")
    model.eval()
    base = frozen_weights(model)
    result, adapter = train_lora(model, tokenizer, "gsm8k", DOCS, DOCS[:2],
                                 LoopConfig(steps=2, batch_size=2, eval_every=1, lr=0.01, grad_clip=1.0),
                                 run_dir=tmp_path / "run", next_token=NextTokenConfig(), max_new_tokens=4,
                                 eval_batch_size=2)
    assert all("loss" in h for h in result.history)
    adapter.load_state(result.best_state)
    adapter.save(tmp_path / "adapter", {"best_step": result.best_step})
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "provenance.json"} <= files
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (16, 32, "LORA")
    assert config["target_modules"] == ["q_proj", "v_proj"]  # sorted: PEFT's set order varies with the hash seed

    ids = tokenizer(["What is 2 plus 2?", "hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        trained = adapter.model(**ids).logits
        fresh, _ = build_tiny_random("llama")
        loaded = PeftModel.from_pretrained(fresh.eval(), tmp_path / "adapter")
        again = loaded(**ids).logits
        with loaded.disable_adapter():
            plain = loaded(**ids).logits
    assert torch.equal(trained, again)
    assert not torch.allclose(trained, plain)  # the adapter does something
    assert all(torch.equal(p, base[n.replace("base_model.model.", "").replace(".base_layer", "")])
               for n, p in loaded.named_parameters() if "lora_" not in n)


def test_lora_stage_writes_metrics_curve_and_adapter(tmp_path, tiny_model_dir):
    from tasks.lora import run_lora_stage
    from transformer2.config import LoRAParams
    from transformer2.config import parse_params

    for split in ("train", "validation"):
        (tmp_path / "data" / "gsm8k").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    params = parse_params({"tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "t"},
                           "rl": {"max_new_tokens": 4, "val_size": 2, "eval_batch_size": 2}})
    settings = LoRAParams(steps=2, batch_size=2, eval_every=1, lr=0.01)
    out = tmp_path / "out"
    metrics = run_lora_stage(params, "gsm8k", str(tiny_model_dir), str(tmp_path / "data"), str(out),
                             str(tmp_path / "run"), str(tmp_path / "metrics.json"), str(tmp_path / "curve.csv"),
                             settings=settings, log=lambda msg: None)
    assert metrics["trainable_parameters"] == 7168 and metrics["steps"] == 2 and metrics["kind"] == "lora"
    assert json.loads((tmp_path / "metrics.json").read_text())["best_val_accuracy"] == metrics["best_val_accuracy"]
    rows = list(csv.DictReader(open(tmp_path / "curve.csv")))
    assert [r["step"] for r in rows] == ["1", "2"] and all(r["loss"] for r in rows)
    assert (out / "adapter_model.safetensors").is_file() and (out / "validations.json").is_file()

    import mlflow

    mlflow.set_tracking_uri(params.tracking.uri)
    run = mlflow.search_runs(experiment_names=["t"], output_format="list")[0]
    assert {k: run.data.tags[k] for k in ("stage", "task", "kind", "objective")} == \
        {"stage": "lora", "task": "gsm8k", "kind": "lora", "objective": "next_token"}
    assert run.data.params["trainable_parameters"] == "7168"
    assert "loss" in run.data.metrics



def test_lora_loop_settings_come_from_params_lora_with_task_overrides():
    from transformer2.config import parse_params

    params = parse_params({"lora": {"steps": 3, "objective": "reinforce", "overrides": {"mbpp": {"lr": 1e-3}}}})
    s = params.lora.for_task("mbpp")
    assert (s.steps, s.objective, s.lr, s.rank) == (3, "reinforce", 1e-3, 16)
    loop = s.loop_config(seed=5)
    assert (loop.steps, loop.lr, loop.optimizer, loop.lr_schedule, loop.grad_clip, loop.seed) == \
        (3, 1e-3, "adamw", "cosine", 1.0, 5)
    assert s.next_token_config().micro_batch_size == s.micro_batch_size
    assert params.rl.loop_config(seed=0).optimizer == "adam" and params.lora.for_task("gsm8k").lr == 5e-4
