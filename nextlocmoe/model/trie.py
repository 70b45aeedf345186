"""Prefix trie over the valid code tuples and constrained beam search over code levels (docs/QTMOB.md).

The trie is two tensors, so the search is vectorised over batch and beams: ``children[node, code]`` is the
child node (-1 = no valid continuation) and ``leaf_loc[node]`` the location id at a full-depth node (-1
elsewhere). Node 0 is the root. The search only ever follows ``children >= 0``, so it can only emit tuples
that are in the table; when fewer than ``beam`` tuples are reachable the rest of the list is -1.

Shape legend: B batch, W beams, K largest codebook size (over levels), Lv levels, Nn trie nodes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CodeTrie:
    def __init__(self, codes_NL: torch.Tensor) -> None:
        codes = codes_NL.long().cpu()
        self.levels = int(codes.shape[1])
        self.k = int(codes.max()) + 1
        child: list[list[int]] = [[-1] * self.k]
        leaf: list[int] = [-1]
        for loc, row in enumerate(codes.tolist()):
            node = 0
            for c in row:
                if child[node][c] < 0:
                    child[node][c] = len(child)
                    child.append([-1] * self.k)
                    leaf.append(-1)
                node = child[node][c]
            if leaf[node] >= 0:
                raise ValueError(f"locations {leaf[node]} and {loc} share the code tuple {row}")
            leaf[node] = loc
        self.children = torch.tensor(child, dtype=torch.long)  # [Nn, K]
        self.leaf_loc = torch.tensor(leaf, dtype=torch.long)  # [Nn]

    def lookup(self, tuple_: list[int]) -> int:
        """Location id of a full tuple, -1 if the tuple is not valid."""
        node = 0
        for c in tuple_:
            if not 0 <= c < self.k or self.children[node, c] < 0:
                return -1
            node = int(self.children[node, c])
        return int(self.leaf_loc[node])


LevelLogits = Callable[[int, torch.Tensor], torch.Tensor]  # (level, prefix [B, W, level]) -> [B, W, K]


@torch.no_grad()
def beam_search(
    level_logits: LevelLogits, trie: CodeTrie, batch: int, beam: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constrained beam search: at each level keep the ``beam`` best prefixes by summed log-probability
    (log_softmax over the level's logits, invalid children masked to -inf).

    Returns: loc [B, W] location ids best first (-1 = no more valid tuples), score [B, W] (-inf where -1),
    codes [B, W, Lv] the emitted tuples.
    """
    dev = trie.children.device
    nodes = torch.zeros(batch, 1, dtype=torch.long, device=dev)
    score = torch.zeros(batch, 1, device=dev)
    prefix = torch.zeros(batch, 1, 0, dtype=torch.long, device=dev)
    for lv in range(trie.levels):
        logp = torch.log_softmax(level_logits(lv, prefix).float(), -1)  # [B, W, K]
        logp = torch.nn.functional.pad(logp, (0, trie.k - logp.shape[-1]), value=float("-inf"))
        child = trie.children[nodes.clamp_min(0)]  # [B, W, K]
        ok = (child >= 0) & (nodes >= 0).unsqueeze(-1)
        cand = torch.where(ok, score.unsqueeze(-1) + logp[..., : trie.k], float("-inf"))
        w = cand.shape[1]
        score, flat = cand.reshape(batch, w * trie.k).topk(min(beam, w * trie.k), dim=1)
        parent, code = flat // trie.k, flat % trie.k
        nodes = child.reshape(batch, -1).gather(1, flat)
        nodes = torch.where(torch.isfinite(score), nodes, -1)
        kept = prefix.gather(1, parent.unsqueeze(-1).expand(-1, -1, lv))
        prefix = torch.cat([kept, code.unsqueeze(-1)], -1)
    loc = torch.where(nodes >= 0, trie.leaf_loc[nodes.clamp_min(0)], -1)
    return loc, score, prefix


def beam_ranks(loc_BW: torch.Tensor, target_B: torch.Tensor, num_locations: int) -> torch.Tensor:
    """1-based rank of the target in each beam list; a target outside the beam gets ``num_locations``
    (pessimistic: hit@k for k <= beam is exact, MRR is a lower bound)."""
    hit = loc_BW == target_B.unsqueeze(1)
    pos = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(target_B, num_locations))
    return pos.long()
