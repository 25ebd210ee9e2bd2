"""Bad input through the `t2` command line (issue 15, item 4): each case is one `t2: error:` line (exit 2)
naming the file or key and what to do, printed before Prefect or a model starts, and nothing in the project
changes. The cases run `flows.cli.main` in-process (the CLI path without the interpreter's start-up);
tests/test_cli_errors.py runs a few through the installed `t2` command."""
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import flows.cli as cli

REACHED = "the checks passed: the stage would have started"


@pytest.fixture
def project(tiny_project, tmp_path, monkeypatch):
    root = tmp_path / "p"
    shutil.copytree(tiny_project, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("PREFECT_HOME", str(root / ".prefect"))
    checks = cli._check_before_start

    def checked_only(args, params):  # a case whose checks pass must fail the test, never start a flow
        checks(args, params)
        raise AssertionError(REACHED)

    monkeypatch.setattr(cli, "_check_before_start", checked_only)
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".prefect" not in p.parts}


def params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def set_params(root: Path, **sections) -> None:
    data = params(root)
    for key, value in sections.items():
        if isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def t2_error(root: Path, capsys, *argv: str) -> str:
    """Run `t2 argv` in-process; assert one clean error line (exit 2) and an unchanged project."""
    before = snapshot(root)
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2: error: "), err
    assert "Traceback" not in out + err
    assert snapshot(root) == before, "the failed command changed the project"
    return lines[0].removeprefix("t2: error: ")


def truncate(path: Path, keep: int = 40) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def drop_column(path: Path, column: str) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != column}) + "\n" for r in rows))


def write_yaml(root: Path, text: str) -> None:
    (root / "params.yaml").write_text(text)


def the_fingerprint(root: Path) -> str:
    return json.loads((root / "artifacts/model/model.json").read_text())["fingerprint"]


def set_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def other_base(folder: Path, meta: str = "expert.json") -> None:
    set_json(folder / meta, base_fingerprint="f" * 64)


def block_with_file(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.write_text("not a folder")


def _immutable(path: Path) -> None:
    """Read-only even for root: chattr +i (else chmod for an ordinary user)."""
    import os

    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i not permitted here (root ignores chmod)")
    else:
        path.chmod(0o555)


def _mutable(path: Path) -> None:
    import os

    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o755)


# (id, how to break the project, argv, what the message must say)
CONFIG_CASES = [
    ("empty-params", lambda r: write_yaml(r, ""), ["check-params"], "params.yaml: the file is empty"),
    ("string-float", lambda r: set_params(r, rl={"lr": "0.002"}), ["check-params"], "rl.lr: Input should be a valid number"),
    ("yaml-exponent", lambda r: write_yaml(r, "rl: {lr: 2e-3}\n"), ["check-params"], "dot before any exponent"),
    ("bool-int", lambda r: set_params(r, seed=True), ["check-params"], "seed: Input should be a valid integer"),
    ("yes-bool", lambda r: set_params(r, rl={"do_sample": "yes"}), ["check-params"], "rl.do_sample: Input should be a valid boolean"),
    ("inf-clip", lambda r: write_yaml(r, "rl: {grad_clip: .inf}\n"), ["check-params"], "rl.grad_clip: Input should be a finite number"),
    ("nan-lr", lambda r: write_yaml(r, "lora: {lr: .nan}\n"), ["check-params"], "lora.lr: Input should be a finite number"),
    ("float-int", lambda r: set_params(r, rl={"steps": 2.5}), ["check-params"], "rl.steps: Input should be a valid integer"),
    ("bad-regex", lambda r: set_params(r, svf={"targets": ["model.layers.(0"]}), ["check-params"], "not a valid regular expression"),
    ("empty-targets", lambda r: set_params(r, svf={"targets": []}), ["check-params"], "svf.targets"),
    ("typo-key", lambda r: set_params(r, rl={"stepz": 2}), ["check-params"], "rl.stepz: unknown key"),
    ("not-yaml", lambda r: write_yaml(r, "rl: [unclosed\n"), ["check-params"], "params.yaml: not valid YAML"),
    ("top-level-list", lambda r: write_yaml(r, "- 1\n"), ["check-params"], "the top level must be a mapping"),
    ("no-params-file", lambda r: (r / "params.yaml").unlink(), ["check-params"], "params.yaml: config file not found"),
    ("unknown-task", lambda r: set_params(r, data={"tasks": ["squad"]}), ["check-params"], "data.tasks: Value error, unknown task(s) ['squad']"),
    ("bad-override", lambda r: set_params(r, rl={"overrides": {"gsm8k": {"stepz": 1}}}), ["check-params"], "gsm8k.stepz: unknown key"),
    ("adapt-without-cem", lambda r: set_params(r, cem={"tasks": ["math"]}), ["check-params"], "eval.adapt_tasks"),
    ("missing-task-module", lambda r: set_params(r, task_modules=["nowhere.py"]), ["check-params"], "task_modules: cannot import 'nowhere.py'"),
    ("bad-device", lambda r: set_params(r, model={"device": "tpu"}), ["check-params"], "model.device"),
]

