"""The one typed config tree: dataclasses, loaded from YAML, overridable with ``section.key=value``.

Every field is validated in ``__post_init__`` so a bad value fails at start-up with the field's dotted name,
not deep inside a training step. ``save_config`` writes the resolved tree next to each run.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the field."""


# The one vocabulary of personalized-expert compute strategies (model/experts.py), config to export.
EXPERT_COMPUTE = ("grouped", "masked", "folded", "reference")
EXPERT_COMPUTE_ALIASES = {"dense": "masked", "static": "masked", "shared": "masked", "naive": "reference"}
# Keys that older config files / run folders may still carry; nothing read them, so they are dropped.
REMOVED_KEYS = ("model.flavour", "data.num_workers")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class DataConfig:
    dir: str = "demo-out/data"  # a `nextlocmoe prepare` output folder
    batch_size: int = 32  # micro-batch per rank
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size must be >= 1")
        _check(self.eval_batch_size >= 1, "data.eval_batch_size must be >= 1")


@dataclass
class BackboneConfig:
    """A Llama-family decoder: a local HF checkpoint (``path``) or, with ``path: null``, a tiny random one."""

    path: str | None = None
    num_layers: int = 12  # truncate the loaded decoder to its first L layers
    freeze: bool = True  # token embeddings, attention and original FFN weights stay frozen
    # Ablation (docs/MODEL_QUALITY.md): heads on the history encoder only, the decoder (and with it the
    # personalized MoE) is not run: h = gelu(Linear([h_hist ; last current record]))
    bypass: bool = False
    # Used only when path is null (debug / mid flavours built in code):
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.num_layers >= 1, "model.backbone.num_layers must be >= 1")
        _check(self.hidden_size % self.num_heads == 0, "model.backbone.hidden_size % num_heads must be 0")
        _check(self.num_heads % self.num_kv_heads == 0, "model.backbone.num_heads % num_kv_heads must be 0")


@dataclass
class EmbedConfig:
    d_loc: int = 128
    d_weekday: int = 16
    d_hour: int = 16
    d_dur: int = 16
    tcn_levels: int = 5
    tcn_kernel: int = 2

    @property
    def d_rec(self) -> int:
        return self.d_loc + self.d_weekday + self.d_hour + self.d_dur


@dataclass
class SemanticMoEConfig:
    """Level 1: the Location-Semantics MoE (5 function experts, history-conditioned router)."""

    enabled: bool = True
    top_k: int = 2
    router_hidden: int = 128
    balance_rate: float = 0.0  # auxiliary-loss-free balancing bias step (model/balance.py); 0 = off
    # scale of the text-derived time-of-visit prior added to the router's logits (semantic_moe.py
    # ``time_prior_table``: similarity of a visit time's description to each category's text); 0 = off
    time_prior: float = 0.0

    def __post_init__(self) -> None:
        _check(1 <= self.top_k <= 5, "model.semantic_moe.top_k must be in 1..5 (5 function experts)")
        _check(self.balance_rate >= 0 and self.time_prior >= 0, "model.semantic_moe: rates must be >= 0")


