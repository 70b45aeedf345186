"""The whole NextLocMoE model (single device): record embedding -> TCN history encoder -> Location-Semantics
MoE on the current window -> [prompt ; history ; current] through a frozen Llama-family decoder whose upper
FFNs are Personalized MoEs -> coordinate, duration and candidate-scoring heads.

Returns predictions and an explicit ``ModelAux`` (routing outputs of both MoE levels); the loss is
assembled in ``loss.py`` only. Construction reads no file and runs no text encoder: the decoder, the prompt
ids, the text semantics and the QT-Mob codes come in as ``Pretrained`` parts (model/build.py loads them;
a checkpoint rebuild gets zero text placeholders that the checkpoint's buffers and parameters replace).

Shape legend: B batch, H history records, C current records, Pn prompt tokens, S = Pn + H + C,
R = d_rec, L = d_loc, D = d_model, Nl known locations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nextlocmoe.batch_keys import POINTER_KEYS
from nextlocmoe.config import ModelConfig
from nextlocmoe.model.backbone import swap_ffns
from nextlocmoe.model.candidates import retrieval_tables
from nextlocmoe.model.embedding import HistoryEncoder, RecordEmbedding
from nextlocmoe.model.heads import PointHeads, ScoredHead
from nextlocmoe.model.layout import sequence_mask
from nextlocmoe.model.novelty import novelty_settings
from nextlocmoe.model.personal_moe import PersonalMoE, RoutingContext
from nextlocmoe.model.pointer import PointerScoredHead
from nextlocmoe.model.qtmob import QTMob
from nextlocmoe.model.retrieval import RetrievalPointerHead
from nextlocmoe.model.routing import RoutingAux, combine_weights_TE
from nextlocmoe.model.semantic_moe import SemanticMoE, time_prior_table

MODEL_INPUTS = (
    "hist_xy", "hist_weekday", "hist_hour", "hist_dur", "hist_mask",
    "cur_xy", "cur_weekday", "cur_hour", "cur_dur", "hist_loc", "cur_loc",
)  # fmt: skip
POINTER_INPUTS = POINTER_KEYS  # the pointer window and query time (batch_keys.py)


@dataclass
class DataInfo:
    """What the model needs from the prepared data set (location table, normalisation)."""

    loc_xy_norm: torch.Tensor  # [Nl, 2] normalised coordinates of every known location
    xy_std_m: float  # metres per normalised unit
    x_mean: float = 0.0
    y_mean: float = 0.0
    # record columns loc/user/hour/weekday/split of the prepared data set: the train-split counts of the
    # exploration head (model/novelty.py); None gives zero counts (filled when a checkpoint is loaded)
    records: dict | None = None

    @property
    def num_locations(self) -> int:
        return int(self.loc_xy_norm.shape[0])


@dataclass
class Pretrained:
    """What a model is built from besides its config: loaded by ``model/build.py`` (the only I/O)."""

    decoder: nn.Module  # Llama-family decoder, truncated and frozen (backbone.load_backbone)
    prompt_ids: torch.Tensor  # [Pn] token ids of the task prompt
    category_EP: torch.Tensor  # [Es, P] function-category text embeddings (seed the semantic experts)
    persona_EP: torch.Tensor  # [E, P] persona text embeddings (the persona routers' fixed term)
    slot_NP: torch.Tensor | None = None  # [168, P] visit-time slot texts (semantic time prior) or None
    codes: torch.Tensor | None = None  # [Nl, Lv] QT-Mob location codes or None
    location_transfer: str | None = None  # set by io.load_run for a foreign location table


@dataclass
class Predictions:
    xy: torch.Tensor  # [B, 2] normalised coordinates
    dur: torch.Tensor  # [B] normalised duration
    scores: torch.Tensor | None  # [B, Nl] candidate scores (scored head) or None
    code_logits: torch.Tensor | None = None  # [B, Lv, K] teacher-forced QT-Mob code logits (training loss)
    code_targets: torch.Tensor | None = None  # [B, Lv] the target's codes
    hidden: torch.Tensor | None = None  # [B, D] last hidden state (QT-Mob beam search at evaluation)
    cand: torch.Tensor | None = None  # [B, C] place ids of `scores` (retrieval head; -1 = none), None: all


@dataclass
class ModelAux:
    semantic: RoutingAux | None
    personal: list[RoutingAux] = field(default_factory=list)  # one per personalized MoE layer, in order
    focus: int = 0  # persona balancing acts on the last `focus` positions of each sequence; 0 = all tokens

    def balanced(self) -> list[RoutingAux]:
        """The persona routing that balancing (selection bias and ``loss.balance_weight``) acts on: the
        current-window positions of every sequence (``personal_moe.balance_scope=current``), or all."""
        return [a.tail(self.focus) for a in self.personal] if self.focus else self.personal


class NextLocMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, info: DataInfo, pre: Pretrained) -> None:
        super().__init__()
        self.cfg = cfg
        ec = cfg.embed
        self.decoder = pre.decoder
        d_model = self.decoder.config.hidden_size
        self.rec = RecordEmbedding(ec)
        self.history = HistoryEncoder(ec.d_rec, ec.tcn_levels, ec.tcn_kernel)
        sm = cfg.semantic_moe
        prior_NE = None
        if sm.enabled and sm.time_prior > 0 and pre.slot_NP is not None:
            prior_NE = sm.time_prior * time_prior_table(pre.slot_NP, pre.category_EP)
        self.semantic = (
            SemanticMoE(pre.category_EP, ec.d_loc, ec.d_rec, sm.router_hidden, sm.top_k, prior_NE)
            if sm.enabled
            else None
        )
        self.routing = RoutingContext()  # this model's per-forward routing scope (personal_moe.py)
        seed = cfg.backbone.seed
        swap_ffns(
            self.decoder,
            cfg.moe_layers(),
            lambda mlp, i: PersonalMoE(
                mlp, cfg.personal_moe, pre.persona_EP, ec.d_rec, i, self.routing, seed
            ),
        )
        self.register_buffer("prompt_ids", pre.prompt_ids.long().clone(), persistent=False)
        self.proj_hist = nn.Linear(ec.d_rec, d_model)
        self.proj_cur = nn.Linear(ec.d_rec, d_model)
        self.bypass = nn.Linear(2 * ec.d_rec, d_model) if cfg.backbone.bypass else None
        self.heads = PointHeads(d_model)
        hc = cfg.heads
        self.scored: nn.Module | None = None
        n_fn = self.semantic.num_experts if self.semantic is not None else 0
        if hc.pointer and hc.retrieval:
            tables = retrieval_tables(info.loc_xy_norm.numpy(), info.records, hc.retrieval_near,
                                      hc.retrieval_successors, hc.retrieval_popular)  # fmt: skip
            self.scored = RetrievalPointerHead(
                d_model, info.loc_xy_norm, tables, hc.pointer_hidden, cfg.personal_moe.num_experts, n_fn,
                info.xy_std_m, hc.query_time, hc.retrieval_in_batch,
            )  # fmt: skip
        elif hc.pointer:
            self.scored = PointerScoredHead(
                d_model, info.loc_xy_norm, hc.d_loc_emb, hc.pointer_hidden, cfg.personal_moe.num_experts,
                n_fn, info.xy_std_m, hc.query_time, novelty_settings(hc, info),
            )  # fmt: skip
        elif hc.scored:
            self.scored = ScoredHead(d_model, info.loc_xy_norm, hc.d_loc_emb)
        tk = cfg.tokens  # QT-Mob (docs/QTMOB.md), off by default
        self.qtmob = QTMob(cfg, pre.codes, d_model) if tk.enabled or tk.gen_head or tk.recovery else None
        self.location_transfer = pre.location_transfer

    @property
    def pointer_window(self) -> int:
        """P records the data pipeline must provide as the pointer window (0: no pointer head)."""
        return self.cfg.pointer_window

    @property
    def input_names(self) -> tuple[str, ...]:
        """The batch keys this model reads (engine inputs, in this order)."""
        return MODEL_INPUTS + (POINTER_INPUTS if self.cfg.heads.pointer else ())

    def routing_mix(self, sink: list[RoutingAux], sem: RoutingAux | None, B: int) -> tuple[torch.Tensor, ...]:
        """Routing weights that condition the pointer: persona pi [B, E] = the selected (combine) weights
        of the last token, mean over personalized MoE layers; function omega [B, Es] = those of the last
        current record (zeros [B, 1] without a semantic MoE)."""
        E = self.cfg.personal_moe.num_experts
        pis = [combine_weights_TE(a.ids_TK, a.w_TK.float(), E).view(B, -1, E)[:, -1] for a in sink]
        pi = torch.stack(pis).mean(0) if pis else self.heads.xy.weight.new_zeros(B, E)
        if sem is None:
            return pi, pi.new_zeros(B, 1)
        Es = sem.probs_TE.shape[-1]
        return pi, combine_weights_TE(sem.ids_TK, sem.w_TK.float(), Es).view(B, -1, Es)[:, -1]

    def balance_step(self, auxes: list[ModelAux], reduce=None) -> dict[str, list[torch.Tensor]]:
        """Auxiliary-loss-free balancing after an optimizer step (model/balance.py): every router's selection
        bias moves against the load it routed in the step's micro-batches ``auxes``; ``reduce`` sums counts
        over ranks. Returns the counts {"personal": [E] per layer, "semantic": [[Es]]} (empty lists when a
        level's rate is 0)."""
        from nextlocmoe.model.balance import balance_routers

        out: dict[str, list[torch.Tensor]] = {"personal": [], "semantic": []}
        rate_p = self.cfg.personal_moe.balance_rate
        if rate_p > 0 and auxes and auxes[0].personal:  # (no personal aux: backbone bypassed)
            layers = self.moe_layers()
            focus = [a.balanced() for a in auxes]
            pairs = [(m.router.sel_bias_E, [f[i] for f in focus]) for i, m in enumerate(layers)]
            out["personal"] = balance_routers(pairs, rate_p, reduce)
        rate_s = self.cfg.semantic_moe.balance_rate
        if rate_s > 0 and self.semantic is not None and auxes and auxes[0].semantic is not None:
            pair = (self.semantic.router.sel_bias_E, [a.semantic for a in auxes])
            out["semantic"] = balance_routers([pair], rate_s, reduce)
        return out

    def moe_layers(self) -> list[PersonalMoE]:
        """The personalized MoE layers, in layer order (whatever their dispatcher)."""
        return [m for m in self.decoder.modules() if isinstance(m, PersonalMoE)]

    def encode_current(
        self, batch: dict[str, torch.Tensor], h_BR: torch.Tensor
    ) -> tuple[torch.Tensor, RoutingAux | None]:
        """Current-window record embeddings [B, C, R] with the semantic-MoE-enhanced location part."""
        xy, wd, hr, du = (batch[k] for k in ("cur_xy", "cur_weekday", "cur_hour", "cur_dur"))
        rec_BCR = self.rec(xy, wd, hr, du)
        if self.qtmob is not None:
            rec_BCR = self.qtmob.inputs(rec_BCR, batch["cur_loc"], batch.get("cur_masked"))
        if self.semantic is None:
            return rec_BCR, None
        B, C, R = rec_BCR.shape
        d_loc = self.cfg.embed.d_loc
        ctx = torch.cat([h_BR.unsqueeze(1).expand(B, C, R), rec_BCR], -1).reshape(B * C, 2 * R)
        base = rec_BCR[..., :d_loc].reshape(B * C, d_loc)
        slot = (wd.long() * 24 + hr.long()).reshape(B * C)  # the time prior's index (semantic_moe.py)
        enh, aux = self.semantic(xy.reshape(B * C, 2), base, ctx, slot)
        return torch.cat([enh.view(B, C, d_loc), rec_BCR[..., d_loc:]], -1), aux

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[Predictions, ModelAux]:
        rec_hist = self.rec(batch["hist_xy"], batch["hist_weekday"], batch["hist_hour"], batch["hist_dur"])
        if self.qtmob is not None:
            rec_hist = self.qtmob.inputs(rec_hist, batch["hist_loc"])
        h_BR = self.history(rec_hist, batch["hist_mask"])
        rec_cur, sem_aux = self.encode_current(batch, h_BR)
        B, H = batch["hist_mask"].shape
        C = rec_cur.shape[1]
        prompt = self.decoder.embed_tokens(self.prompt_ids)  # [Pn, D], frozen
        Pn = prompt.shape[0]
        x_BSD = torch.cat(
            [prompt.unsqueeze(0).expand(B, -1, -1).to(rec_hist.dtype), self.proj_hist(rec_hist),
             self.proj_cur(rec_cur)], dim=1,
        )  # fmt: skip
        mask_BS = sequence_mask(batch["hist_mask"], Pn, C).long()
        if self.bypass is not None:  # ablation: no decoder, no personalized MoE
            return self.predict(torch.nn.functional.gelu(self.bypass(torch.cat([h_BR, rec_cur[:, -1]], -1))),
                                batch, [], sem_aux)  # fmt: skip
        with self.routing.scope(h_BR) as records:
            hidden = self.decoder(inputs_embeds=x_BSD, attention_mask=mask_BS).last_hidden_state
        assert len(records) == len(self.moe_layers()) and H + C + Pn == x_BSD.shape[1]
        return self.predict(hidden[:, -1], batch, records, sem_aux)

    def predict(
        self, h_last: torch.Tensor, batch: dict[str, torch.Tensor], sink: list[RoutingAux], sem_aux
    ) -> tuple[Predictions, ModelAux]:
        """Heads on the last hidden state h_last [B, D]; the routing of both levels conditions the pointer."""
        B = h_last.shape[0]
        xy, dur = self.heads(h_last)
        scores = cand = None
        if isinstance(self.scored, RetrievalPointerHead):
            scores, cand = self.scored(h_last, xy, batch, *self.routing_mix(sink, sem_aux, B))
        elif isinstance(self.scored, PointerScoredHead):
            pi, om = self.routing_mix(sink, sem_aux, B)
            scores = self.scored(h_last, xy, batch, pi, om)
        elif self.scored is not None:
            scores = self.scored(h_last, xy, batch["hist_loc"], batch["cur_loc"])
        code_logits = code_targets = None
        if self.qtmob is not None and self.qtmob.head is not None and "target_loc" in batch:
            code_logits, code_targets = self.qtmob.code_logits(h_last, batch["target_loc"])
        focus = batch["cur_xy"].shape[1] if self.cfg.personal_moe.balance_scope == "current" else 0
        preds = Predictions(xy, dur, scores, code_logits, code_targets, h_last, cand)
        return preds, ModelAux(sem_aux, sink, focus)
