import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from transformer2.config import ConfigError
from transformer2.models import TINY_ARCHS, build_tiny_random, fingerprint
from transformer2.svd import decompose, load_factors
from transformer2.svf import (Expert, ExpertError, SVFConfig, apply_svf, count_svf_parameters, find_targets,
                              init_expert, mix_experts, remove_svf, set_expert, set_row_z, svf_layers)


def patched(arch="llama", targets="all", tmp_path=None, **cfg):
    model, tokenizer = build_tiny_random(arch)
    fp = fingerprint(model)
    names = find_targets(model, targets)
    decompose(model, names, tmp_path, fp)
    config = SVFConfig(targets=targets, **cfg)
    apply_svf(model, load_factors(tmp_path, fp), config)
    return model, fp, config


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_init_expert_reproduces_base(arch, tmp_path):
    base_model, _ = build_tiny_random(arch)
    base = logits(base_model, IDS)
    model, fp, config = patched(arch, tmp_path=tmp_path, init_std=0.0)
    weights = {n: layer.base.weight.clone() for n, layer in svf_layers(model).items()}
    expert = init_expert(model, fp, config)
    set_expert(model, expert)
    for name, layer in svf_layers(model).items():
        rel = (layer._weight - weights[name]).norm() / weights[name].norm()
        assert rel < 1e-5, name
    assert ((logits(model, IDS) - base).norm() / base.norm()) < 1e-5


def test_reference_init_noise_is_small(tmp_path):
    model, fp, config = patched(tmp_path=tmp_path)  # reference init: 0.1 + 0.01·N(0,1)
    for name, layer in svf_layers(model).items():
        w = layer.base.weight
        z = init_expert(model, fp, config, torch.Generator().manual_seed(0)).vectors[name]
        assert (layer.adapted_weight(z) - w).norm() / w.norm() < 0.02


def test_singular_value_sum_is_kept(tmp_path):
    model, fp, config = patched(tmp_path=tmp_path)
    layer = next(iter(svf_layers(model).values()))
    z = torch.randn(layer.rank)
    assert torch.allclose(config.scaled_singular_values(layer.S, z).sum(), layer.S.sum(), rtol=1e-5)


def test_no_expert_is_exact_base(tmp_path):
    base_model, _ = build_tiny_random("llama")
    base = logits(base_model, IDS)
    model, fp, config = patched(tmp_path=tmp_path)
    assert torch.equal(logits(model, IDS), base)
    expert = init_expert(model, fp, config, torch.Generator().manual_seed(1))
    expert.vectors = {k: v + torch.randn_like(v) for k, v in expert.vectors.items()}
    set_expert(model, expert)
    assert not torch.allclose(logits(model, IDS), base)
    set_expert(model, None)
    assert torch.equal(logits(model, IDS), base)
    remove_svf(model)
    assert not svf_layers(model) and torch.equal(logits(model, IDS), base)


def test_gradients_reach_z_only(tmp_path):
    model, fp, config = patched(tmp_path=tmp_path)
    live = set_expert(model, init_expert(model, fp, config), trainable=True)
    model(IDS).logits.square().mean().backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in live.values())
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_trainable_factored_path_matches_rebuilt_weight(tmp_path):
    model, fp, config = patched(tmp_path=tmp_path)
    expert = init_expert(model, fp, config, torch.Generator().manual_seed(2))
    set_expert(model, expert)
    rebuilt = logits(model, IDS)
    set_expert(model, expert, trainable=True)
    assert torch.allclose(logits(model, IDS), rebuilt, atol=1e-5)


def test_per_sample_z_matches_per_sample_weights(tmp_path):
    model, fp, config = patched(tmp_path=tmp_path)
    experts = [init_expert(model, fp, config, torch.Generator().manual_seed(s)) for s in (3, 4)]
    for e in experts:
        e.vectors = {k: v + torch.randn_like(v) for k, v in e.vectors.items()}
    expected = []
    for i, e in enumerate(experts):
        set_expert(model, e)
        expected.append(logits(model, IDS[i:i + 1]))
    for name, layer in svf_layers(model).items():
        layer.set_z(torch.stack([e.vectors[name] for e in experts]))
    assert torch.allclose(logits(model, IDS), torch.cat(expected), atol=1e-5)


