"""`scylla export`: EAGLE / EAGLE-3 layouts for vLLM and SGLang, their import, model cards.

Round trips must be exact (fp32, torch.equal). What an engine computes from an export is
checked against a reference assembled from Hugging Face's Llama modules, loaded strictly under
the exported weight names and wired as vLLM's / SGLang's llama_eagle(3).py wire them.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from drafts_fixtures import tiny_target
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from scylla.commands.cli import main
from scylla.drafts import (
    DraftModel,
    Eagle3Draft,
    ScyllaDraft,
    ServedEagleDraft,
    draft_spec,
    export_draft,
    from_pretrained,
    import_export,
    instantiate,
    save_draft,
    save_pretrained,
)
from scylla.drafts.card import read_bench
from scylla.drafts.export import engine_layers
from scylla.errors import ConfigError, DataError, DraftMismatchError

VOCAB = 40  # pruned draft vocabulary of the tiny 256-token target
BENCH = {"num_prompts": 4, "machine": "test", "methods": [
    {"method": "plain", "tau": 1.0, "per_category": {"coding": {"tau": 1.0},
                                                     "writing": {"tau": 1.0}}},
    {"method": "tree", "tau": 2.25, "per_category": {"coding": {"tau": 2.5},
                                                     "writing": {"tau": 2.0}}}]}


@pytest.fixture(scope="module")
def target():
    # 8 layers: the engines' EAGLE-3 feature layers (2, 4, 5) are distinct
    return tiny_target(num_hidden_layers=8)


def d2t_of(pruned: bool) -> torch.Tensor | None:
    return torch.arange(3, 3 + VOCAB) * 5 if pruned else None


def perturbed(draft: DraftModel, seed: int) -> DraftModel:
    """Random weights everywhere (norms and biases too), so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return draft.eval()


def scylla_draft(target, pruned: bool, n_layer: int = 2) -> DraftModel:
    d2t = d2t_of(pruned)
    spec = draft_spec("scylla", n_layer, target, 0 if d2t is None else VOCAB)
    return perturbed(instantiate(spec, target, d2t), 1)


def eagle3_draft(target, pruned: bool) -> DraftModel:
    d2t = d2t_of(pruned)
    spec = draft_spec("eagle3", 1, target, 0 if d2t is None else VOCAB)
    assert spec.feature_layers == engine_layers(8)  # the training default is the engines' choice
    return perturbed(instantiate(spec, target, d2t), 2)


@torch.no_grad()
def two_steps(draft: DraftModel, target, ids: torch.Tensor):
    """Logits and hidden of a draft step on target features, then of a step on its own hidden."""
    feats = draft.features(target.model(ids, hidden_layers=draft.feature_layers))
    first = draft(ids, feats)
    return first.logits, first.hidden, draft(ids, first.hidden).logits


