"""Routing explanations (MODEL.md "Interpretability"; docs/EXPLAIN.md): which persona experts (Personalized
MoE, per layer) and which function experts (Location-Semantics MoE) carry the weight, per user and overall,
and whether function routing agrees with true venue categories.

Two halves: ``collect_routing`` runs the single-device model and keeps the RAW routing outputs
(``RoutingAux.probs_TE / ids_TK / w_TK`` reshaped per sample); everything else is pure numpy over those
arrays (``mix_stats``, ``sample_mixes``, ``user_stability``, ``function_by_hour``, ``category_agreement``,
``summarise``), so a test can recompute every reported number from the raw arrays.

Shape legend: N samples, S = Pn + H + C token positions, C current records, E experts, K slots.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from nextlocmoe.data.store import TrajectoryDataset, collate, eval_subset, load_locations, load_manifest
from nextlocmoe.eval.routing_stats import routing_diagnostics
from nextlocmoe.model import text
from nextlocmoe.model.layout import prompt_len, sequence_mask
from nextlocmoe.model.routing import expert_counts

FUNCTION_NAMES = tuple(text.FUNCTION_CATEGORIES)  # expert e of the semantic MoE was initialised from name e
POOLS = {
    "current": "the C current-window token positions of every sample (the records the semantic MoE routes)",
    "valid": "every real token of a sample: the prompt, the unpadded history records and the current window",
    "last": "the last token position only (the hidden state the prediction heads read)",
}

# The 10 Foursquare top-level categories of fsq-nyc-categories -> the 5 function experts.
CATEGORY_TO_FUNCTION: dict[str, str] = {
    "Arts & Entertainment": "Entertainment",
    "Nightlife Spot": "Entertainment",
    "Outdoors & Recreation": "Entertainment",
    "Event": "Entertainment",
    "Food": "Commercial",
    "Shop & Service": "Commercial",
    "Professional & Other Places": "Commercial",
    "College & University": "Education",
    "Travel & Transport": "Public",
    "Residence": "Residential",
}
JUDGEMENT_CALLS: dict[str, str] = {
    "Outdoors & Recreation": "parks, gyms and sports fields: leisure, so Entertainment (the Entertainment "
    "description names parks); plazas in it would be Public",
    "Event": "street fairs, conferences: Entertainment (18 check-ins in the file)",
    "Food": "restaurants and cafes are named in the Commercial description, not Entertainment",
    "Professional & Other Places": "mostly offices (Commercial description); its government buildings, "
    "medical centers and schools would be Public / Education",
    "Travel & Transport": "stations, airports, bus stops: Public; its hotels would be Residential",
}


# ----------------------------------------------------------------------------------------- collection
@torch.no_grad()
def collect_routing(
    model: torch.nn.Module,
    data_dir: str | Path,
    split: str = "test",
    max_samples: int = 0,
    batch_size: int = 256,
    stats: dict | None = None,
) -> dict:
    """Raw routing outputs over a split's samples (``eval_subset`` when capped).

    Returns numpy arrays: user, sample_index [N]; cur_hour, cur_loc [N, C]; hist_mask [N, H];
    sem_probs [N, C, Es], sem_ids, sem_w [N, C, Ks] (None without a semantic MoE);
    per_probs / per_ids / per_w: one [N, S, .] array per personalized MoE layer; and prompt_len (Pn).
    ``stats`` overrides the data set's normalisation (zero-shot ``--normalise source``)."""
    ds = TrajectoryDataset(data_dir, split, pointer=getattr(model, "pointer_window", 0), stats=stats)
    idx = eval_subset(len(ds), max_samples)
    keep: dict[str, list] = {k: [] for k in ("user", "sample_index", "cur_hour", "cur_loc", "hist_mask")}
    sem: dict[str, list] = {"probs": [], "ids": [], "w": []}
    per: list[dict[str, list]] = []
    model.eval()
    for a in tqdm(range(0, len(idx), batch_size), desc=f"explain {split}", leave=False, mininterval=5):
        batch = collate(ds.get_batch(idx[a : a + batch_size]))
        _, aux = model(batch)
        B, C = batch["cur_loc"].shape
        for k in keep:
            keep[k].append(batch[k].numpy())
        if aux.semantic is not None:
            for k, v in zip(("probs", "ids", "w"), _raw(aux.semantic), strict=True):
                sem[k].append(v.reshape(B, C, -1))
        if not per:
            per = [{"probs": [], "ids": [], "w": []} for _ in aux.personal]
        for store, ra in zip(per, aux.personal, strict=True):
            for k, v in zip(("probs", "ids", "w"), _raw(ra), strict=True):
                store[k].append(v.reshape(B, -1, v.shape[-1]))
    out = {k: np.concatenate(v) for k, v in keep.items()}
    for k in ("probs", "ids", "w"):
        out[f"sem_{k}"] = np.concatenate(sem[k]) if sem[k] else None
        out[f"per_{k}"] = [np.concatenate(s[k]) for s in per]
    S = out["per_probs"][0].shape[1] if per else 0
    out["prompt_len"] = prompt_len(S, out["hist_mask"].shape[1], out["cur_loc"].shape[1]) if per else 0
    return out