MODEL_CASES = [
    ("no-such-model", lambda r: set_params(r, model={"name": "/no/such/model"}), ["model"], "model.name /no/such/model: no such file"),
    ("fake-gguf", lambda r: ((r / "fake.gguf").write_text("<html>not found</html>"),
                             set_params(r, model={"name": str(r / "fake.gguf")})), ["model"], "is not a GGUF file"),
    ("no-tokenizer", lambda r: ([f.unlink() for f in (r / "artifacts/model/checkpoint").glob("tokenizer*")],
                                set_params(r, model={"name": str(r / "artifacts/model/checkpoint")})),
     ["model"], "the folder has no tokenizer"),
    ("no-config-json", lambda r: ((r / "artifacts/model/checkpoint/config.json").unlink(),
                                  set_params(r, model={"name": str(r / "artifacts/model/checkpoint")})),
     ["model"], "no config.json there"),
    ("unknown-builtin", lambda r: set_params(r, model={"name": "builtin:gpt-7"}), ["model"], "unknown built-in model 'builtin:gpt-7'"),
    ("no-model-json", lambda r: (r / "artifacts/model/model.json").unlink(), ["decompose"],
     "artifacts/model/model.json not found: run stage model first"),
    ("corrupt-model-json", lambda r: truncate(r / "artifacts/model/model.json"), ["decompose"],
     "artifacts/model/model.json is not a model record"),
    ("truncated-checkpoint", lambda r: truncate(r / "artifacts/model/checkpoint/model.safetensors", 1000), ["decompose"],
     "model.safetensors is damaged or incomplete (1000 bytes"),
    ("checkpoint-gone", lambda r: (r / "artifacts/model/checkpoint/model.safetensors").unlink(), ["train-expert", "--task", "gsm8k"],
     "model.safetensors is damaged or incomplete (missing)"),
    ("targets-match-nothing", lambda r: set_params(r, svf={"targets": [r"nothing\.like\.this"]}), ["decompose"],
     "matches no linear layer of LlamaForCausalLM"),
]

