"""One table of decoder-model adapters: where the parts of a HF causal LM live and how its linears are grouped.

An `Adapter` names, relative to the `*ForCausalLM` module, the token embeddings, the decoder-layer list, the
final norm, the rotary-embedding module and the LM head, and, relative to one decoder layer, the sequential
groups of prunable linears. Groups run in order and the linears of one group share one input
(`[q, k, v] -> [o] -> [gate, up] -> [down]` for Llama-style blocks), so one Hessian serves a whole group.
It also names the layer's sub-blocks (`Block`: attention, MLP) whose outputs the engine may record once
their linears are final and replay in later passes of the same layer (`rac.engine.replay`).

Which linears are pruned is decided by include/exclude glob patterns (`fnmatch`) matched against full
parameter-free module names such as ``model.layers.3.self_attn.q_proj``. Only decoder-layer linears are
candidates: the LM head and the embeddings are never pruned by this engine.

`capture_layer_call` records the exact positional and keyword arguments one decoder layer is called with
(hidden states, position embeddings, attention mask, position ids, cache flags...) by a forward pre-hook
that raises a sentinel, so nothing after that layer runs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

LLAMA_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)




@dataclass(frozen=True)
class Block:
    """A sub-block of a decoder layer whose output depends only on its input and its own weights.

    `path` is its module path relative to the layer. `tail`: its output linear, when the block returns exactly
    `tail(x)` for the tail's input x (Llama's MLP: `down_proj(act(gate_proj(h)) * up_proj(h))`), so x can be
    recorded once the other linears are final and the output recomputed as tail(x) after the tail is pruned.
    """

    path: str
    tail: str | None = None

    def holds(self, rel: str) -> bool:
        """Whether the module `rel` (relative to the layer) lies inside this block."""
        return rel.startswith(self.path + ".")


ATTENTION_BLOCK = Block("self_attn")
DENSE_BLOCKS = (ATTENTION_BLOCK, Block("mlp", tail="mlp.down_proj"))


# ---- mixture-of-experts rows (rac.models.moe: fused experts <-> per-expert checkpoint matrices) ----
Role = Literal["gate", "up", "down"]
EXPERT = "{e}"  # expert index placeholder in group templates, expanded per layer by rac.models.moe.layer_candidates


@dataclass(frozen=True)
class MoeSpec:
    """Names of a sparse MoE block relative to a decoder layer: module path (transformers 5), checkpoint
    name, the fused experts module, and the per-expert checkpoint names of its gate / up / down linears."""

    block: str = "mlp"
    file_block: str = "mlp"  # Mixtral checkpoints: block_sparse_moe
    experts: str = "experts"
    gate: str = "gate_proj"  # Mixtral: w1, w3, w2
    up: str = "up_proj"
    down: str = "down_proj"

    def expert_name(self, expert: int, role: Role) -> str:
        """Checkpoint name of an expert linear relative to its layer, e.g. ``mlp.experts.3.gate_proj``."""
        return f"{self.file_block}.{self.experts}.{expert}.{getattr(self, role)}"

    def parse(self, rel: str) -> tuple[int, Role] | None:
        """(expert, role) of an expert linear's relative checkpoint name; None for any other linear."""
        head = f"{self.file_block}.{self.experts}."
        index, _, linear = rel[len(head):].partition(".") if rel.startswith(head) else ("", "", "")
        roles: dict[str, Role] = {self.gate: "gate", self.up: "up", self.down: "down"}
        return (int(index), roles[linear]) if index.isdigit() and linear in roles else None

    def module_path(self, rel: str) -> str:
        """Module path of a non-expert checkpoint name (``block_sparse_moe.gate`` -> ``mlp.gate``)."""
        head = self.file_block + "."
        return self.block + "." + rel[len(head):] if rel.startswith(head) else rel


ATTENTION = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
# dense-MLP names first: a MoE model's dense layers (mlp_only_layers, first_k_dense_replace) use them
QWEN3_MOE_GROUPS = (*ATTENTION, ("mlp.gate_proj", "mlp.up_proj", "mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
                    ("mlp.down_proj", "mlp.experts.{e}.down_proj"))
MIXTRAL_GROUPS = (*ATTENTION, ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3"),
                  ("block_sparse_moe.experts.{e}.w2",))
# multi-head latent attention: [q (no q LoRA) | q_a, kv_a] -> [q_b] -> [kv_b] -> [o]; shared experts see every token
DEEPSEEK_V3_GROUPS = (
    ("self_attn.q_proj", "self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
    ("self_attn.kv_b_proj",), ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj", "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj",
     "mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
    ("mlp.down_proj", "mlp.shared_experts.down_proj", "mlp.experts.{e}.down_proj"),
)
# ---- end of the mixture-of-experts rows ----


@dataclass(frozen=True)
class Adapter:
    """Module paths of one decoder-model family (see module docstring)."""

    family: str
    embed: str = "model.embed_tokens"
    layers: str = "model.layers"
    norm: str = "model.norm"
    rotary: str | None = "model.rotary_emb"
    lm_head: str = "lm_head"
    groups: tuple[tuple[str, ...], ...] = LLAMA_GROUPS
    moe: MoeSpec | None = None  # MoE families: names are templates, expanded per layer (rac.models.moe)
    blocks: tuple[Block, ...] = DENSE_BLOCKS  # sub-blocks the engine may replay (rac.engine.replay)

    def layer_prefix(self, index: int) -> str:
        """State-dict prefix of decoder layer `index`, e.g. ``model.layers.3.``."""
        return f"{self.layers}.{index}."

    def linear_names(self) -> list[str]:
        """All linears of one decoder layer, in group order (relative names)."""
        return [name for group in self.groups for name in group]


# model_type (config.json) -> adapter. Mistral is a Llama row.
ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter(family="llama"),
    "mistral": Adapter(family="mistral"),
    "qwen2": Adapter(family="qwen2"),
    "qwen3": Adapter(family="qwen3"),
    # mixture of experts: the router (`mlp.gate`) is in no group, so it is never pruned
    # (their sparse MoE blocks are no `tail` block: only the attention is replayed)
    "qwen3_moe": Adapter(family="qwen3_moe", groups=QWEN3_MOE_GROUPS, moe=MoeSpec(), blocks=(ATTENTION_BLOCK,)),
    "mixtral": Adapter(family="mixtral", groups=MIXTRAL_GROUPS, blocks=(ATTENTION_BLOCK,),
                       moe=MoeSpec(file_block="block_sparse_moe", gate="w1", up="w3", down="w2")),
    "deepseek_v3": Adapter(family="deepseek_v3", groups=DEEPSEEK_V3_GROUPS, moe=MoeSpec(),
                           blocks=(ATTENTION_BLOCK,)),
}

DEFAULT_INCLUDE: tuple[str, ...] = ("*",)
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "*embed_tokens*")


