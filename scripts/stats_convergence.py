"""How many C0 tokens are enough? Edit quality and ‖C0_n − C0_ref‖/‖C0_ref‖ against n (issue 12, item 4).

Keys and values of an edit do not depend on C0 (keys are down_proj inputs of the unedited
model, values are optimised on it), so they are computed ONCE for the whole edit set and the
EMMET closed form is re-solved with each C0_n; only the solve and the evaluation repeat.

    OMP_NUM_THREADS=1 nohup python scripts/stats_convergence.py > stats_convergence.log 2>&1 &

Resumable: keys/values are saved per chunk (verified safetensors under $PMEDIT_CACHE/
stats_convergence), C0_n goes through the ordinary statistics cache (load_or_collect, so each
C0_n is exactly what a user with ``mom2_tokens=n`` gets), and the JSON in docs/ is rewritten
after every token count. Re-running skips what is done.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pmedit.fileio import atomic_path, atomic_write_json, load_verified, machine_info, read_json, save_verified

REPO = Path(__file__).resolve().parent.parent
TOKENS = [5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000]
# the largest first after the cheap ones: the reference is then known early
ORDER = [5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 1_000_000, 500_000]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="value-optimisation steps (preset: 25)")
    ap.add_argument("--tokens", type=int, nargs="*", default=ORDER)
    ap.add_argument("--out", default=str(REPO / "docs" / "stats_convergence.json"))
    ap.add_argument("--counterfact", default=str(REPO.parent / "shared" / "data" / "counterfact"
                                                 / "counterfact_original_500.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    import pmedit
    from pmedit.data import load_counterfact
    from pmedit.evaluation import evaluate_counterfact
    from pmedit.hparams import EditHparams
    from pmedit.keys import compute_keys, context_templates
    from pmedit.models import ModelSpec, cache_root
    from pmedit.stats import load_or_collect
    from pmedit.values import optimize_values
    from pmkernels.solve import SPDFactor

    hp = EditHparams.preset("smollm2").replace(steps=args.steps)
    layer = hp.layers[0]
    model, tok = pmedit.load_model()
    model.eval()
    spec = ModelSpec.from_model(model)
    records = load_counterfact(args.counterfact, limit=args.edits)
    reqs = [r.to_request() for r in records]
    work = cache_root() / "stats_convergence" / f"{spec.fingerprint}_L{layer}_E{len(reqs)}_steps{hp.steps}"
    out = Path(args.out)
    res = read_json(out) if out.exists() else {}
    if res.get("config", {}).get("work") != work.name:
        res = {}
    res.setdefault("config", {"work": work.name, "edits": len(reqs), "batch": len(reqs), "layer": layer,
                              "method": hp.method, "hparams": hp.to_dict(), "counterfact": Path(args.counterfact).name,
                              "corpus": hp.mom2_corpus, "machine": machine_info()})
    res.setdefault("runs", {})

    def save():
        atomic_write_json(out, res)

    # ---- keys and values, once (they do not depend on C0)
    templates = context_templates(model, tok, n=hp.n_templates, length=hp.template_length, seed=0)
    kv = work / "keys_values.safetensors"
    if kv.exists():
        t, _ = load_verified(kv)
        K, Z, H, losses = t["K"], t["Z"], t["H"], t["losses"]
    else:
        t0 = time.perf_counter()
        K = compute_keys(model, tok, spec, layer, reqs, templates, batch_size=hp.key_batch_size).double().cpu()
        parts = []
        chunk = 32
        for s in range(0, len(reqs), chunk):
            p = work / f"values_{s:05d}.safetensors"
            if p.exists():
                parts.append(load_verified(p)[0])
                continue
            v = optimize_values(model, tok, spec, layer, reqs[s:s + chunk], templates, lr=hp.lr, steps=hp.steps,
                                kl_factor=hp.kl_factor, weight_decay=hp.weight_decay,
                                clamp_norm_factor=hp.clamp_norm_factor, loss_stop=hp.loss_stop,
                                stop_on_argmax=hp.stop_on_argmax, batch_size=hp.value_batch_size)
            part = {"z": v.z.detach().double().cpu(), "h": v.h.detach().double().cpu(),
                    "losses": v.losses.detach().double().cpu()}
            save_verified(p, part, {"start": s})
            parts.append(part)
            print(f"values {s + len(part['z'])}/{len(reqs)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        Z = torch.cat([p["z"] for p in parts])
        H = torch.cat([p["h"] for p in parts])
        losses = torch.cat([p["losses"] for p in parts])
        save_verified(kv, {"K": K, "Z": Z, "H": H, "losses": losses}, {"layer": layer})
        res["config"]["seconds_keys_values"] = round(time.perf_counter() - t0, 1)
        save()
    res["config"]["value_loss_mean"] = float(losses.mean())
    R = (Z - H).mT.contiguous()  # [d_out, E]
    Kt = K.mT.contiguous()  # [d, E]
    W = spec.down_proj(model, layer).weight
    W0 = W.detach().clone()

    def evaluate(tag: str) -> dict:
        t0 = time.perf_counter()
        ev = evaluate_counterfact(model, tok, records, progress=False)
        names = {"ES": "es", "PS": "ps", "NS": "ns", "S": "score"}
        return {**{k: ev.summary.get(v) for k, v in names.items()}, "eval_seconds": round(time.perf_counter() - t0, 1)}

    if res.get("unedited", {}).get("ES") is None:
        res["unedited"] = evaluate("unedited")
        save()
        print("unedited", res["unedited"], flush=True)

    for n in args.tokens:
        key = str(n)
        if key in res["runs"] and "ES" in res["runs"][key]:
            continue
        t0 = time.perf_counter()
        st = load_or_collect(model, tok, [layer], corpus=hp.mom2_corpus, max_tokens=n, progress=False)[layer]
        t_c0 = time.perf_counter() - t0
        fac = SPDFactor(hp.lam * st.mean)
        delta = emmet_delta(R, Kt, fac, hp.lam_e)
        with torch.no_grad():
            W.add_(delta.to(W.dtype))
        try:
            row = evaluate(key)
        finally:
            with torch.no_grad():
                W.copy_(W0)
        row.update({"tokens": st.count, "c0_seconds": round(t_c0, 1), "jitter": float(fac.jitter),
                    "cond_estimate": float(fac.cond_estimate), "update_norm": float(delta.norm())})
        res["runs"][key] = row
        save()
        print(n, row, flush=True)

    # ---- ‖C0_n − C0_ref‖_F / ‖C0_ref‖_F against the largest n available (read back from the cache)
    done = sorted(int(k) for k, v in res["runs"].items() if "ES" in v)
    ref_n = done[-1]
    load = lambda n: load_or_collect(model, tok, [layer], corpus=hp.mom2_corpus, max_tokens=n, progress=False)[layer].mean
    ref = load(ref_n)
    for n in done:
        res["runs"][str(n)]["c0_rel_error"] = float((load(n) - ref).norm() / ref.norm())
    res["reference_tokens"] = ref_n
    save()
    plot(res, out.parent / "figures" / "stats_convergence.png")


def emmet_delta(R: torch.Tensor, K: torch.Tensor, fac, lam_e: float) -> torch.Tensor:
    """EMMET Δ = R (KᵀC⁻¹K + λₑI)⁻¹ KᵀC⁻¹ on the factor of C = λ·C0 (E ≤ d), fp64."""
    Y = fac.whiten(K)  # L⁻¹K
    A = Y.mT @ Y + lam_e * torch.eye(K.shape[1], dtype=Y.dtype)
    return R @ torch.cholesky_solve(fac.solve(K).mT, torch.linalg.cholesky(A))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(int(k) for k, v in res["runs"].items() if "ES" in v)
    rows = [res["runs"][str(n)] for n in ns]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for m, style in (("ES", "o-"), ("PS", "s-"), ("NS", "^-"), ("S", "k--")):
        a.plot(ns, [r[m] for r in rows], style, label=m)
    for m, style in (("NS", ":"),):
        a.axhline(res["unedited"][m], color="gray", ls=style, lw=1, label="NS unedited")
    a.set_xscale("log")
    a.set_xlabel("C0 tokens n")
    a.set_ylabel("score")
    cfg = res["config"]
    a.set_title(f"SmolLM2-135M, {cfg['method'].upper()} L{cfg['layer']}, B={cfg['batch']} CounterFact edits", fontsize=9)
    a.legend(fontsize=8)
    errs = [(n, r["c0_rel_error"]) for n, r in zip(ns, rows) if r.get("c0_rel_error")]
    if errs:
        b.loglog([e[0] for e in errs], [e[1] for e in errs], "o-", label="measured")
        n0, e0 = errs[0]
        b.loglog([e[0] for e in errs], [e0 * (n0 / e[0]) ** 0.5 for e in errs], "k:", label="∝ n^-1/2")
        b.legend(fontsize=8)
    b.set_xlabel("C0 tokens n")
    b.set_ylabel(f"‖C0_n − C0_ref‖_F / ‖C0_ref‖_F  (ref: {res.get('reference_tokens')} tokens)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)


if __name__ == "__main__":
    main()