STAGE_CASES = [
    ("svd-missing", lambda r: shutil.rmtree(r / "artifacts/svd"), ["train-expert", "--task", "gsm8k"],
     "artifacts/svd/index.json not found: run stage decompose first"),
    ("svd-corrupt-index", lambda r: truncate(r / "artifacts/svd/index.json", 10), ["cem", "--task", "arc_challenge"],
     "artifacts/svd/index.json is damaged"),
    ("svd-other-base", lambda r: set_json(r / "artifacts/svd/index.json", fingerprint="e" * 64),
     ["train-expert", "--task", "gsm8k"], "was computed for base weights eeeeeeeeeeee"),
    ("targets-changed", lambda r: set_params(r, svf={"targets": "mlp"}), ["train-expert", "--task", "gsm8k"],
     "svf.targets 'mlp' selects 6 matrices, the SVD cache in artifacts/svd holds 14 others"),
    ("task-not-listed", lambda r: None, ["train-expert", "--task", "mbpp"], "--task 'mbpp' is not in rl.tasks ['gsm8k']"),
    ("train-split-missing", lambda r: (r / "artifacts/data/gsm8k/train.jsonl").unlink(), ["train-expert", "--task", "gsm8k"],
     "artifacts/data/gsm8k/train.jsonl not found: run stage data first"),
    ("corrupt-jsonl", lambda r: (r / "artifacts/data/gsm8k/validation.jsonl").write_text('{"question": "x", "ans\n'),
     ["train-lora", "--task", "gsm8k"], "artifacts/data/gsm8k/validation.jsonl:1: not valid JSON"),
    ("empty-split", lambda r: (r / "artifacts/data/gsm8k/train.jsonl").write_text(""), ["train-expert", "--task", "gsm8k"],
     "artifacts/data/gsm8k/train.jsonl has no rows; rerun the data stage"),
    ("data-missing-column", lambda r: drop_column(r / "artifacts/data/arc_easy/test.jsonl", "choices"),
     ["eval", "--kind", "base", "--task", "arc_easy"], "row 1 has no column 'choices' that arc_easy reads"),
    ("classifier-data-column", lambda r: drop_column(r / "artifacts/data/mbpp/train.jsonl", "test_list"),
     ["classifier"], "artifacts/data/mbpp/train.jsonl: row 1 has no column 'test_list'"),
    ("cem-without-experts", lambda r: shutil.rmtree(r / "artifacts/experts"), ["cem", "--task", "arc_challenge"],
     "artifacts/experts/gsm8k/expert.json not found: run stage expert@gsm8k first"),
    ("cem-expert-other-base", lambda r: other_base(r / "artifacts/experts/gsm8k"), ["cem", "--task", "arc_challenge"],
     "artifacts/experts/gsm8k was trained on base weights ffffffffffff"),
    ("truncated-expert", lambda r: truncate(r / "artifacts/experts/gsm8k/expert.safetensors"),
     ["cem", "--task", "arc_challenge"], "expert.safetensors is damaged or incomplete (40 bytes"),
    ("corrupt-expert-json", lambda r: truncate(r / "artifacts/experts/gsm8k/expert.json", 30),
     ["eval", "--kind", "svf", "--task", "gsm8k"], "artifacts/experts/gsm8k/expert.json is not valid JSON"),
    ("expert-other-modules", lambda r: set_json(r / "artifacts/experts/gsm8k/expert.json", modules={"x": 3}), ["eval", "--kind", "prompt", "--task", "arc_challenge"],
     "patches 1 matrices, the SVD cache and svf.targets 14 others"),
    ("eval-expert-other-base", lambda r: other_base(r / "artifacts/experts/gsm8k"), ["eval", "--kind", "svf", "--task", "gsm8k"],
     "was trained on base weights ffffffffffff"),
    ("classifier-other-base", lambda r: other_base(r / "artifacts/classifier"), ["eval", "--kind", "classifier", "--task", "arc_challenge"],
     "artifacts/classifier was trained on base weights ffffffffffff"),
    ("classifier-missing", lambda r: shutil.rmtree(r / "artifacts/classifier"), ["eval", "--kind", "classifier", "--task", "arc_challenge"],
     "artifacts/classifier/expert.json not found: run stage classifier first"),
    ("corrupt-cem-json", lambda r: truncate(r / "artifacts/cem/arc_challenge/cem.json"), ["eval", "--kind", "few_shot", "--task", "arc_challenge"],
     "artifacts/cem/arc_challenge/cem.json is not a CEM result"),
    ("cem-mixes-unknown", lambda r: set_json(r / "artifacts/cem/arc_challenge/cem.json", keys=["mbpp"]), ["eval", "--kind", "few_shot", "--task", "arc_challenge"],
     "mixes experts ['mbpp'] that are not in rl.tasks"),
    ("lora-other-base", lambda r: other_base(r / "artifacts/lora/gsm8k", "provenance.json"), ["eval", "--kind", "lora", "--task", "gsm8k"],
     "artifacts/lora/gsm8k was trained on base weights ffffffffffff"),
    ("lora-corrupt-config", lambda r: truncate(r / "artifacts/lora/gsm8k/adapter_config.json", 3), ["eval", "--kind", "lora", "--task", "gsm8k"],
     "adapter_config.json is not valid JSON"),
    ("eval-unknown-task", lambda r: None, ["eval", "--kind", "base", "--task", "squad"], "unknown --task 'squad'"),
    ("base-samples-missing", lambda r: shutil.rmtree(r / "artifacts/eval/base_gsm8k"), ["eval", "--kind", "svf", "--task", "gsm8k"],
     "artifacts/eval/base_gsm8k/samples.jsonl not found: run stage eval-base@gsm8k first"),
    ("outputs-blocked-by-file", lambda r: block_with_file(r / "artifacts/checkpoints"), ["train-expert", "--task", "gsm8k"],
     "artifacts/checkpoints is not a folder"),
]