def test_grouped_z_is_bitwise_the_gathered_z_and_stays_differentiable(tmp_path):
    """set_row_z(groups, index) computes σ·f(z) once per group (the engine's prefill gives every
    token a row index): the same bits as one z per sample, and state() puts it back as it was."""
    model, fp, config = patched(tmp_path=tmp_path)
    groups = {n: torch.randn(3, layer.rank, generator=torch.Generator().manual_seed(5))
              for n, layer in svf_layers(model).items()}
    ids = IDS.repeat(3, 1)[:5]
    for index in (torch.tensor([2, 0, 0, 1, 2]), torch.tensor([1, 0])):  # more samples than groups, and fewer
        x = ids[:len(index)]
        set_row_z(model, {n: z[index] for n, z in groups.items()})
        expected = logits(model, x)
        set_row_z(model, groups, index)
        assert torch.equal(logits(model, x), expected)
    saved = {n: layer.state() for n, layer in svf_layers(model).items()}
    set_row_z(model, None)
    for n, layer in svf_layers(model).items():
        layer.restore(saved[n])
    assert torch.equal(logits(model, x), expected)
    live = {n: z.clone().requires_grad_(True) for n, z in groups.items()}  # a trained batch: gathered, with grad
    set_row_z(model, live, index)
    model(x).logits.square().mean().backward()
    assert all(z.grad is not None and z.grad[0].abs().sum() > 0 and z.grad[2].abs().sum() == 0 for z in live.values())
    with pytest.raises(ValueError, match="groups"):
        next(iter(svf_layers(model).values())).set_z(torch.zeros(next(iter(svf_layers(model).values())).rank), index)


def test_expert_round_trip_and_mismatch_errors(tmp_path):
    model, fp, config = patched(tmp_path=tmp_path / "svd")
    expert = init_expert(model, fp, config, torch.Generator().manual_seed(5), provenance={"task": "gsm8k"})
    expert.save(tmp_path / "e")
    loaded = Expert.load(tmp_path / "e")
    assert loaded.base_fingerprint == fp and loaded.config == config and loaded.provenance == {"task": "gsm8k"}
    assert all(torch.equal(loaded.vectors[k], expert.vectors[k]) for k in expert.vectors)
    set_expert(model, loaded, base_fingerprint=fp)

    with pytest.raises(ExpertError, match="trained on base weights"):
        set_expert(model, loaded, base_fingerprint="f" * 64)
    missing = Expert(dict(list(loaded.vectors.items())[1:]), fp, config)
    with pytest.raises(ExpertError, match="1 missing"):
        set_expert(model, missing)
    name = next(iter(loaded.vectors))
    bad = Expert({**loaded.vectors, name: torch.zeros(3)}, fp, config)
    with pytest.raises(ExpertError, match="shape"):
        set_expert(model, bad)
    with pytest.raises(ExpertError, match="is not an SVF expert"):
        Expert.load(tmp_path / "nowhere")


def test_mixing(tmp_path):
    model, fp, config = patched(tmp_path=tmp_path)
    a, b = (init_expert(model, fp, config, torch.Generator().manual_seed(s)) for s in (6, 7))
    one_hot = mix_experts([a, b], torch.tensor([1.0, 0.0]))
    assert all(torch.equal(one_hot.vectors[k], a.vectors[k]) for k in a.vectors)
    half = mix_experts([a, b], torch.tensor([0.5, 0.5]))
    assert all(torch.allclose(half.vectors[k], (a.vectors[k] + b.vectors[k]) / 2) for k in a.vectors)
    per_matrix = torch.zeros(2, len(a.vectors))
    per_matrix[0, ::2] = 1
    per_matrix[1, 1::2] = 1
    mixed = mix_experts([a, b], per_matrix)
    for j, k in enumerate(a.vectors):
        assert torch.equal(mixed.vectors[k], (a if j % 2 == 0 else b).vectors[k])
    set_expert(model, mixed, base_fingerprint=fp)
    with pytest.raises(ExpertError, match="alpha must have shape"):
        mix_experts([a, b], torch.ones(3))


def llama3_8b_on_meta():
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_parameter_counts_of_llama3_8b_from_config_alone():
    model = llama3_8b_on_meta()
    assert count_svf_parameters(model, "mlp") == 393_216
    assert count_svf_parameters(model, "qv") == 163_840  # the paper's 0.16M attention-only
    assert count_svf_parameters(model, "all") == 393_216 + (4096 + 1024 + 1024 + 4096) * 32


def test_bad_targets_are_config_errors():
    model, _ = build_tiny_random("llama")
    with pytest.raises(ConfigError, match="matches no linear layer"):
        find_targets(model, [r"nothing\.here"])
    with pytest.raises(ConfigError, match="unknown target set"):
        find_targets(model, "mlps")
    with pytest.raises(ConfigError, match="invalid regular expression"):
        find_targets(model, ["("])
    assert "lm_head" not in " ".join(find_targets(model, [".*"]))


def test_a_loaded_expert_keeps_its_module_order_and_mixes_with_another(tmp_path):
    """safetensors hands tensors back in no fixed order; per-matrix α (CEM) indexes modules by position."""
    names = [f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("gate_proj", "up_proj", "down_proj")]
    experts = []
    for k in range(2):
        Expert({n: torch.full((4,), float(k + j)) for j, n in enumerate(names)}, "fp", SVFConfig()).save(tmp_path / str(k))
        experts.append(Expert.load(tmp_path / str(k)))
        assert list(experts[-1].vectors) == names
    mixed = mix_experts(experts, torch.tensor([[1.0] * len(names), [0.0] * len(names)]))
    assert [float(v[0]) for v in mixed.vectors.values()] == [float(j) for j in range(len(names))]
