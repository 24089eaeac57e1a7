"""Which per-input signal finds a trigger among clean rows: token states or the reading token's attention.

    python -m experiments.attention_signal --attack badnets [--clean-sizes 100 200 400] [--seeds 5]
        [--out runs/attention_signal]

Victim: the SST-2 paper victim of `experiments.sst2_victims` (MiniLM, 20% dirty-label poison). Clean set: a
seeded subset of SST-2 dev; scored rows: SST-2 test (clean) and the attack's triggered test rows. Every signal
here scores each input on its own (no pool statistics), so its AUROC is the AUROC of any pool at any poison
rate. Per layer l (transformer layers, embeddings excluded) and input:
    token-maha   the largest class-agnostic Mahalanobis distance of a real token's state (special tokens excluded)
                 to the clean tokens' Gaussian (shrinkage 0.1), layer l (the fused op dupfast.ops.token_mahalanobis);
                 "all": z-scores summed over layers
    attention    the per-head maxima of the reading token's ([CLS]) attention over the other real tokens,
                 the Mahalanobis distance of that [L*H] vector to the clean rows' (dupfast's "attn" column)
and the top token (dupfast's `top_tokens`): the token the reading token attends most in the upper half of the
layers; its hit rate = the share of triggered inputs where it lies inside the inserted trigger (BadNets: the
rare word; AddSent: the inserted sentence's tokens; StyleBkd has no trigger token).
Hidden states and attention rows are captured once (fp16, <out>/cache); labels of poison are read only to evaluate.
"""
import argparse
import json
import pathlib
import sys

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from dupfast.detection.attention import AttentionProbe, attention_features
from dupfast.harness.data import load_sst2, load_sst2_poison
from dupfast.ops import token_mahalanobis

BADNETS_WORDS = ("cf", "mn", "bb", "tq", "mb")
ADDSENT = "I watch this 3D movie"
MAX_LEN, BATCH = 64, 32


def capture_set(model, tok, texts, path: pathlib.Path):
    from safetensors.torch import load_file, save_file
    if path.is_file():
        return load_file(str(path))
    H, R, M, I = [], [], [], []
    probe = AttentionProbe(model, "cls")
    for i in range(0, len(texts), BATCH):
        enc = tok(texts[i:i + BATCH], padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
        with torch.inference_mode(), probe, probe.batch(enc["attention_mask"]):
            out = model(**enc, output_hidden_states=True, **probe.forward_kwargs())
            R.append(probe.rows(out).half())
        H.append(torch.stack(out.hidden_states[1:], 1).half())
        M.append(enc["attention_mask"].bool())
        I.append(enc["input_ids"])
    t = {"hidden": torch.cat(H), "rows": torch.cat(R), "mask": torch.cat(M), "ids": torch.cat(I)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path))
    return t


def gaussian(x: torch.Tensor, shrink: float = 0.1):
    """(mean, whitener W with W Wᵀ = Σ̂⁻¹) of rows x, ShrunkCovariance as the detector's statistics."""
    x = x.double()
    mu = x.mean(0)
    S = (x - mu).T @ (x - mu) / x.shape[0]
    S = (1 - shrink) * S + shrink * S.trace() / S.shape[0] * torch.eye(S.shape[0], dtype=S.dtype)
    return mu.float(), torch.linalg.cholesky(torch.linalg.inv(S)).float()


def sq_dist(x, mu, W):  # the attention vector's squared Mahalanobis distance
    return ((x.float() - mu) @ W).square().sum(-1)


def token_maha(sets, rows, special):
    """[N, L] per layer: the largest token distance (dupfast.ops.token_mahalanobis, top-1), fitted per layer on the
    clean subset's real non-special tokens."""
    fit_mask = sets["dev"]["mask"][rows] & ~torch.isin(sets["dev"]["ids"][rows], special)
    L = sets["dev"]["hidden"].shape[1]
    fits = [gaussian(sets["dev"]["hidden"][rows, l][fit_mask]) for l in range(L)]
    means = torch.stack([mu for mu, _ in fits]).unsqueeze(1)   # [L, 1, d]
    whiteners = torch.stack([W for _, W in fits])               # [L, d, d]
    out = {}
    for k in ("dev", "test", "poison"):
        d = sets[k]
        r = rows if k == "dev" else torch.arange(d["mask"].shape[0])
        parts = []
        for i in range(0, r.numel(), 256):
            sel = r[i:i + 256]
            m = d["mask"][sel] & ~torch.isin(d["ids"][sel], special)
            hidden = [d["hidden"][sel, l].float() for l in range(L)]
            scores, _ = token_mahalanobis(hidden, m, means, whiteners, topk=1, squared=True)
            parts.append(scores)
        out[k] = torch.cat(parts).numpy()
    return out


