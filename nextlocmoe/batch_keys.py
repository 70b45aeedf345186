"""The names of a batch's tensors: shared by the DataLoader (data/store.py) and the model (which reads the
pointer window by these names), so that neither imports the other for them."""

BATCH_KEYS = (
    "hist_xy",
    "hist_weekday",
    "hist_hour",
    "hist_dur",
    "hist_mask",
    "hist_loc",
    "cur_xy",
    "cur_weekday",
    "cur_hour",
    "cur_dur",
    "cur_loc",
    "target_xy",
    "target_loc",
    "target_dur",
    "user",
    "sample_index",
)
# Pointer window (``pointer`` > 0, docs/MODEL_QUALITY.md): the P records right before the target (its own
# user's, any split; -1/0 left padding) and the query time (the target's weekday / hour / gap: its time is
# given, as in LLM-Mob and STAN, never its location).
POINTER_KEYS = (
    "ptr_loc",
    "ptr_xy",
    "ptr_weekday",
    "ptr_hour",
    "ptr_age_h",
    "query_weekday",
    "query_hour",
    "query_gap_h",
)
