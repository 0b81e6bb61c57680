"""A draft in the layout vLLM and SGLang load as an EAGLE / EAGLE-3 head (``scylla export``).

An export directory holds ``config.json`` (a Llama config whose ``architectures`` names the
head: ``LlamaForCausalLMEagle`` or ``LlamaForCausalLMEagle3``, names both engines accept),
``model.safetensors`` under the engines' weight names (our fused q/k/v and gate/up projections
split back into ``q_proj``/``k_proj``/``v_proj``/``gate_proj``/``up_proj``), a model card, and
for a pruned EAGLE vocabulary SGLang's token map. ``import_export`` reads one back into the
layouts of ``scylla.drafts.served``. docs/export.md lists the engine code each rule rests on.

What is exported, and how exactly:

- ``eagle`` from a ``scylla`` draft. EAGLE's first layer has no input norm; ours has one. The
  export therefore starts with an all-zero pass-through layer (its attention and MLP add exactly
  zero to the residual stream), and our layer i becomes layer i+1, whose input norm the engines
  apply: the same function, at the price of one more layer in the engine. A pruned vocabulary
  goes to ``hot_token_ids.pt`` (SGLang's ``--speculative-token-map``; vLLM's EAGLE has no pruned
  vocabulary and drafts over the full one). SGLang's ``fc`` has a bias, vLLM's has none and
  skips ``fc.bias``: vLLM serves the draft without its fc bias.
- ``eagle3`` from an ``eagle3`` draft (built exactly as the engines serve EAGLE-3) and
  ``eagle`` from ``served-eagle`` (an imported EAGLE head): unchanged.
- Anything else raises ConfigError naming the kind.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scylla.drafts.card import write_card
from scylla.drafts.model import DraftModel, instantiate
from scylla.drafts.served import SERVED
from scylla.drafts.spec import DraftSpec
from scylla.errors import ConfigError, DataError, DraftMismatchError, TargetError
from scylla.modeling import ModelConfig
from scylla.modeling.targets import TargetInfo

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKEN_MAP = "hot_token_ids.pt"  # SGLang's --speculative-token-map: a torch.save'd id list
FORMATS = {"eagle": "LlamaForCausalLMEagle", "eagle3": "LlamaForCausalLMEagle3"}
# architectures read back: SGLang's names and vLLM's registry names for the same heads
READS = {"LlamaForCausalLMEagle": "eagle", "EagleLlamaForCausalLM": "eagle",
         "LlamaForCausalLMEagle3": "eagle3", "Eagle3LlamaForCausalLM": "eagle3"}
IMPORTED_KIND = {"eagle": "served-eagle", "eagle3": "eagle3"}
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
WHY_NOT = {
    "eagle3": "an EAGLE-3 draft fuses three target layers into a differently built layer "
              "(export it as --format eagle3)",
    "scylla": "the scylla draft reads the target's last hidden state; EAGLE-3 fuses three "
              "hidden layers into a differently built layer (export it as --format eagle)",
}


# ---------------------------------------------------------------------------------------------
# names: ours <-> the engines'


def part_sizes(c: ModelConfig) -> dict[str, list[int]]:
    """Output rows of each part of our fused projections (q, k, v and gate, up)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {"self_attn.qkv_proj": [q, kv, kv], "mlp.gate_up_proj": [c.intermediate_size] * 2}