@dataclass
class PersonalMoEConfig:
    """Level 2: persona experts (frozen FFN + LoRA) from ``start_layer`` every ``every`` layers."""

    num_experts: int = 11
    start_layer: int = 8  # L_frozen
    every: int = 2
    lora_r: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.02
    routing: str = "topk"  # "topk" | "threshold"
    top_k: int = 2
    tau: float = 0.8  # threshold (top-p) mass
    k_max: int = 5  # cap on experts per token under threshold routing
    renormalize: bool = False  # reference: selected probabilities are not renormalised
    router_hidden: int = 256
    # expert compute strategy in training (model/experts.py): grouped (sorted pairs) | masked (static shapes)
    # | reference (per-expert loop); older names dense/static -> masked, naive -> reference
    compute: str = "grouped"
    balance_rate: float = 0.0  # auxiliary-loss-free balancing bias step (model/balance.py); 0 = off
    # which routing the bias and loss.balance_weight balance: "current" = each current-window position
    # across the batch (routing must depend on the sample), "tokens" = all tokens pooled
    balance_scope: str = "current"

    def __post_init__(self) -> None:
        _check(self.num_experts >= 1, "model.personal_moe.num_experts must be >= 1")
        _check(self.balance_rate >= 0, "model.personal_moe.balance_rate must be >= 0")
        scopes = ("current", "tokens")
        _check(self.balance_scope in scopes, "model.personal_moe.balance_scope must be current|tokens")
        _check(self.routing in ("topk", "threshold"), "model.personal_moe.routing must be topk|threshold")
        _check(1 <= self.top_k <= self.num_experts, "model.personal_moe.top_k must be in 1..num_experts")
        _check(1 <= self.k_max <= self.num_experts, "model.personal_moe.k_max must be in 1..num_experts")
        _check(0.0 < self.tau <= 1.0, "model.personal_moe.tau must be in (0, 1]")
        _check(self.every >= 1 and self.start_layer >= 0, "model.personal_moe.every/start_layer invalid")
        self.compute = EXPERT_COMPUTE_ALIASES.get(self.compute, self.compute)
        ok = self.compute in EXPERT_COMPUTE and self.compute != "folded"  # folded: inference form only
        _check(ok, "model.personal_moe.compute must be grouped|masked|reference")
        _check(self.lora_r >= 1, "model.personal_moe.lora_r must be >= 1")

    @property
    def slots(self) -> int:
        """K: routing slots per token (top_k, or k_max under threshold routing)."""
        return self.top_k if self.routing == "topk" else self.k_max


@dataclass
class HeadsConfig:
    scored: bool = True  # candidate-scoring head over the location table (MODEL.md "ranking heads")
    d_loc_emb: int = 64
    ranking: str = "scored"  # which ranking `evaluate` reports as the headline: point | scored | codes
    # History identity (docs/MODEL_QUALITY.md): the scored head becomes a copy-vs-explore mixture of a
    # pointer over the sample's last `pointer_window` records (id-free slot features, persona- and
    # function-routed slot scoring) and a generator over the location table.
    pointer: bool = False
    pointer_window: int = 256  # P: records right before the target the pointer can copy from
    pointer_hidden: int = 32
    query_time: bool = True  # the target's weekday/hour/gap is an input (its location never is)
    # Exploration (issue 23, model/novelty.py): the explore part of the mixture becomes a distribution over
    # the places NOT in the pointer window only, scored from id-free candidate features (distances, the
    # train split's visit and transition counts) with persona- and function-routed weights; the gate is
    # then P(repeat). `novelty_transitions`: successors kept per place from the train-split transitions.
    novelty: bool = False
    novelty_hidden: int = 16  # per-candidate MLP width; 0 = the routed linear score only (cheaper)
    novelty_transitions: int = 32
    # co-visitation (model/novelty.py covis_BL): the places sharing the most train-split users with each
    # place, kept per place; 0 = off. Candidates co-visited with the window's places score higher.
    novelty_covisit: int = 0
    # Candidate retrieval, then scoring (issue 20, docs/SCALE.md, model/candidates.py): the pointer head
    # scores each sample's pointer window + `retrieval_near` places nearest the current one + its
    # `retrieval_successors` most frequent train-split successors + the `retrieval_popular` most visited
    # places (static width), with an id-free generator (no per-place parameters), trained as a sampled
    # softmax (+ the micro-batch's targets as negatives with `retrieval_in_batch`). Off: every place.
    retrieval: bool = False
    retrieval_near: int = 64
    retrieval_successors: int = 32
    retrieval_popular: int = 32
    retrieval_in_batch: bool = True

    def __post_init__(self) -> None:
        _check(self.ranking in ("point", "scored", "codes"), "model.heads.ranking must be point|scored|codes")
        _check(self.scored or self.ranking == "point", "model.heads.ranking=scored needs heads.scored=true")
        _check(not self.pointer or self.scored, "model.heads.pointer=true needs heads.scored=true")
        _check(self.pointer_window >= 1, "model.heads.pointer_window must be >= 1")
        _check(self.pointer_hidden >= 1, "model.heads.pointer_hidden must be >= 1")
        _check(not self.novelty or self.pointer, "model.heads.novelty=true needs heads.pointer=true")
        _check(self.novelty_hidden >= 0, "model.heads.novelty_hidden must be >= 0")
        _check(self.novelty_transitions >= 1, "model.heads.novelty_transitions must be >= 1")
        _check(self.novelty_covisit >= 0, "model.heads.novelty_covisit must be >= 0")
        _check(not self.retrieval or self.pointer, "model.heads.retrieval=true needs heads.pointer=true")
        _check(not (self.retrieval and self.novelty), "model.heads.retrieval and heads.novelty: choose one")
        _check(self.retrieval_near >= 1, "model.heads.retrieval_near must be >= 1")
        _check(min(self.retrieval_successors, self.retrieval_popular) >= 0,
               "model.heads.retrieval_successors and retrieval_popular must be >= 0")  # fmt: skip


