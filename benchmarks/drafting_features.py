"""Drafting-router features (issue #26): AUC and precision at 50% recall for top-1 labels, per checkpoint,
and the best modelled lossless speed (vllm_tide.lossless_model) with the full and a cheap draft head.

A scratch-grade experiment kept for reproduction: it reads the states and labels that
`benchmarks/label_budget.py --save /tmp/exp` leaves there (states.pt, labels.pt), trains routers on the
first N labelled tokens (2,000 steps, standardised inputs) and compares input features:
base (the normed state), delta (minus the previous checkpoint's), tok (the input token's embedding),
margin (the exit distribution's top-1 log-probability, top-1 - top-2 margin and entropy; this one needs
a full LM-head product per checkpoint, so it is an upper bound on what distribution features give).

    python benchmarks/drafting_features.py 32768 base,delta,tok,delta_tok,margin
"""
import sys, time, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__import__("os").path.abspath(__file__)), ".."))
from vllm_tide.exit_labels import auc
from vllm_tide.router import Router
torch.set_num_threads(2)
d = torch.load("/tmp/exp/states.pt", weights_only=False)
train, val, lm_w, layers = d["train"], d["val"], d["lm_w"], d["layers"]
N = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
L = torch.load("/tmp/exp/labels.pt", weights_only=False)
projections = L["proj"]
tr = train.rows(L["idx"][:N])
class M: pass
tm, vm = {}, {}
for c in layers:
    tm[c] = M(); tm[c].agree = L["agree"][c][:N]
    vm[c] = M(); vm[c].agree = L["vagree"][c]
emb = lm_w.float()   # tied embeddings on SmolLM2
def tokens_in(st):
    prev = torch.cat([torch.tensor([-1]), st.target[:-1]])
    return prev
def feats(st, c, kind, idx_prev):
    z = st.z[c].float()
    parts = [z]
    if "delta" in kind:
        i = layers.index(c)
        zp = st.z[layers[i - 1]].float() if i > 0 else torch.zeros_like(z)
        parts.append(z - zp)
    if "tok" in kind:
        tok = idx_prev.clamp(min=0)
        e = emb[tok] * (idx_prev >= 0).float()[:, None]
        parts.append(e / e.norm(dim=-1, keepdim=True).clamp(min=1e-6) * z.norm(dim=-1, keepdim=True))
    if "margin" in kind:
        p = projections[c]
        h = p.apply(z) if p is not None else z
        out = []
        for s0 in range(0, len(h), 2048):
            lg = (h[s0:s0 + 2048] @ emb.T) * (p.temperature if p is not None else 1.0)
            lp = torch.log_softmax(lg, -1)
            top = lp.topk(2, -1).values
            ent = -(lp.exp() * lp).sum(-1)
            out.append(torch.stack([top[:, 0], top[:, 0] - top[:, 1], ent], -1))
        parts.append(torch.cat(out))
    return torch.cat(parts, -1)
def train_r(x, y, steps=2000, seed=0):
    torch.manual_seed(seed)
    r = Router(x.shape[1], 128)
    opt = torch.optim.AdamW(r.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    yf = y.float()
    for s in range(steps):
        idx = torch.randint(0, len(x), (512,), generator=g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(r.logits(x[idx]), yf[idx])
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return r.eval()
def prec_at(scores, y, recall):
    order = scores.argsort(descending=True)
    ys = y[order].float()
    tp = ys.cumsum(0)
    k = int((tp >= recall * ys.sum()).nonzero()[0])
    return (tp[k] / (k + 1)).item()
ptr, pva = tokens_in(train)[L["idx"][:N]], tokens_in(val)
for kind in sys.argv[2].split(","):
    row = []
    scores = {}
    t = time.time()
    for c in layers:
        xt, xv = feats(tr, c, kind, ptr), feats(val, c, kind, pva)
        mu, sd = xt.mean(0), xt.std(0).clamp(min=1e-4)
        r = train_r((xt - mu) / sd, tm[c].agree)
        with torch.no_grad():
            s = r((xv - mu) / sd)
        y = vm[c].agree
        scores[c] = s
        row.append(f"{c}:{y.float().mean():.2f}/{auc(s, y):.3f}/p@.5={prec_at(s, y, .5):.2f}")
    print(kind, " ".join(row), f"({time.time()-t:.0f}s)", flush=True)
    from vllm_tide.lossless_model import speedup, StepCosts
    right = {c: vm[c].agree for c in layers}
    for hd in (None, 0.02):
        best = max(({"thr": thr, "m": m, "k": k, **speedup(right, {c: scores[c] > thr for c in layers}, 30, k, m, StepCosts(draft_head=hd))}
                    for m in layers for thr in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3) for k in (1, 2, 4, 8)), key=lambda r: r["speedup"])
        print("  head", hd, {k: round(v, 3) if isinstance(v, float) else v for k, v in best.items()}, flush=True)