def split_fused(state: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    sizes, out = part_sizes(c), {}
    for name, tensor in state.items():
        fused = next((f for f in FUSED if f + "." in name), None)
        if fused is None:
            out[name] = tensor
            continue
        # rows (out features) of (Hq*D + 2*Hkv*D, in) -> q, k, v; of (2I, in) -> gate, up
        for part, piece in zip(FUSED[fused], tensor.split(sizes[fused])):
            out[name.replace(fused, part)] = piece
    return out


def join_fused(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    for fused, parts in FUSED.items():
        for first in [n for n in out if parts[0] + "." in n]:
            names = [first.replace(parts[0], p) for p in parts]
            missing = [n for n in names if n not in out]
            if missing:
                raise DataError(f"{where}: has {first} but not {missing}")
            out[first.replace(parts[0], fused)] = torch.cat([out.pop(n) for n in names])
    return out


def check_layout(c: ModelConfig) -> None:
    """The exported layer is a bias-free Llama layer; say which field forbids it."""
    for field in ("attention_bias", "attention_out_bias", "mlp_bias"):
        if getattr(c, field):
            raise ConfigError(f"layer_config.{field}=True: the EAGLE / EAGLE-3 heads of vLLM and "
                              "SGLang are bias-free Llama layers (a Qwen2-style target?)")


def engine_layers(num_hidden_layers: int) -> tuple[int, ...]:
    """The target layers vLLM and SGLang feed an EAGLE-3 head by default, in HF hidden_states
    indices: (2, L // 2, L - 3), captured in layer order (so they must be distinct)."""
    n = num_hidden_layers
    layers = (2, n // 2, n - 3)
    if not (1 <= layers[0] < layers[1] < layers[2] <= n):
        raise ConfigError(f"target with {n} layers: the engines' EAGLE-3 feature layers "
                          f"{layers} are not distinct layers in [1, {n}]")
    return layers


def pass_through(c: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer 0 whose projections are all zero: attention of zero values and a SwiGLU of zero
    gates add exactly 0, so the layer passes its input on bit for bit."""
    h, inter = c.hidden_size, c.intermediate_size
    rows = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    zeros = functools.partial(torch.zeros, dtype=dtype)
    return {"layers.0.self_attn.qkv_proj.weight": zeros(rows, h),
            "layers.0.self_attn.o_proj.weight": zeros(h, c.num_attention_heads * c.head_dim),
            "layers.0.mlp.gate_up_proj.weight": zeros(2 * inter, h),
            "layers.0.mlp.down_proj.weight": zeros(h, inter),
            "layers.0.post_attention_layernorm.weight": torch.ones(h, dtype=dtype)}


def eagle_tensors(spec: DraftSpec, state: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors under EAGLE's names, num_hidden_layers) of a scylla or served-eagle draft."""
    body = {k: v for k, v in state.items() if k != "d2t"}
    if spec.kind == "served-eagle":
        return split_fused(body, spec.layer_config), spec.draft_n_layer
    if spec.kind != "scylla":
        raise ConfigError(f"kind={spec.kind!r} cannot be exported as eagle: "
                          f"{WHY_NOT.get(spec.kind, 'only scylla and served-eagle drafts can')}")
    if spec.head != "target":
        raise ConfigError(f"head={spec.head!r}: an EAGLE head reads out with the target's own "
                          "LM head, so a draft with a head of its own cannot be exported as "
                          "eagle")
    out = pass_through(spec.layer_config, state["fc.weight"].dtype)
    for name, tensor in body.items():
        if name.startswith("layers."):
            i, rest = name.removeprefix("layers.").split(".", 1)
            name = f"layers.{int(i) + 1}.{rest}"
        out[name] = tensor
    return split_fused(out, spec.layer_config), spec.draft_n_layer + 1


def eagle3_tensors(spec: DraftSpec, state: dict[str, torch.Tensor]
                   ) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors under EAGLE-3's names, 1) of an eagle3 draft: ``midlayer.*``, and the
    pruned vocabulary as EAGLE-3's ``d2t`` (target id - draft id) and ``t2d`` (bool, V)."""
    if spec.kind != "eagle3":
        raise ConfigError(f"kind={spec.kind!r} cannot be exported as eagle3: "
                          f"{WHY_NOT.get(spec.kind, 'only eagle3 drafts can')}")
    if spec.feature_layers != engine_layers(spec.target.num_hidden_layers):
        raise ConfigError(f"feature_layers={spec.feature_layers}: vLLM and SGLang feed "
                          f"{engine_layers(spec.target.num_hidden_layers)} to an EAGLE-3 head")
    out = {("midlayer." + k.removeprefix("layers.0.") if k.startswith("layers.0.") else k): v
           for k, v in state.items() if k != "d2t"}
    d2t = state.get("d2t")
    if d2t is not None:
        out["d2t"] = d2t - torch.arange(d2t.numel(), device=d2t.device)  # (Vd,)
        t2d = torch.zeros(spec.target.vocab_size, dtype=torch.bool, device=d2t.device)  # (V,)
        t2d[d2t] = True
        out["t2d"] = t2d
    return split_fused(out, spec.layer_config), 1


# ---------------------------------------------------------------------------------------------
# export


def llama_config(spec: DraftSpec, fmt: str, num_hidden_layers: int, dtype: torch.dtype,
                 provenance: dict[str, Any]) -> dict[str, Any]:
    """config.json: the draft layer's Llama config (the target's RoPE) plus the head's keys."""
    c = spec.layer_config
    eos = c.eos_token_ids
    cfg: dict[str, Any] = {
        "architectures": [FORMATS[fmt]], "model_type": "llama", "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
        # the legacy keys: read by transformers 4 and converted by transformers 5
        "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling,
        "max_position_embeddings": c.max_position_embeddings, "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": False, "vocab_size": spec.target.vocab_size,
        "bos_token_id": c.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "pad_token_id": c.pad_token_id, "torch_dtype": str(dtype).removeprefix("torch.")}
    if fmt == "eagle3":
        # draft_vocab_size is always written: without it SGLang loads the target's LM head
        cfg.update(draft_vocab_size=spec.vocab_size, target_hidden_size=spec.target.hidden_size,
                   norm_before_residual=False)
    cfg["scylla"] = provenance
    return cfg


def export_state(spec: DraftSpec, state: dict[str, torch.Tensor], out: str | Path, fmt: str,
                 extra: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                 bench: str | Path | dict[str, Any] | None = None) -> Path:
    """Write the draft ``spec`` + ``state`` (its state_dict) to directory ``out`` in ``fmt``."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: one of {tuple(FORMATS)}")
    check_layout(spec.layer_config)
    tensors, n_layers = (eagle_tensors if fmt == "eagle" else eagle3_tensors)(spec, state)
    d2t = state.get("d2t")
    token_map = TOKEN_MAP if fmt == "eagle" and d2t is not None else None
    dtype = next(v.dtype for k, v in state.items() if k != "d2t")
    info = {"format": fmt, "architecture": FORMATS[fmt], "num_hidden_layers": n_layers,
            "pass_through_layer": spec.kind == "scylla", "token_map": token_map}
    provenance = {**info, "target": spec.target.name, "kind": spec.kind,
                  "draft_n_layer": spec.draft_n_layer, "draft_vocab_size": spec.draft_vocab_size,
                  "extra": {**spec.extra, **(extra or {})}}
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / WEIGHTS))
    if token_map:
        torch.save(d2t.cpu().tolist(), path / token_map)
    (path / CONFIG).write_text(json.dumps(
        llama_config(spec, fmt, n_layers, dtype, provenance), indent=1, default=str))
    params = sum(v.numel() for k, v in state.items() if k != "d2t")
    write_card(path, dataclasses.replace(spec, extra=provenance["extra"]), params, metrics,
               bench, info)
    return path


def export_draft(draft: DraftModel, out: str | Path, fmt: str,
                 extra: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                 bench: str | Path | dict[str, Any] | None = None) -> Path:
    """``export_state`` of a loaded draft."""
    return export_state(draft.spec, draft.state_dict(), out, fmt, extra, metrics, bench)


# ---------------------------------------------------------------------------------------------
# import


def is_export(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def read_config(path: Path) -> tuple[dict[str, Any], str]:
    """(config.json, format) of an export directory."""
    file = path / CONFIG
    try:
        cfg = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{file}: cannot read an EAGLE / EAGLE-3 config ({e})") from e
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in READS:
        raise DataError(f"{file}: architectures={cfg.get('architectures')!r} is not an EAGLE "
                        f"head; expected one of {sorted(READS)}")
    for key in ("eagle_aux_hidden_state_layer_ids", "eagle_config"):
        if key in cfg:
            raise ConfigError(f"{file}: {key} is set; only the engines' default EAGLE-3 feature "
                              "layers are supported")
    return cfg, READS[arch]


def layer_config_of(cfg: dict[str, Any], file: Path) -> ModelConfig:
    """Our ModelConfig of the head's Llama layers (RoPE included) from its config.json."""
    try:
        c = ModelConfig.from_hf(SimpleNamespace(**{"model_type": "llama", **cfg}))
    except AttributeError as e:
        raise DataError(f"{file}: incomplete Llama config ({e})") from e
    except TargetError as e:
        raise ConfigError(f"{file}: {e}") from e
    check_layout(c)
    return dataclasses.replace(c, tie_word_embeddings=False)


def check_target(cfg: dict[str, Any], info: TargetInfo, file: Path) -> None:
    have = {"hidden_size": info.hidden_size, "vocab_size": info.vocab_size,
            "target_hidden_size": info.hidden_size}
    diffs = [f"{k}: head has {cfg[k]}, target {v}" for k, v in have.items()
             if k in cfg and cfg[k] != v]
    named = cfg.get("scylla", {}).get("target")
    if named is not None and named != info.name:
        diffs.append(f"exported for target {named!r}")
    if diffs:
        raise DraftMismatchError(f"{file} does not belong to target {info.name!r}: "
                                 + "; ".join(diffs))


def check_shared(tensors: dict[str, torch.Tensor], name: str, ref: torch.Tensor,
                 file: Path) -> None:
    """Drop ``name`` (a copy the head may carry of the target's embedding or LM head): our
    drafts use the target's own, so a different one cannot be imported."""
    if name in tensors and not torch.equal(tensors.pop(name).to(ref), ref):
        raise ConfigError(f"{file}: {name} differs from the target's; scylla drafts share "
                          "the target's embedding and EAGLE's LM head")


def draft_ids(path: Path, fmt: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The draft vocabulary as target ids (our d2t), or None for the full vocabulary."""
    tensors.pop("t2d", None)  # derived from d2t
    if fmt == "eagle3":
        offsets = tensors.pop("d2t", None)
        return None if offsets is None else offsets.long() + torch.arange(offsets.numel())
    if not (path / TOKEN_MAP).is_file():
        return None
    try:
        return torch.tensor(torch.load(path / TOKEN_MAP, weights_only=True), dtype=torch.long)
    except (OSError, RuntimeError, TypeError, ValueError) as e:
        raise DataError(f"{path / TOKEN_MAP}: not a list of token ids ({e})") from e


def our_state(tensors: dict[str, torch.Tensor], fmt: str, target: Any, hidden: int,
              file: Path) -> dict[str, torch.Tensor]:
    check_shared(tensors, "embed_tokens.weight", target.model.embed_tokens.weight, file)
    if fmt == "eagle":
        check_shared(tensors, "lm_head.weight", target.model.lm_head.weight, file)
        if "fc.weight" in tensors:  # vLLM's layout has no fc bias: zero is what it computes
            tensors.setdefault("fc.bias", torch.zeros(hidden, dtype=tensors["fc.weight"].dtype))
    else:
        # vLLM also reads layers.0. for midlayer.
        tensors = {("layers.0." + k.removeprefix("midlayer.") if k.startswith("midlayer.")
                    else k): v for k, v in tensors.items()}
    return join_fused(tensors, file)


def import_export(path: str | Path, target: Any) -> DraftModel:
    """The EAGLE / EAGLE-3 head in ``path`` as a ``served-eagle`` / ``eagle3`` draft wired
    to ``target`` (DraftMismatchError when sizes or the recorded target name differ)."""
    path = Path(path)
    cfg, fmt = read_config(path)
    layer_config = layer_config_of(cfg, path / CONFIG)
    info = TargetInfo.of(target)
    check_target(cfg, info, path / CONFIG)
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path / WEIGHTS}: cannot read the head's weights ({e})") from e
    d2t = draft_ids(path, fmt, tensors)
    spec = DraftSpec(kind=IMPORTED_KIND[fmt], draft_n_layer=layer_config.num_hidden_layers,
                     target=info, layer_config=layer_config,
                     feature_layers=engine_layers(info.num_hidden_layers) if fmt == "eagle3"
                     else (), draft_vocab_size=0 if d2t is None else d2t.numel(),
                     extra={**cfg.get("scylla", {}).get("extra", {}), "imported_from": str(path)})
    draft = instantiate(spec, target, d2t, cls=SERVED.get(spec.kind))
    state = our_state(tensors, fmt, target, layer_config.hidden_size, path / WEIGHTS)
    if d2t is not None:
        state["d2t"] = draft.d2t
    try:
        missing, unexpected = draft.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise DataError(f"{path / WEIGHTS} does not match {path / CONFIG}: {e}") from e
    if missing or unexpected:
        raise DataError(f"{path / WEIGHTS} does not match {path / CONFIG}: missing {missing}, "
                        f"unexpected {unexpected}")
    return draft.to(dtype=target.model.embed_tokens.weight.dtype).eval()
