"""The training loop's run identity: a checkpoint resumes only the same run (config and data)."""
from contextlib import contextmanager

import pytest
import torch

from transformer2.settings import LoopConfig
from transformer2.training import fit


class VectorAdapter:
    """A toy adapter: one vector, so the loop's bookkeeping is tested without a model."""

    kind = "toy"

    def __init__(self):
        self.tensors = {"w": torch.zeros(3, requires_grad=True)}

    def trainable(self):
        return list(self.tensors.values())

    def state(self):
        return {k: v.detach().clone() for k, v in self.tensors.items()}

    def load_state(self, state):
        with torch.no_grad():
            for k, v in state.items():
                self.tensors[k].copy_(v)

    @contextmanager
    def disabled(self):
        yield

    @contextmanager
    def inference(self):
        yield


def _objective(adapter, crash_at=None):
    calls = []

    def objective(docs):  # pull w towards the mean target of the batch
        calls.append(1)
        if len(calls) == crash_at:
            raise KeyboardInterrupt  # a kill after the previous step's checkpoint
        target = torch.tensor([d["y"] for d in docs], dtype=torch.float32).mean()
        loss = ((adapter.tensors["w"] - target) ** 2).sum()
        loss.backward()
        return {"loss": float(loss)}

    return objective


def _run(docs, run_dir, steps, resume, crash_at=None):
    adapter = VectorAdapter()
    cfg = LoopConfig(steps=steps, batch_size=2, lr=0.1, grad_clip=10.0, eval_every=1)
    result = fit(adapter, _objective(adapter, crash_at), lambda: float(-adapter.tensors["w"].sum()), docs, cfg, run_dir,
                 resume=resume)
    return result, adapter.state()["w"]


def test_resume_continues_the_same_run(tmp_path):
    docs = [{"y": float(i)} for i in range(6)]
    with pytest.raises(KeyboardInterrupt):
        _run(docs, tmp_path, steps=4, resume=False, crash_at=3)
    resumed, w = _run(docs, tmp_path, steps=4, resume=True)
    assert resumed.resumed_from == 2
    _, w_straight = _run(docs, tmp_path / "straight", steps=4, resume=False)
    assert torch.equal(w, w_straight)


def test_changed_training_data_never_resumes_the_old_run(tmp_path, capsys):
    old = [{"y": 1.0}] * 6
    with pytest.raises(KeyboardInterrupt):
        _run(old, tmp_path, steps=3, resume=False, crash_at=3)
    new = [{"y": 5.0}] * 6
    result, w = _run(new, tmp_path, steps=3, resume=True)
    assert result.resumed_from == 0 and "different config" in capsys.readouterr().out
    _, fresh = _run(new, tmp_path / "fresh", steps=3, resume=False)
    assert torch.equal(w, fresh)  # the new data's expert, not the old checkpoint's


def test_a_damaged_checkpoint_starts_afresh_instead_of_crashing(tmp_path, capsys):
    from transformer2.training import CHECKPOINT

    docs = [{"y": float(i)} for i in range(6)]
    with pytest.raises(KeyboardInterrupt):
        _run(docs, tmp_path, steps=3, resume=False, crash_at=3)
    ckpt = tmp_path / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # e.g. a disk that filled up under another writer
    result, w = _run(docs, tmp_path, steps=3, resume=True)
    assert result.resumed_from == 0 and "cannot be read" in capsys.readouterr().out
    _, fresh = _run(docs, tmp_path / "fresh", steps=3, resume=False)
    assert torch.equal(w, fresh)


def test_validation_time_is_recorded_per_validation_and_in_all(tmp_path):
    import time

    def slow_validate():  # a validation that decodes: here it only takes time
        time.sleep(0.05)
        return 0.5

    adapter = VectorAdapter()
    cfg = LoopConfig(steps=4, batch_size=2, lr=0.1, grad_clip=10.0, eval_every=2)
    result = fit(adapter, _objective(adapter), slow_validate, [{"y": 1.0}] * 4, cfg, tmp_path)
    timed = {m["step"]: m["seconds_validation"] for m in result.history if "seconds_validation" in m}
    assert sorted(timed) == [2, 4] and all(s >= 0.05 for s in timed.values())
    # the base's validation (before step 1) counts in the total, not in any step
    assert result.validation_seconds >= sum(timed.values()) + 0.05
    assert result.validation_summary()["validation_seconds"] == round(result.validation_seconds, 3)