@dataclass
class TokensConfig:
    """QT-Mob (docs/QTMOB.md): semantic location codes as inputs, a code-generation head, mobility recovery.
    All off by default."""

    enabled: bool = False  # code embeddings (one Embedding per level, summed) added to each record's location
    codes_path: str = ""  # `nextlocmoe tokenize` output ('' = <data.dir>/location_codes.json)
    d_code: int = 0  # code embedding / code-head width (0 = embed.d_loc)
    gen_head: bool = False  # generative head over code levels -> ranking `codes` (trie beam search)
    beam: int = 20  # beam width of the constrained decoding (ranks beyond it count as L)
    recovery: bool = False  # learned mask embedding for masked records (mobility recovery)
    recovery_masks: int = 1  # records masked per recovery training sample (the first is the target)

    def __post_init__(self) -> None:
        _check(self.d_code >= 0 and self.beam >= 1, "model.tokens.d_code must be >= 0, beam >= 1")
        _check(self.recovery_masks >= 1, "model.tokens.recovery_masks must be >= 1")


@dataclass
class ModelConfig:
    text_encoder: str = "auto"  # auto | backbone | minilm
    prompt: str = (
        "Task: predict the next location of a user from their long-term history and current trajectory."
    )
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    semantic_moe: SemanticMoEConfig = field(default_factory=SemanticMoEConfig)
    personal_moe: PersonalMoEConfig = field(default_factory=PersonalMoEConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)

    def __post_init__(self) -> None:
        ok = self.heads.ranking != "codes" or self.tokens.gen_head
        _check(ok, "model.heads.ranking=codes needs model.tokens.gen_head")
        _check(
            self.text_encoder in ("auto", "backbone", "minilm"), "model.text_encoder: auto|backbone|minilm"
        )
        pm, nl = self.personal_moe, self.backbone.num_layers
        _check(pm.start_layer < nl, f"model.personal_moe.start_layer {pm.start_layer} >= num_layers {nl}")

    @property
    def pointer_window(self) -> int:
        """P records of the pointer window the data pipeline must provide (0: no pointer head)."""
        return self.heads.pointer_window if self.heads.pointer else 0

    def moe_layers(self) -> list[int]:
        """Decoder layer indices whose FFN becomes a personalized MoE."""
        pm = self.personal_moe
        return list(range(pm.start_layer, self.backbone.num_layers, pm.every))


@dataclass
class LossConfig:
    entropy_weight: float = 300.0  # lambda (reference); distance loss is in metres
    duration_weight: float = 0.0
    aux_weight: float = 0.0  # load-balancing loss from the expert-parallel layer
    balance_weight: float = 0.0  # persona routers: ln E - H(batch-mean probs) (routing.marginal_imbalance)
    semantic_balance_weight: float = 0.0  # the same for the function router
    semantic_entropy_weight: float = 0.0  # per-record entropy of the function router (decisiveness)
    scored_weight: float = 1000.0  # cross-entropy of the candidate-scoring head (metre-scaled)
    codes_weight: float = 1000.0  # QT-Mob code head: mean per-level cross-entropy (only with tokens.gen_head)
    next_weight: float = 1.0  # next-location samples' share when recovery_weight > 0
    recovery_weight: float = 0.0  # mobility-recovery objective (needs model.tokens.recovery); 0 = off

    def __post_init__(self) -> None:
        weights = ("entropy_weight", "duration_weight", "aux_weight", "scored_weight", "codes_weight",
                   "balance_weight", "semantic_balance_weight", "semantic_entropy_weight")  # fmt: skip
        for k in (*weights, "next_weight", "recovery_weight"):
            _check(getattr(self, k) >= 0, f"loss.{k} must be >= 0")