class UnsupportedArchitectureError(ValueError):
    """The model's `model_type` has no row in `ADAPTERS`."""


def get_adapter(model_type: str) -> Adapter:
    """Adapter for a config's `model_type`; raises UnsupportedArchitectureError listing the supported ones."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={model_type!r}; supported: {sorted(ADAPTERS)}"
        ) from None


def select_groups(
    adapter: Adapter,
    n_layers: int,
    include: Sequence[str] = DEFAULT_INCLUDE,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    candidates: Sequence[Sequence[tuple[str, ...]]] | None = None,
) -> list[list[tuple[str, ...]]]:
    """Per layer, per group: the relative names of the linears selected by the glob patterns.

    A linear is selected when its full name (``model.layers.3.mlp.up_proj``) matches some include pattern and
    no exclude pattern. An include pattern that matches no candidate linear raises ValueError naming it.
    `candidates`: per layer, per group, the linears that exist (required for a MoE adapter, whose groups are
    templates: `rac.models.moe.layer_candidates`); default: `adapter.groups` in every layer.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if candidates is None and adapter.moe is not None:
        raise ValueError(f"adapter {adapter.family!r} (mixture of experts) needs the per-layer candidates")
    if candidates is not None and len(candidates) != n_layers:
        raise ValueError(f"candidates cover {len(candidates)} layers, expected {n_layers}")
    used = {pattern: False for pattern in include}
    table: list[list[tuple[str, ...]]] = []
    for layer in range(n_layers):
        prefix = adapter.layer_prefix(layer)
        per_group: list[tuple[str, ...]] = []
        for group in (candidates[layer] if candidates is not None else adapter.groups):
            chosen = []
            for rel in group:
                full = prefix + rel
                hits = [p for p in include if fnmatch.fnmatchcase(full, p)]
                for p in hits:
                    used[p] = True
                if hits and not any(fnmatch.fnmatchcase(full, p) for p in exclude):
                    chosen.append(rel)
            per_group.append(tuple(chosen))
        table.append(per_group)
    unused = [p for p, hit in used.items() if not hit]
    if unused:
        example = adapter.layer_prefix(0) + adapter.groups[0][0]
        raise ValueError(f"include pattern(s) {unused} match no prunable linear (names look like {example!r})")
    return table


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """`root.get_submodule(path)` with a ValueError naming the missing path."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        raise ValueError(f"module {path!r} not found in {type(root).__name__}") from None


def decoder_layers(model: nn.Module, adapter: Adapter) -> nn.ModuleList:
    """The model's decoder-layer list."""
    layers = get_submodule(model, adapter.layers)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{adapter.layers!r} is a {type(layers).__name__}, expected nn.ModuleList")
    return layers


class _Captured(Exception):
    """Sentinel raised by the capture pre-hook to stop the forward."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__("layer call captured")
        self.args = args
        self.kwargs = kwargs


class _PassThrough(nn.Module):
    """Stands in for a decoder layer before the captured one: returns its hidden states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def _swapped_layers(layers: nn.ModuleList, upto: int) -> Iterator[None]:
    """Temporarily replace layers[0:upto] by pass-through modules (their weights may be on meta)."""
    saved = [layers[i] for i in range(upto)]
    try:
        for i in range(upto):
            layers[i] = _PassThrough()
        yield
    finally:
        for i, module in enumerate(saved):
            layers[i] = module


def capture_layer_call(
    model: nn.Module, adapter: Adapter, layer: int, **model_inputs: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run `model(**model_inputs)` until decoder layer `layer` is called; return its (hidden_states, kwargs).

    Layers before `layer` are bypassed (pass-through), so for `layer > 0` only the keyword arguments are
    meaningful (they depend on the input shape and the layer's attention type, not on hidden values).
    `kwargs` holds every keyword argument of the call except `hidden_states` itself.
    """
    layers = decoder_layers(model, adapter)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range [0, {len(layers)})")

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Captured(args, kwargs)

    handle = layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _swapped_layers(layers, layer), torch.no_grad():
            model(**model_inputs)
    except _Captured as cap:
        kwargs = dict(cap.kwargs)
        hidden = cap.args[0] if cap.args else kwargs.pop("hidden_states")
        if len(cap.args) > 1:
            raise ValueError(f"decoder layer {layer} got {len(cap.args)} positional args; expected 1") from None
        return hidden, kwargs
    finally:
        handle.remove()
    raise ValueError(f"decoder layer {layer} was never called by {type(model).__name__}.forward")
