"""DraftSpec: everything needed to rebuild a draft, and the target it belongs to.

It is the JSON config written next to a draft's safetensors. ``check_target`` is what makes
loading a draft against the wrong target fail with a clear DraftMismatchError.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from scylla.errors import DraftMismatchError
from scylla.modeling import ModelConfig
from scylla.modeling.targets import TargetInfo


@dataclass(frozen=True)
class DraftSpec:
    kind: str  # "scylla" | "eagle3"
    draft_n_layer: int
    target: TargetInfo
    layer_config: ModelConfig  # the target's config with num_hidden_layers = draft_n_layer
    # HF hidden_states indices the draft consumes; () = the target's post-norm last_hidden
    feature_layers: tuple[int, ...] = ()
    draft_vocab_size: int = 0  # 0: the target's full vocabulary
    # scylla: "target" reads out with the target's frozen rows, "trained" with its own copy
    head: str = "target"
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (training params, data)

    @property
    def vocab_size(self) -> int:
        return self.draft_vocab_size or self.target.vocab_size

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "draft_n_layer": self.draft_n_layer,
                "target": dataclasses.asdict(self.target),
                "layer_config": dataclasses.asdict(self.layer_config),
                "feature_layers": list(self.feature_layers),
                "draft_vocab_size": self.draft_vocab_size, "head": self.head,
                "extra": self.extra}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "DraftSpec":
        return cls(kind=obj["kind"], draft_n_layer=int(obj["draft_n_layer"]),
                   target=TargetInfo(**obj["target"]),
                   layer_config=ModelConfig(**obj["layer_config"]),
                   feature_layers=tuple(obj["feature_layers"]),
                   draft_vocab_size=int(obj["draft_vocab_size"]),
                   head=obj.get("head", "target"),  # drafts saved before the field existed
                   extra=obj.get("extra", {}))

    def check_target(self, target: Any, where: str = "draft") -> None:
        """Raise DraftMismatchError unless ``target`` is the one this draft was built for."""
        have = TargetInfo.of(target)
        diffs = [f"{k}: draft built for {getattr(self.target, k)!r}, target has "
                 f"{getattr(have, k)!r}"
                 for k in ("name", "hidden_size", "vocab_size", "num_hidden_layers")
                 if getattr(self.target, k) != getattr(have, k)]
        if diffs:
            raise DraftMismatchError(f"{where} does not belong to target {have.name!r}: "
                                     + "; ".join(diffs))