def _raw(ra) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (ra.probs_TE.detach().float().numpy(), ra.ids_TK.detach().numpy().astype(np.int64),
            ra.w_TK.detach().float().numpy())  # fmt: skip


def token_mask(raw: dict, pool: str) -> np.ndarray:
    """[N, S] bool: the personal-MoE token positions pooled for persona statistics (``POOLS``)."""
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; expected one of {sorted(POOLS)}")
    N, H = raw["hist_mask"].shape
    C, Pn = raw["cur_loc"].shape[1], raw["prompt_len"]
    S = Pn + H + C
    m = np.zeros((N, S), dtype=bool)
    if pool == "current":
        m[:, Pn + H :] = True
    elif pool == "last":
        m[:, -1] = True
    else:
        m[:] = sequence_mask(torch.from_numpy(np.asarray(raw["hist_mask"])), Pn, C).numpy()
    return m


# ----------------------------------------------------------------------------------------- aggregation
def mix_stats(probs_TE: np.ndarray, ids_TK: np.ndarray, w_TK: np.ndarray) -> dict:
    """Expert mix of a set of tokens: mean router probability, selected-weight share and slot load per
    expert, load coefficient of variation (population std / mean), mean routing entropy (nats)."""
    T, E = probs_TE.shape
    valid = ids_TK >= 0
    load = expert_counts(torch.from_numpy(np.asarray(ids_TK)), E).double().numpy()
    wsum = np.bincount(ids_TK[valid], weights=w_TK[valid].astype(np.float64), minlength=E)
    load = load / max(load.sum(), 1.0)
    wshare = wsum / wsum.sum() if wsum.sum() > 0 else wsum
    p = probs_TE.astype(np.float64)
    ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(-1)
    return {
        "n_tokens": int(T),
        "mean_prob": (p.mean(0) if T else np.zeros(E)).tolist(),
        "weight_share": wshare.tolist(),
        "load": load.tolist(),
        "load_cv": float(load.std() / load.mean()) if T else None,
        "entropy": float(ent.mean()) if T else None,
        "entropy_max": float(np.log(E)),
    }


def sample_mixes(probs_NSE: np.ndarray, mask_NS: np.ndarray) -> np.ndarray:
    """[N, E] each sample's mean router probability over its pooled tokens."""
    m = mask_NS[..., None].astype(np.float64)
    return (probs_NSE * m).sum(1) / np.clip(m.sum(1), 1.0, None)


