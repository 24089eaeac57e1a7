"""`DetectionResult`: per-sample outputs of a detector, in the loader's order."""
import dataclasses
from typing import Optional

import torch

from .. import distributed as D
from .verdict import Verdict


@dataclasses.dataclass
class DetectionResult:
    """Per-sample outputs in the loader's order (`index` holds the loader's ids when it gave them)."""
    scores: torch.Tensor                 # [N] float64, larger = more suspicious
    flags: torch.Tensor                  # [N] bool, scores > threshold
    threshold: float
    components: torch.Tensor             # [N, m] z-normalised score components
    component_names: tuple
    selected_layers: list
    layer_distances: Optional[torch.Tensor] = None   # [N, L] per-layer Mahalanobis distances
    transitions: Optional[dict] = None               # {"cosines": [N, L-1], "concentration": [N]}
    logits: Optional[torch.Tensor] = None            # [N, C]
    index: Optional[torch.Tensor] = None             # [N] loader ids
    weights: tuple = ()                              # the fusion weight of each component
    verdict: Optional[Verdict] = None                # is there poison here? (verdict.py)
    validation_scores: Optional[torch.Tensor] = None  # [n] the clean validation half's fused scores
    copies: Optional[torch.Tensor] = None            # [N] how many rows of the pool hold this row's input
    top_tokens: Optional[torch.Tensor] = None        # [N] int64 token id the classifier's reading token attends
                                                     # most (attention.py), -1 for none; None without the signal

    @property
    def poison_present(self) -> Optional[bool]:
        """True / False from the presence test; None when the pool is too small to decide (verdict.reason)."""
        return None if self.verdict is None else self.verdict.poison_present

    @property
    def p_value(self) -> Optional[float]:
        """The presence test's p-value (small: the pool's tail is heavier than clean data's)."""
        return None if self.verdict is None else self.verdict.p_value

    @property
    def summary(self) -> str:
        """One sentence: the verdict, the flagged count and the count expected from clean data alone."""
        if self.verdict is None:
            return f"{int(self.flags.sum())} of {len(self)} flagged"
        return self.verdict.sentence()

    def __len__(self):
        return self.scores.shape[0]

    def top_words(self, tokenizer) -> list:
        """Per input, the token its reading token attends most, as text (`top_tokens` decoded; None where there
        is none): on a backdoored model, the trigger of a triggered input. Needs the attention signal."""
        if self.top_tokens is None:
            raise ValueError("this result has no top tokens: they come from the attention signal (mode='default' "
                             "with 'attn' among its signals, on a model read at one token)")
        return [None if t < 0 else tokenizer.convert_ids_to_tokens(int(t)) for t in self.top_tokens.tolist()]

    # ---- export: a table of the rows, and the rows of the user's data set each side of the threshold ---------
    def to_pandas(self):
        """A pandas DataFrame, one row per input in this result's order: `index` (the loader's ids, else 0..N-1),
        `score`, `flag`, `copies` (when counted) and one column `component_<name>` per z-normalised component."""
        import pandas as pd

        n = len(self)
        cols = {"index": (torch.arange(n) if self.index is None else self.index).tolist(),
                "score": self.scores.tolist(), "flag": self.flags.bool().tolist()}
        if self.copies is not None:
            cols["copies"] = self.copies.tolist()
        if self.top_tokens is not None:
            cols["top_token_id"] = self.top_tokens.tolist()
        for j, name in enumerate(self.component_names):
            cols[f"component_{name}"] = self.components[:, j].tolist()
        return pd.DataFrame(cols)

    def row_flags(self, n: int) -> list:
        """The flags in data-set order (row i = the input whose `index` is i; no index: this result's order), for
        `n` rows: `ds.filter(lambda _, i: not flags[i], with_indices=True)`-ready."""
        if len(self) != n:
            raise ValueError(f"the data set has {n} rows but the detection scored {len(self)}: pass the data set "
                             "the detection's loader was built from")
        if self.index is None:
            return self.flags.bool().tolist()
        ids = self.index.tolist()
        if sorted(ids) != list(range(n)):  # the ids are the rows' positions only when they are 0..n-1, once each
            odd = [i for i in ids if not 0 <= i < n] or ["a repeated id"]
            raise ValueError(f"the detection's index is not the row positions 0..{n - 1} (found {odd[0]}): build the "
                             "loader with `index` = each row's position in the data set (dupfast.text_loader does)")
        out = [False] * n
        for i, f in zip(ids, self.flags.bool().tolist()):
            out[i] = f
        return out

    def kept(self, dataset):
        """The rows of `dataset` (a `datasets.Dataset`, a pandas DataFrame or a list, in the order the loader's
        `index` counts) that were not flagged."""
        return _take(dataset, self, flagged=False)

    def flagged(self, dataset):
        """The rows of `dataset` that were flagged (see `kept`)."""
        return _take(dataset, self, flagged=True)

    def sorted_by_index(self) -> "DetectionResult":
        """The same result reordered by `index` (e.g. back to the order of the input texts)."""
        if self.index is None:
            return self
        order = torch.argsort(self.index)
        take = lambda t: None if t is None else t[order]  # noqa: E731
        return dataclasses.replace(
            self, scores=self.scores[order], flags=self.flags[order], components=self.components[order],
            layer_distances=take(self.layer_distances), logits=take(self.logits), index=self.index[order],
            copies=take(self.copies), top_tokens=take(self.top_tokens),
            transitions=None if self.transitions is None else {k: v[order] for k, v in self.transitions.items()})

    def gathered(self) -> "DetectionResult":
        """Under torch.distributed (each rank scored its shard of the pool): every rank's rows, on every rank,
        ordered by `index`; the result itself in one process. The threshold and the fusion weights are the
        same on every rank (they come from all-reduced counts and the gathered clean validation scores)."""
        if not D.is_sharded():
            return self
        if self.index is None:
            raise ValueError("under torch.distributed the pool loader must yield an `index` key (global sample "
                             "ids), so every rank's results can be put back in one order")
        rows = lambda t: None if t is None else D.all_gather_rows(t.detach().cpu())  # noqa: E731
        flags = D.all_gather_rows(self.flags.detach().cpu().to(torch.uint8)).bool()  # gloo gathers no bool
        out = dataclasses.replace(
            self, scores=rows(self.scores), flags=flags, components=rows(self.components),
            layer_distances=rows(self.layer_distances), logits=rows(self.logits), index=rows(self.index),
            top_tokens=rows(self.top_tokens),
            copies=rows(self.copies),
            transitions=None if self.transitions is None else {k: rows(v) for k, v in self.transitions.items()})
        return out.sorted_by_index()


def _take(dataset, result: DetectionResult, flagged: bool):
    """The rows of `dataset` whose flag is `flagged`, of the dataset's own type (DataFrame rows keep their index
    labels, so the original row ids stay visible)."""
    if hasattr(dataset, "iloc"):  # pandas
        pick = lambda rows: dataset.iloc[rows]  # noqa: E731
    elif hasattr(dataset, "select") and hasattr(dataset, "features"):  # datasets.Dataset
        pick = dataset.select
    elif isinstance(dataset, (list, tuple)):
        pick = lambda rows: type(dataset)(dataset[i] for i in rows)  # noqa: E731
    else:
        raise TypeError(f"kept()/flagged() take a datasets.Dataset, a pandas DataFrame or a list, got "
                        f"{type(dataset).__name__}; for anything else use row_flags(n), the flags in row order")
    return pick([i for i, f in enumerate(result.row_flags(len(dataset))) if f == flagged])