@dataclass
class TrainConfig:
    name: str = "debug"
    out_dir: str = "runs"
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    grad_accum: int = 1
    precision: str = "fp32"  # fp32 | bf16
    ep_size: int = 1
    zero_stage: int = 2
    log_every: int = 10
    ckpt_every: int = 100
    max_eval_samples: int = 0  # 0 = all
    init_from: str = ""  # run or checkpoint folder: start from its weights (any ep_size), not a resume
    # How the personalized MoE is parallelised (docs/TRAINING.md): "expert" = DeepSpeed-MoE expert
    # parallelism (ep_size ranks share the experts); "replicated" = every rank holds all LoRA experts,
    # plain data parallel + ZeRO (0-3), the single-device shared-base compute.
    moe_parallel: str = "expert"
    capacity_factor: float = 0.0  # expert mode: 0 = no token dropping; c > 0: capacity ceil(c*T*K/E)
    # metrics.jsonl "mfu": achieved model FLOP/s over (world size x this per-device peak, TFLOP/s, of the
    # precision trained in: e.g. 989 for H100 SXM bf16 dense). 0 = unknown: mfu is logged as null.
    peak_tflops: float = 0.0
    dist_timeout_s: float = 600.0  # collective timeout of the process group (s)

    def __post_init__(self) -> None:
        _check(self.steps >= 1, "train.steps must be >= 1")
        _check(self.precision in ("fp32", "bf16"), "train.precision must be fp32|bf16")
        _check(self.ep_size >= 1, "train.ep_size must be >= 1")
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0..3")
        _check(self.grad_accum >= 1, "train.grad_accum must be >= 1")
        mp = self.moe_parallel
        _check(mp in ("expert", "replicated"), "train.moe_parallel must be expert|replicated")
        _check(mp == "expert" or self.ep_size == 1, "train.moe_parallel=replicated needs train.ep_size=1")
        _check(self.capacity_factor >= 0, "train.capacity_factor must be >= 0")
        _check(self.peak_tflops >= 0, "train.peak_tflops must be >= 0 (0 = unknown)")
        _check(self.dist_timeout_s > 0, "train.dist_timeout_s must be > 0")
        ok = mp == "expert" or self.capacity_factor == 0
        _check(ok, "train.capacity_factor applies to train.moe_parallel=expert only")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        e, ep = self.model.personal_moe.num_experts, self.train.ep_size
        _check(e % ep == 0, f"model.personal_moe.num_experts ({e}) must be divisible by train.ep_size ({ep})")
        tk = self.model.tokens
        if (tk.enabled or tk.gen_head) and not tk.codes_path:  # resolved, so the saved run config names it
            tk.codes_path = str(Path(self.data.dir) / "location_codes.json")
        ok = self.loss.recovery_weight == 0 or tk.recovery
        _check(ok, "loss.recovery_weight > 0 needs model.tokens.recovery")


# ----------------------------------------------------------------------------------------------------------
# Loading, overrides, saving


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclasses.dataclass(frozen=True)
class _Cli:
    """A command-line override: its text and its YAML reading (a str field takes the text as typed, so
    ``train.name=off`` is the name "off", not YAML's boolean False)."""

    raw: str
    parsed: Any


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the annotated type ``tp`` (str, int, float, bool, Optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(value, _Cli) and value.parsed is None:
            return None
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        return _coerce(value, args[0], name)
    if isinstance(value, _Cli):
        value = value.raw if tp is str else value.parsed
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads off/no/yes/on unquoted as booleans
        raise ConfigError(f"{name}: expected a string, got the boolean {value!r} (quote the value in YAML)")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    if tp in (int, float, str):
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if isinstance(data, _Cli):
        data = data.parsed
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = {k for k in set(data) - known if prefix + k not in REMOVED_KEYS}
    data = {k: v for k, v in data.items() if prefix + k not in REMOVED_KEYS}
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, raw: str) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p} is not a section")
    try:
        node[parts[-1]] = _Cli(raw, yaml.safe_load(raw) if raw != "" else "")
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}={raw!r}: not a YAML value ({' '.join(str(e).split())})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or defaults), apply ``section.key=value`` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like section.key=value")
        key, raw = ov.split("=", 1)
        _set_dotted(tree, key.strip(), raw.strip())
    return _build(Config, tree, "")


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree, "")