def js_divergence(p_NE: np.ndarray, q_NE: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence per row, base 2 (in [0, 1])."""
    p, q = np.asarray(p_NE, np.float64), np.asarray(q_NE, np.float64)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(a > 0, a * np.log2(np.clip(a, 1e-300, None) / np.clip(b, 1e-300, None)), 0.0).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def user_stability(mix_NE: np.ndarray, user_N: np.ndarray) -> dict[int, float]:
    """Per user: mean JS divergence between each sample's mix and the user's mean mix (0 = the user is
    always routed the same way). Users with one sample get 0.0."""
    out = {}
    for u in np.unique(user_N):
        mu = mix_NE[user_N == u]
        out[int(u)] = float(js_divergence(mu, mu.mean(0, keepdims=True)).mean())
    return out


def function_by_hour(probs_NCE: np.ndarray, ids_NCK: np.ndarray, hour_NC: np.ndarray) -> dict:
    """Function-expert mix per hour of day (the record's cur_hour): records, mean probability, top-1 share."""
    E = probs_NCE.shape[-1]
    p, top, h = probs_NCE.reshape(-1, E), ids_NCK[..., 0].reshape(-1), hour_NC.reshape(-1)
    n, mean, share = [], [], []
    for hr in range(24):
        sel = h == hr
        n.append(int(sel.sum()))
        mean.append(p[sel].mean(0).tolist() if sel.any() else [0.0] * E)
        share.append((np.bincount(top[sel], minlength=E) / max(sel.sum(), 1)).tolist())
    return {"hours": list(range(24)), "n_records": n, "mean_prob": mean, "top1_share": share}


def category_agreement(top_R: np.ndarray, group_R: np.ndarray, num_experts: int = 5, seed: int = 0) -> dict:
    """Agreement of the top function expert with the venue's function group over routed records
    (``group_R`` = expert index of the venue's group, -1 = category unknown / unmapped, excluded), with
    its references: uniform random (1/E expected, and one seeded random assignment), popularity-only
    (always the most frequent group; always the model's most frequent expert) and independent marginals
    (sum_e P_model(e) P_group(e), the chance level given both marginals)."""
    ok = group_R >= 0
    top, grp = top_R[ok], group_R[ok]
    n = int(ok.sum())
    E = num_experts
    if n == 0:
        return {"n_records": 0, "skipped": "no record with a mapped venue category"}
    p_grp = np.bincount(grp, minlength=E) / n
    p_top = np.bincount(top, minlength=E) / n
    rand = np.random.default_rng(seed).integers(0, E, size=n)
    model_mode = int(np.argmax(p_top))
    confusion = np.zeros((E, E), dtype=np.int64)  # rows: venue group, cols: top expert
    np.add.at(confusion, (grp, top), 1)
    return {
        "n_records": n,
        "n_unmapped": int((~ok).sum()),
        "agreement": float((top == grp).mean()),
        "random_uniform_expected": 1.0 / E,
        "random_seeded": float((rand == grp).mean()),
        "random_seed": seed,
        "popularity_group": float(p_grp.max()),
        "popularity_group_name": FUNCTION_NAMES[int(np.argmax(p_grp))] if E == len(FUNCTION_NAMES) else None,
        "popularity_model_expert": float(p_grp[model_mode]),
        "popularity_model_expert_name": FUNCTION_NAMES[model_mode] if E == len(FUNCTION_NAMES) else None,
        "independent_marginals": float((p_top * p_grp).sum()),
        "group_share": p_grp.tolist(),
        "top_expert_share": p_top.tolist(),
        "confusion_group_by_expert": confusion.tolist(),
    }


def venue_groups(categories_L: np.ndarray, mapping: dict[str, str] = CATEGORY_TO_FUNCTION) -> np.ndarray:
    """[L] function-expert index of each location's category (-1: unknown or unmapped)."""
    idx = {name: i for i, name in enumerate(FUNCTION_NAMES)}
    return np.array([idx.get(mapping.get(str(c), ""), -1) for c in categories_L], dtype=np.int64)


def summarise(
    raw: dict,
    pool: str = "current",
    categories_L: np.ndarray | None = None,
    top_users: int = 30,
    persona_names: list[str] | None = None,
    user_ids: np.ndarray | None = None,
    seed: int = 0,
) -> dict:
    """The whole report (summary.json) from the raw routing arrays of ``collect_routing``."""
    mask = token_mask(raw, pool) if raw["per_probs"] else None
    users, counts = np.unique(raw["user"], return_counts=True)
    n_layers = len(raw["per_probs"])
    E_p = raw["per_probs"][0].shape[-1] if n_layers else 0
    persona_names = list(persona_names or list(text.PERSONAS)[:E_p])
    rep: dict = {
        "n_samples": int(len(raw["user"])),
        "n_users": int(len(users)),
        "pool": {"name": pool, "definition": POOLS[pool]},
        "function_tokens": "the C current-window records of every sample (where the semantic MoE routes)",
        "stability": "per user: mean Jensen-Shannon divergence (base 2, 0..1) between each sample's mix "
        "(mean router probability over the pooled tokens / its current records) and the user's mean mix; "
        "overall: unweighted mean over users with >= 2 samples",
        "persona_experts": persona_names,
        "function_experts": list(FUNCTION_NAMES),
        "overall": {"persona": [], "function": None},
        "users": {},
    }
    persona_stab = []
    for li in range(n_layers):
        pr, ids, w = raw["per_probs"][li], raw["per_ids"][li], raw["per_w"][li]
        st = mix_stats(pr[mask], ids[mask], w[mask])
        stab = user_stability(sample_mixes(pr, mask), raw["user"])
        st["stability_js"] = _mean_multi(stab, users, counts)
        rep["overall"]["persona"].append({"layer": li, **st})
        persona_stab.append(stab)
    sem_stab = None
    if raw.get("sem_probs") is not None:
        st = _sem_stats(raw, slice(None))
        sem_stab = user_stability(raw["sem_probs"].mean(1), raw["user"])
        st["stability_js"] = _mean_multi(sem_stab, users, counts)
        rep["overall"]["function"] = st
        rep["function_by_hour"] = function_by_hour(raw["sem_probs"], raw["sem_ids"], raw["cur_hour"])
    for u, c in zip(users, counts, strict=True):
        rep["users"][str(int(u))] = _user_entry(raw, mask, int(u), int(c), persona_stab, sem_stab, user_ids)
    rep["figures"] = _figures(rep, users[np.argsort(-counts, kind="stable")][:top_users], n_layers)
    rep["routing_diagnostics"] = routing_diagnostics(raw, mask, categories_L)
    if sem_stab is not None and categories_L is not None and any(str(c) for c in categories_L):
        rep["category_agreement"] = _category_section(raw, categories_L, seed)
        if "agreement" in rep["category_agreement"]:
            rep["figures"]["category_confusion"] = {
                "rows": "venue function group", "cols": "top function expert", "names": list(FUNCTION_NAMES),
                "counts": rep["category_agreement"].get("confusion_group_by_expert"),
            }  # fmt: skip
    else:
        rep["category_agreement"] = {"skipped": "the data set has no venue categories (or no semantic MoE)"}
    return rep


def _sem_stats(raw: dict, sel: np.ndarray | slice) -> dict:
    """mix_stats of the function (semantic) MoE over every current record of the samples ``sel``."""
    sp, si, sw = raw["sem_probs"][sel], raw["sem_ids"][sel], raw["sem_w"][sel]
    return mix_stats(sp.reshape(-1, sp.shape[-1]), si.reshape(-1, si.shape[-1]), sw.reshape(-1, sw.shape[-1]))


def _user_entry(
    raw: dict,
    mask: np.ndarray | None,
    u: int,
    n: int,
    persona_stab: list[dict[int, float]],
    sem_stab: dict[int, float] | None,
    user_ids: np.ndarray | None,
) -> dict:
    """One user's part of the report: persona mix per layer and function mix, each with its stability."""
    sel = raw["user"] == u
    entry: dict = {"n_samples": n, "persona": [], "function": None}
    if user_ids is not None:
        entry["original_id"] = _jsonable(user_ids[u])
    for li, stab in enumerate(persona_stab):
        pr, ids, w = (a[li][sel] for a in (raw["per_probs"], raw["per_ids"], raw["per_w"]))
        m = mask[sel]
        entry["persona"].append({**mix_stats(pr[m], ids[m], w[m]), "stability_js": stab[u]})
    if sem_stab is not None:
        entry["function"] = {**_sem_stats(raw, sel), "stability_js": sem_stab[u]}
    return entry


def _figures(rep: dict, order: np.ndarray, n_layers: int) -> dict:
    """The figures behind every plot (users in ``order`` for the heatmap)."""
    fn = rep["overall"]["function"]
    figs = {
        "persona_heatmap": {
            "value": "mean router probability over the pooled tokens",
            "users": [int(u) for u in order],
            "n_samples": [rep["users"][str(int(u))]["n_samples"] for u in order],
            "experts": rep["persona_experts"],
            "layers": [
                [rep["users"][str(int(u))]["persona"][li]["mean_prob"] for u in order]
                for li in range(n_layers)
            ],  # fmt: skip
        },
        "expert_load": {
            "value": "share of selected (token, slot) pairs per expert; uniform = 1/E",
            "persona_layers": [x["load"] for x in rep["overall"]["persona"]],
            "persona_load_cv": [x["load_cv"] for x in rep["overall"]["persona"]],
            "function": fn["load"] if fn else None,
            "function_load_cv": fn["load_cv"] if fn else None,
        },
    }
    if fn:
        figs["function_by_hour"] = rep["function_by_hour"]
    return figs


def _category_section(raw: dict, categories_L: np.ndarray, seed: int) -> dict:
    """Agreement of each current record's top function expert with its venue's category group."""
    si = raw["sem_ids"]
    groups_L = venue_groups(categories_L)
    top_R = si[..., 0].reshape(-1)  # top-1 = highest probability (stable ties: lower id)
    grp_R = groups_L[raw["cur_loc"].reshape(-1)]
    agr = category_agreement(top_R, grp_R, raw["sem_probs"].shape[-1], seed)
    seen = sorted({str(c) for c in categories_L if str(c)})
    agr["records"] = "every current-window record of every sample (a record in several samples' windows "
    agr["records"] += "counts once per sample: each is a separate routing decision with its own history)"
    agr["mapping"] = {c: CATEGORY_TO_FUNCTION.get(c) for c in seen}
    agr["judgement_calls"] = {c: v for c, v in JUDGEMENT_CALLS.items() if c in seen}
    return agr


def _mean_multi(stab: dict[int, float], users: np.ndarray, counts: np.ndarray) -> float | None:
    vals = [stab[int(u)] for u, c in zip(users, counts, strict=True) if c >= 2]
    return float(np.mean(vals)) if vals else None


def _jsonable(v):
    return v.item() if hasattr(v, "item") else v


# ----------------------------------------------------------------------------------------- the command
def explain_run(
    run_dir: str | Path,
    data_dir: str | Path | None,
    out_dir: str | Path,
    split: str = "test",
    max_samples: int = 0,
    batch_size: int = 0,
    pool: str = "current",
    top_users: int = 30,
    normalise: str = "target",
    fallback: bool = False,
) -> dict:
    """``nextlocmoe explain``: load the run (any ep_size; another data set goes through the zero-shot
    loading of ``load_run``), collect raw routing, write summary.json and the PNG plots into out_dir."""
    from nextlocmoe.data.store import load_stats
    from nextlocmoe.eval.plots import write_plots
    from nextlocmoe.eval.slices import routing_slices, sample_slices
    from nextlocmoe.model.io import load_run

    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; expected one of {sorted(POOLS)}")
    cfg, model, _ = load_run(run_dir, data_dir, normalise=normalise, fallback=fallback)
    data = Path(data_dir or cfg.data.dir)
    stats = load_stats(cfg.data.dir) if normalise == "source" else None
    raw = collect_routing(model, data, split, max_samples, batch_size or cfg.data.eval_batch_size, stats)
    locs = load_locations(data)
    user_ids = np.load(data / "users.npy", allow_pickle=False) if (data / "users.npy").is_file() else None
    rep = summarise(raw, pool, locs.get("category"), top_users, user_ids=user_ids)
    mask = token_mask(raw, pool) if raw["per_probs"] else None
    rep["slices"] = routing_slices(raw, mask, sample_slices(data, split, max_samples))
    rep = {"run": str(run_dir), "data": str(data), "dataset": load_manifest(data).get("dataset"),
           "split": split, "normalise": normalise,
           "location_transfer": getattr(model, "location_transfer", None), **rep}  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep["plots"] = write_plots(rep, out)
    (out / "summary.json").write_text(json.dumps(rep, indent=1) + "\n")
    return rep