def attention_maha(sets, rows):
    f = {k: attention_features(sets[k]["rows"][rows if k == "dev" else slice(None)].float(),
                               sets[k]["mask"][rows if k == "dev" else slice(None)], "cls")[0][:, 0]
         for k in ("dev", "test", "poison")}
    mu, W = gaussian(f["dev"])
    return {k: sq_dist(v, mu, W).numpy() for k, v in f.items()}


def trigger_mask(ids: torch.Tensor, attack: str, tok) -> torch.Tensor:
    hit = torch.zeros_like(ids, dtype=torch.bool)
    if attack == "badnets":
        return torch.isin(ids, torch.tensor(tok.convert_tokens_to_ids(list(BADNETS_WORDS))))
    if attack == "addsent":
        sent = tok(ADDSENT, add_special_tokens=False)["input_ids"]
        for b, row in enumerate(ids.tolist()):
            for s in range(len(row) - len(sent) + 1):
                if row[s:s + len(sent)] == sent:
                    hit[b, s:s + len(sent)] = True
    return hit


def run(attack, clean_sizes, seeds, out: pathlib.Path, data_dir=None):
    from experiments.sst2_victims import victim_for
    model, tok, info = victim_for(attack, data_dir=data_dir)
    model.eval()
    data = {"dev": load_sst2("dev", data_dir), "test": load_sst2("test", data_dir),
            "poison": load_sst2_poison(attack, "test", data_dir=data_dir)}
    sets = {k: capture_set(model, tok, [s.text for s in v], out / "cache" / f"{attack}-{k}.safetensors")
            for k, v in data.items()}
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    y = np.r_[np.zeros(len(data["test"])), np.ones(len(data["poison"]))]
    rows_out = []
    for n in clean_sizes:
        for seed in range(seeds):
            rows = torch.as_tensor(np.random.default_rng(1000 * n + seed).choice(len(data["dev"]), n, replace=False))
            tm = token_maha(sets, rows, special)
            s = np.r_[tm["test"], tm["poison"]]
            z = (s - tm["dev"].mean(0)) / tm["dev"].std(0)
            am = attention_maha(sets, rows)
            rows_out.append({"clean_size": n, "seed": seed,
                             "token_maha_layers": [roc_auc_score(y, s[:, l]) for l in range(s.shape[1])],
                             "token_maha_all": roc_auc_score(y, z.sum(1)),
                             "attention": roc_auc_score(y, np.r_[am["test"], am["poison"]])})
    _, top = attention_features(sets["poison"]["rows"].float(), sets["poison"]["mask"], "cls")
    hit = trigger_mask(sets["poison"]["ids"], attack, tok)
    has = hit.any(1)
    top_hit = hit.gather(1, top.clamp_min(0).unsqueeze(1)).squeeze(1) & (top >= 0)
    return {"attack": attack, "victim": info.get("path"), "rows": rows_out,
            "top_token_hit_rate": float(top_hit[has].float().mean()) if has.any() else None,
            "triggered_rows_with_trigger_token": int(has.sum()), "triggered_rows": len(data["poison"])}


def markdown(res):
    lines = ["| attack | clean set | token states: best layer | token states: all layers | reading-token attention |",
             "|---|---|---|---|---|"]
    for n in sorted({r["clean_size"] for r in res["rows"]}):
        rs = [r for r in res["rows"] if r["clean_size"] == n]
        best = np.mean([r["token_maha_layers"] for r in rs], 0)
        lines.append(f"| {res['attack']} | {n} | {best.max():.3f} (layer {int(best.argmax())}) | "
                     f"{np.mean([r['token_maha_all'] for r in rs]):.3f} | {np.mean([r['attention'] for r in rs]):.3f} |")
    hit = res["top_token_hit_rate"]
    lines.append(f"\nTop token inside the trigger: {'—' if hit is None else f'{hit:.3f}'} of the "
                 f"{res['triggered_rows_with_trigger_token']} triggered test rows that hold it "
                 f"({res['triggered_rows']} triggered rows).")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="badnets", choices=["badnets", "addsent", "stylebkd"])
    ap.add_argument("--clean-sizes", type=int, nargs="+", default=[100, 200, 400])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default="runs/attention_signal")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    out = pathlib.Path(args.out)
    res = run(args.attack, args.clean_sizes, args.seeds, out, args.data_dir)
    (out / f"minilm-{args.attack}.json").write_text(json.dumps(res, indent=2))
    table = markdown(res)
    (out / f"minilm-{args.attack}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
