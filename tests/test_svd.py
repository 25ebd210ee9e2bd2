import json

import pytest
import torch

from transformer2.models import build_tiny_random, fingerprint
from transformer2.svd import SVDCacheError, decompose, load_factors, load_index, thin_svd
from transformer2.svf import find_targets


@pytest.fixture()
def tiny():
    model, _ = build_tiny_random("llama")
    return model, fingerprint(model)


def test_thin_svd_reconstructs():
    w = torch.randn(48, 80)
    U, S, Vh = thin_svd(w)
    assert U.shape == (48, 48) and S.shape == (48,) and Vh.shape == (48, 80)
    assert torch.allclose((U * S) @ Vh, w, atol=1e-5)
    assert torch.all(S[:-1] >= S[1:])


def test_decompose_writes_index_and_factors(tiny, tmp_path):
    model, fp = tiny
    names = find_targets(model, "all")
    index = decompose(model, names, tmp_path, fp)
    assert index["modules"] == names and index["max_rel_error"] < 1e-5
    assert json.loads((tmp_path / "index.json").read_text())["fingerprint"] == fp
    factors = load_factors(tmp_path, fp)
    modules = dict(model.named_modules())
    for name, (U, S, Vh) in factors.items():
        assert torch.allclose((U * S) @ Vh, modules[name].weight, atol=1e-5)
    assert not list(tmp_path.rglob("*.tmp"))


def test_interrupted_decompose_resumes(tiny, tmp_path):
    model, fp = tiny
    names = find_targets(model, "all")

    def die_after_five(i, n, name):
        if i == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decompose(model, names, tmp_path, fp, progress=die_after_five)
    assert not (tmp_path / "index.json").exists()  # never looks complete when it is not
    assert len(list((tmp_path / "factors").glob("*.safetensors"))) == 5

    calls = []
    real_svd = torch.linalg.svd
    torch.linalg.svd = lambda *a, **k: calls.append(1) or real_svd(*a, **k)
    try:
        decompose(model, names, tmp_path, fp)
    finally:
        torch.linalg.svd = real_svd
    assert len(calls) == len(names) - 5
    assert load_index(tmp_path, fp)["modules"] == names


def test_changed_targets_drop_stale_factors(tiny, tmp_path):
    model, fp = tiny
    decompose(model, find_targets(model, "all"), tmp_path, fp)
    mlp = find_targets(model, "mlp")
    decompose(model, mlp, tmp_path, fp)
    assert sorted(p.stem for p in (tmp_path / "factors").glob("*.safetensors")) == sorted(mlp)


def test_cache_for_another_base_is_refused(tiny, tmp_path):
    model, fp = tiny
    decompose(model, find_targets(model, "mlp"), tmp_path, fp)
    with pytest.raises(SVDCacheError, match="rerun the decompose stage"):
        load_factors(tmp_path, "0" * 64)
    with pytest.raises(SVDCacheError, match="svf.targets changed"):
        load_factors(tmp_path, fp, modules=find_targets(model, "attn"))
    with pytest.raises(SVDCacheError, match="run the decompose stage first"):
        load_index(tmp_path / "nothing")