def assert_same_function(a: DraftModel, b: DraftModel, target) -> None:
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    for x, y in zip(two_steps(a, target, ids), two_steps(b, target, ids)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned"])
def test_scylla_draft_exports_as_eagle_and_imports_exactly(target, tmp_path, pruned):
    draft = scylla_draft(target, pruned)
    out = export_draft(draft, tmp_path, "eagle")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle"]
    assert cfg["num_hidden_layers"] == 3  # the pass-through layer + the draft's 2
    assert cfg["vocab_size"] == 256 and cfg["hidden_size"] == 64
    tensors = load_file(str(out / "model.safetensors"))
    assert "layers.0.input_layernorm.weight" not in tensors  # EAGLE's first layer has none
    assert not tensors["layers.0.self_attn.q_proj.weight"].any()
    assert torch.equal(tensors["layers.1.input_layernorm.weight"],
                       draft.layers[0].input_layernorm.weight)
    assert (out / "hot_token_ids.pt").is_file() == pruned
    back = import_export(out, target)
    assert isinstance(back, ServedEagleDraft) and back.spec.draft_n_layer == 3
    assert back.spec.draft_vocab_size == (VOCAB if pruned else 0)
    if pruned:
        assert torch.equal(back.d2t, draft.d2t)
    assert_same_function(draft, back, target)
    again = export_draft(back, tmp_path / "again", "eagle")  # a served draft exports unchanged
    assert load_file(str(again / "model.safetensors")).keys() == tensors.keys()
    assert all(torch.equal(v, load_file(str(again / "model.safetensors"))[k])
               for k, v in tensors.items())


@pytest.mark.parametrize("pruned", [False, True], ids=["full", "pruned"])
def test_eagle3_draft_exports_and_imports_exactly(target, tmp_path, pruned):
    draft = eagle3_draft(target, pruned)
    out = export_draft(draft, tmp_path, "eagle3")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == (VOCAB if pruned else 256)
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (64, 128)  # reads 2H
    assert tensors["fc.weight"].shape == (64, 192)  # fuses 3 target layers
    if pruned:  # EAGLE-3's convention: d2t holds target id - draft id
        assert torch.equal(tensors["d2t"] + torch.arange(VOCAB), draft.d2t)
        assert tensors["t2d"].dtype == torch.bool and int(tensors["t2d"].sum()) == VOCAB
    else:
        assert "d2t" not in tensors
    back = import_export(out, target)
    assert isinstance(back, Eagle3Draft) and back.feature_layers == (2, 4, 5)
    assert_same_function(draft, back, target)


# ---------------------------------------------------------------------------------------------
# what the engines compute from an export, assembled from HF's Llama modules


def hf_config(cfg: dict) -> LlamaConfig:
    c = LlamaConfig(**{k: v for k, v in cfg.items()
                       if k not in ("architectures", "scylla", "torch_dtype")})
    c._attn_implementation = "eager"
    return c


class Eagle3MidLayer(nn.Module):
    """vLLM's / SGLang's EAGLE-3 layer: q/k/v read [input_layernorm(embed); hidden_norm(h)]."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        h = c.hidden_size
        self.input_layernorm = LlamaRMSNorm(h, c.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(h, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c, 0)
        for name, heads in [("q_proj", c.num_attention_heads), ("k_proj", c.num_key_value_heads),
                            ("v_proj", c.num_key_value_heads)]:
            setattr(self.self_attn, name, nn.Linear(2 * h, heads * c.head_dim, bias=False))
        self.post_attention_layernorm = LlamaRMSNorm(h, c.rms_norm_eps)
        self.mlp = LlamaMLP(c)


@torch.no_grad()
def engine_logits(out, target, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    cfg = json.loads((out / "config.json").read_text())
    c = hf_config(cfg)
    tensors = load_file(str(out / "model.safetensors"))
    emb = target.model.embed_tokens(ids)
    k = ids.shape[1]
    rope = LlamaRotaryEmbedding(c)(emb, torch.arange(k)[None])
    mask = torch.full((k, k), float("-inf")).triu(1)[None, None]
    if cfg["architectures"] == ["LlamaForCausalLMEagle"]:
        # SGLang's fc has a bias (vLLM's has none and skips fc.bias); layer 0 has no input norm
        ref = nn.ModuleDict({"fc": nn.Linear(2 * c.hidden_size, c.hidden_size),
                             "layers": nn.ModuleList(LlamaDecoderLayer(c, i)
                                                     for i in range(c.num_hidden_layers))})
        ref.layers[0].input_layernorm = nn.Identity()
        ref.load_state_dict(tensors, strict=True)
        x = ref.fc(torch.cat([emb, feats], -1))
        for layer in ref.layers:
            x = layer(x, attention_mask=mask, position_embeddings=rope)
        logits = target.model.lm_head(x)  # the target's head; no final norm
        hot = out / "hot_token_ids.pt"  # SGLang's token map keeps these rows
        return logits[..., torch.load(hot)] if hot.is_file() else logits
    ref = nn.ModuleDict({"fc": nn.Linear(3 * c.hidden_size, c.hidden_size, bias=False),
                         "midlayer": Eagle3MidLayer(c),
                         "norm": LlamaRMSNorm(c.hidden_size, c.rms_norm_eps),
                         "lm_head": nn.Linear(c.hidden_size, cfg["draft_vocab_size"], bias=False)})
    ref.load_state_dict({k: v for k, v in tensors.items() if k not in ("d2t", "t2d")},
                        strict=True)
    mid = ref.midlayer
    h = ref.fc(feats)
    x = torch.cat([mid.input_layernorm(emb), mid.hidden_norm(h)], -1)
    h = h + mid.self_attn(x, rope, mask)[0]  # the residual starts from the feature
    h = h + mid.mlp(mid.post_attention_layernorm(h))
    return ref.lm_head(ref.norm(h))


@pytest.mark.parametrize("fmt", ["eagle", "eagle3"])
def test_export_computes_what_the_engines_compute(target, tmp_path, fmt):
    draft = scylla_draft(target, True) if fmt == "eagle" else eagle3_draft(target, True)
    out = export_draft(draft, tmp_path, fmt)
    ids = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats = draft.features(target.model(ids, hidden_layers=draft.feature_layers))
        ours = draft(ids, feats).logits
    torch.testing.assert_close(ours, engine_logits(out, target, ids, feats), atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# what cannot be exported, and import checks


def test_unexportable_drafts_raise_config_errors_naming_the_field(target, tmp_path):
    with pytest.raises(ConfigError, match="kind='eagle3' cannot be exported as eagle:"):
        export_draft(eagle3_draft(target, False), tmp_path, "eagle")
    with pytest.raises(ConfigError, match="kind='scylla' cannot be exported as eagle3"):
        export_draft(scylla_draft(target, False), tmp_path, "eagle3")
    with pytest.raises(ConfigError, match="format='medusa'"):
        export_draft(scylla_draft(target, False), tmp_path, "medusa")
    with pytest.raises(ConfigError, match="draft_n_layer=2"):
        instantiate(draft_spec("eagle3", 2, target), target)
    own_head = instantiate(draft_spec("scylla", 1, target, head="trained"), target)
    with pytest.raises(ConfigError, match="head='trained': an EAGLE head reads out with"):
        export_draft(own_head, tmp_path, "eagle")
    with pytest.raises(ConfigError, match="DraftConfig.head='trained'"):
        draft_spec("eagle3", 1, target, head="trained")
    biased = scylla_draft(target, False)
    biased.spec = dataclasses.replace(biased.spec, layer_config=dataclasses.replace(
        biased.spec.layer_config, attention_bias=True))
    with pytest.raises(ConfigError, match="layer_config.attention_bias=True"):
        export_draft(biased, tmp_path, "eagle")
    assert not (tmp_path / "config.json").exists()


def test_import_checks_the_target(target, tmp_path):
    out = export_draft(scylla_draft(target, False), tmp_path, "eagle")
    with pytest.raises(DraftMismatchError, match="hidden_size: head has 64, target 32"):
        import_export(out, tiny_target(num_hidden_layers=8, hidden_size=32))
    with pytest.raises(DraftMismatchError, match="exported for target 'tiny'"):
        import_export(out, tiny_target(name="other", num_hidden_layers=8))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(DataError, match="is not an EAGLE head"):
        import_export(out, target)


# ---------------------------------------------------------------------------------------------
# Hugging Face conventions: save_pretrained / from_pretrained and the model card


def test_save_pretrained_round_trip_and_model_card(target, tmp_path):
    draft = scylla_draft(target, True)
    extra = {"train": {"train_tokens": 4096, "seed": 3, "lr": 3e-4}, "ttt_steps": 2,
             "corpus": "sharegpt"}
    save_pretrained(draft, tmp_path, extra=extra, metrics={"val/tau_chain": 1.875}, bench=BENCH)
    assert {p.name for p in tmp_path.iterdir()} == {"draft.json", "draft.safetensors",
                                                     "README.md"}
    back = from_pretrained(tmp_path, target)
    assert isinstance(back, ScyllaDraft)
    assert_same_function(draft, back, target)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: scylla\n")
    for text in ["`tiny`", "`scylla`", "| draft layers | 2 |",
                 f"pruned to {VOCAB} of the target's 256",
                 f"| trainable parameters | {draft.draft_params:,} |", "| `corpus` | sharegpt |",
                 "| `train_tokens` | 4096 |",
                 "| `ttt_steps` | 2 |", "| `val/tau_chain` | 1.875 |",
                 "| category | `plain` | `tree` |", "| coding | 1.00 | 2.50 |",
                 "| **all** | 1.00 | 2.25 |"]:
        assert text in card, text
    assert "## Serving" not in card  # a scylla checkpoint, not an export


def test_served_drafts_save_as_their_export(target, tmp_path):
    draft = import_export(export_draft(scylla_draft(target, True), tmp_path / "x", "eagle"),
                          target)
    save_pretrained(draft, tmp_path / "y")
    assert (tmp_path / "y/config.json").is_file() and not (tmp_path / "y/draft.json").exists()
    back = from_pretrained(tmp_path / "y", target)
    assert isinstance(back, ServedEagleDraft)
    assert_same_function(draft, back, target)
    card = (tmp_path / "y/README.md").read_text()
    assert "--speculative-algorithm EAGLE" in card and '"method": "eagle"' in card


def test_bad_bench_report_is_a_data_error(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"methods": [{"method": "tree"}]}))
    with pytest.raises(DataError, match="not a `scylla bench --json` report"):
        read_bench(tmp_path / "b.json")
    with pytest.raises(DataError, match="cannot read a bench report"):
        read_bench(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_exports_a_training_output(target, tmp_path, capsys):
    save_draft(scylla_draft(target, True), tmp_path / "run" / "draft",
               extra={"train": {"train_tokens": 512}})
    (tmp_path / "run" / "result.json").write_text(json.dumps({"val/tau_chain": 1.5, "steps": 3}))
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    assert main(["export", "--draft", str(tmp_path / "run"), "--format", "eagle", "--out",
                 str(tmp_path / "out"), "--bench", str(tmp_path / "bench.json")]) == 0
    assert "wrote eagle export" in capsys.readouterr().out
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| `val/tau_chain` | 1.5 |" in card and "| **all** | 1.00 | 2.25 |" in card
    assert "--speculative-token-map <this directory>/hot_token_ids.pt" in card
    assert "one layer more than the draft has" in card
    assert isinstance(import_export(tmp_path / "out", target), ServedEagleDraft)


def test_cli_exports_a_trained_eagle3_draft_as_eagle3(target, tmp_path, capsys):
    draft = eagle3_draft(target, True)
    save_draft(draft, tmp_path / "run" / "draft", extra={"train": {"train_tokens": 512}})
    assert main(["export", "--draft", str(tmp_path / "run"), "--format", "eagle3", "--out",
                 str(tmp_path / "out")]) == 0
    assert "wrote eagle3 export" in capsys.readouterr().out
    assert_same_function(draft, import_export(tmp_path / "out", target), target)


def test_cli_errors(target, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--draft", str(tmp_path), "--format", "medusa", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--format: invalid choice: 'medusa'" in capsys.readouterr().err
    assert main(["export", "--draft", str(tmp_path / "nowhere"), "--format", "eagle",
                 "--out", str(tmp_path / "out")]) == 2
    assert "no draft config here" in capsys.readouterr().err
    save_draft(scylla_draft(target, False), tmp_path / "d")
    assert main(["export", "--draft", str(tmp_path / "d"), "--format", "eagle3",
                 "--out", str(tmp_path / "out")]) == 2
    assert "kind='scylla' cannot be exported as eagle3" in capsys.readouterr().err