def _mirror(root: Path) -> Path:
    return Path(params(root)["data"]["dir"])


def _copy_mirror(root: Path) -> Path:
    """The data cases break a private copy of the mirror (the session's is shared)."""
    copy = root / "mirror"
    shutil.copytree(_mirror(root), copy)
    set_params(root, data={"dir": str(copy)})
    return copy


DATA_CASES = [
    ("mirror-missing-column", lambda r: drop_column(_copy_mirror(r) / "gsm8k/train.jsonl", "answer"), ["data"],
     "mirror/gsm8k/train.jsonl: row 1 has no column 'answer' that gsm8k reads"),
    ("mirror-empty-train", lambda r: (_copy_mirror(r) / "arc_easy/train.jsonl").write_text(""), ["data"],
     "mirror/arc_easy/train.jsonl has no rows; fix the mirror (nothing was written)"),
    ("mirror-corrupt-line", lambda r: (lambda p: p.write_text(p.read_text() + "{oops\n"))(_copy_mirror(r) / "math/test.jsonl"),
     ["data"], "mirror/math/test.jsonl:401: not valid JSON"),
    ("mirror-missing-split", lambda r: (_copy_mirror(r) / "gsm8k/test.jsonl").unlink(), ["data"],
     "mirror/gsm8k/test.jsonl not found"),
    ("mirror-not-a-dir", lambda r: set_params(r, data={"dir": str(r / "params.yaml")}), ["data"],
     "data.dir points at"),
]


@pytest.mark.parametrize("setup, argv, expected", [c[1:] for c in CONFIG_CASES + MODEL_CASES + STAGE_CASES + DATA_CASES],
                         ids=[c[0] for c in CONFIG_CASES + MODEL_CASES + STAGE_CASES + DATA_CASES])
def test_bad_input_is_one_clear_line(project, capsys, setup, argv, expected):
    setup(project)
    message = t2_error(project, capsys, *argv)
    assert expected in message, message


def test_the_good_project_passes_every_check(project, capsys):
    """The fixture is sound: each case above fails because of what it broke, not because of the fixture."""
    for argv in (["decompose"], ["train-expert", "--task", "gsm8k"], ["train-lora", "--task", "gsm8k"], ["classifier"],
                 ["cem", "--task", "arc_challenge"], ["data"], ["model"],
                 *(["eval", "--kind", k, "--task", t] for k, t in (("base", "gsm8k"), ("svf", "gsm8k"), ("lora", "gsm8k"),
                                                                   ("prompt", "arc_challenge"), ("classifier", "arc_challenge"),
                                                                   ("few_shot", "arc_challenge")))):
        assert cli.main(argv) == 1, argv
        assert REACHED in capsys.readouterr().err


def test_read_only_artifacts(project, capsys):
    folder = project / "artifacts/experts"
    _immutable(folder)
    try:
        message = t2_error(project, capsys, "train-expert", "--task", "gsm8k")
    finally:
        _mutable(folder)
    assert message.startswith("cannot write in artifacts/experts") and "make it writable" in message, message


def test_data_stage_overwrites_nothing_when_one_task_is_bad(project, tiny_project):
    """Past the CLI's check (a library call, as the stage makes it): every task is read before any is written."""
    from transformer2.tasks import DataError, export_tasks

    mirror = _copy_mirror(project)
    drop_column(mirror / "arc_challenge/test.jsonl", "answerKey")  # the last task of data.tasks
    before = snapshot(project / "artifacts/data")
    p = params(project)["data"]
    with pytest.raises(DataError, match="answerKey"):
        export_tasks(p["tasks"], project / "artifacts/data", mirror, p["max_rows"], p["fewshot_holdout"])
    assert snapshot(project / "artifacts/data") == before
