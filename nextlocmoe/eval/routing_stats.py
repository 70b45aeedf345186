"""Routing diagnostics (docs/EXPLAIN.md "Routing balance and diagnostics"), for `explain` and metrics.jsonl.

Per MoE layer: load per expert (share of routed slots; empty threshold slots excluded, nothing padded),
balance = normalised entropy of the mean load (1 = uniform, 0 = one expert), decisiveness = mean per-token
entropy of the router (nats; ln E = uniform), dead experts (no routed slot), min / max load relative to the
fair share 1/E. And the mutual information between the chosen (top-1) expert and a label (the user, for
personas; the venue category, for function experts) with a permutation-test p-value.

Shape legend: T tokens, E experts, K slots, N labelled routing decisions.
"""

from __future__ import annotations

import numpy as np
import torch

from nextlocmoe.model.routing import expert_counts


def layer_stats(probs_TE: np.ndarray, ids_TK: np.ndarray, counts_E: np.ndarray | None = None) -> dict:
    """Diagnostics of one layer from raw routing arrays; ``counts_E`` (e.g. summed over ranks) replaces the
    load counted from ``ids_TK``."""
    E = probs_TE.shape[-1]
    if counts_E is None:
        counts_E = expert_counts(torch.from_numpy(np.asarray(ids_TK, dtype=np.int64)), E).numpy()
    counts = np.asarray(counts_E, dtype=np.float64)
    total = counts.sum()
    load = counts / total if total > 0 else np.zeros(E)
    nz = load[load > 0]
    p = np.asarray(probs_TE, dtype=np.float64)
    tok_ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)
    return {
        "load": load.round(6).tolist(),
        "routed_slots": int(total),
        "balance": float(-(nz * np.log(nz)).sum() / np.log(E)) if E > 1 and total > 0 else None,
        "token_entropy": float(tok_ent.mean()) if len(p) else None,
        "entropy_max": float(np.log(E)),
        "dead_experts": int((counts == 0).sum()),
        "min_load_over_fair": float(load.min() * E),
        "max_load_over_fair": float(load.max() * E),
    }


def torch_layer_stats(probs_TE: torch.Tensor, ids_TK: torch.Tensor, counts_E: torch.Tensor | None) -> dict:
    """``layer_stats`` of torch tensors (detached, on the host)."""
    c = None if counts_E is None else counts_E.detach().float().cpu().numpy()
    return layer_stats(probs_TE.detach().float().cpu().numpy(), ids_TK.detach().cpu().numpy(), c)


def mutual_information(a_N: np.ndarray, b_N: np.ndarray) -> float:
    """Plug-in MI (nats) between two discrete label arrays (non-negative ints) of equal length."""
    a, b = np.asarray(a_N, np.int64), np.asarray(b_N, np.int64)
    if len(a) == 0:
        return 0.0
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    joint = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb).astype(np.float64) / len(a)
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def mi_permutation_test(expert_N: np.ndarray, label_N: np.ndarray, n_perm: int = 999, seed: int = 0) -> dict:
    """MI(expert; label) and its null under random relabelling (labels permuted, ``n_perm`` times):
    p = (1 + #{null >= observed}) / (1 + n_perm). The null mean is the plug-in estimator's bias."""
    expert = np.asarray(expert_N, np.int64)
    _, label = np.unique(np.asarray(label_N), return_inverse=True)
    obs = mutual_information(expert, label)
    rng = np.random.default_rng(seed)
    null = np.array([mutual_information(expert, rng.permutation(label)) for _ in range(n_perm)])
    return {
        "mi_nats": obs,
        "null_mean": float(null.mean()) if n_perm else None,
        "null_p99": float(np.quantile(null, 0.99)) if n_perm else None,
        "p_value": float((1 + (null >= obs).sum()) / (1 + n_perm)),
        "n": int(len(expert)),
        "n_labels": int(label.max() + 1) if len(label) else 0,
        "n_perm": int(n_perm),
    }


def routing_diagnostics(raw: dict, mask_NS: np.ndarray | None, categories_L: np.ndarray | None) -> dict:
    """The explain report's ``routing_diagnostics``: persona layers over the pooled tokens (``mask_NS``)
    with MI(top-1 expert at the last token; user); the function router over every current record with
    MI(top-1 expert; venue category) where the data has categories."""
    out: dict = {"persona": [], "function": None}
    for pr, ids in zip(raw["per_probs"], raw["per_ids"], strict=True):
        st = layer_stats(pr[mask_NS], ids[mask_NS])
        st["mi_user"] = mi_permutation_test(ids[:, -1, 0], raw["user"])
        st["mi_user"]["decision"] = (
            "top-1 expert at the last token (the state the heads read), one per sample"
        )
        out["persona"].append(st)
    if raw.get("sem_probs") is not None:
        sp, si = raw["sem_probs"], raw["sem_ids"]
        st = layer_stats(sp.reshape(-1, sp.shape[-1]), si.reshape(-1, si.shape[-1]))
        if categories_L is not None and any(str(c) for c in categories_L):
            cat_R = np.asarray(categories_L).astype(str)[raw["cur_loc"].reshape(-1)]
            known = cat_R != ""
            st["mi_category"] = mi_permutation_test(si[..., 0].reshape(-1)[known], cat_R[known])
            st["mi_category"]["decision"] = (
                "top-1 function expert of each current record vs its venue category"
            )
        out["function"] = st
    return out
