"""Run-level privacy audit (Steinke, Nasr & Jagielski 2023) on mnist-5k at ε ∈ {1, 10}.

For each ε: one audited run (`dpaf_ray.audit.run_level.audit_run`) with m canaries, each in the data
with probability 1/2, the releases of every iteration executed with the real sampling, DPAGG,
clipping and noise code at the noise the real plan derives for that ε, and a white-box adversary
that guesses which canaries were in. Printed and drawn: the ε lower bound against the ledger's ε
(the claim), the ε of the same releases under the PLD accountant (tighter than the ledger's RDP),
and the ceiling of the audit (the bound if every guess were right, fixed by m alone).

    python bench/audit_run.py [--epsilons 1 10 --canaries 1000 --seed 0]

ε = 1 cannot run at the default noise (one iteration already costs more), so it uses
σ_agg = 10, σ_sgd = 5 (5× the defaults) and the plan derives T. About 4 minutes per run on 2 CPUs.
Writes bench/results/audit_run.json and bench/results/audit_run.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import dp_accounting
import torch
from dp_accounting.pld import pld_privacy_accountant

from dpaf_ray.audit.bounds import one_run_epsilon
from dpaf_ray.audit.run_level import RunAuditSettings, audit_run
from dpaf_ray.privacy.randomness import RunSecret

SIGMAS = {1.0: (10.0, 5.0)}  # ε → (σ_agg, σ_sgd); other ε use the training defaults
RESULTS = Path(__file__).resolve().parent / "results"


def pld_epsilon(doc: dict) -> float | None:
    """ε of the run's releases under the PLD accountant (the ledger uses RDP, which over-counts)."""
    try:
        T, q, k = doc["iterations"], doc["sampling_rate"], doc["noise_multipliers"]["sgd_every"]
        s_agg, s_sgd = doc["noise_multipliers"]["sigma_agg"], doc["noise_multipliers"]["sigma_sgd"]
        s_eff = (s_agg ** -2 + s_sgd ** -2) ** -0.5
        both = (T + k - 1) // k
        events = [dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s_eff)), both)]
        if T - both:
            events.append(dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s_agg)), T - both))
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
        acc.compose(dp_accounting.ComposedDpEvent(events))
        return float(acc.get_epsilon(doc["delta"]))
    except Exception as err:  # noqa: BLE001 - a context number, not a result
        print(f"PLD accountant failed: {err}")
        return None


def ceiling(m: int, fractions: list[float], delta: float, confidence: float = 0.95) -> float:
    """The bound the audit would report if all its guesses were right: what m canaries can show."""
    ks = [int(f * m) for f in fractions if 1 <= int(f * m) and 2 * int(f * m) <= m]
    alpha = (1 - confidence) / len(ks)
    return max(one_run_epsilon(m, 2 * k, 2 * k, delta, alpha) for k in ks)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    claims = [r["epsilon_ledger"] for r in rows]
    top = max(claims) * 1.15
    ax.plot([0, top], [0, top], color="grey", lw=1, ls="--", label="bound = claim")
    ax.scatter(claims, [r["epsilon_lower_bound"] for r in rows], s=60, color="C0", zorder=3,
               label="audit lower bound (95 %)")
    if all(r["epsilon_pld"] is not None for r in rows):
        ax.scatter(claims, [r["epsilon_pld"] for r in rows], marker="_", s=300, color="C2",
                   label="ε of the same releases (PLD)")
    ax.scatter(claims, [r["ceiling"] for r in rows], marker="v", s=40, color="C3",
               label=f"ceiling with m = {rows[0]['canaries']} canaries")
    for r in rows:
        ax.annotate(f"{r['epsilon_lower_bound']:.2f}", (r["epsilon_ledger"], r["epsilon_lower_bound"]),
                    textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax.set_xlabel("claimed ε (the run's ledger, RDP)")
    ax.set_ylabel("ε")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_title("One-run audit of DPAF on mnist-5k (δ = 1e-5)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0, help="public seed of the audit (reproducible)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for eps in args.epsilons:
        s_agg, s_sgd = SIGMAS.get(eps, (None, None))
        settings = RunAuditSettings(epsilon=eps, delta=args.delta, canaries=args.canaries, sigma_agg=s_agg,
                                    sigma_sgd=s_sgd, seed=args.seed)
        t0 = time.time()
        result = audit_run(settings, RunSecret.from_public_seed(args.seed), progress=print)
        doc = result.to_json()
        row = {
            "epsilon_target": eps, "epsilon_ledger": result.epsilon_ledger,
            "epsilon_lower_bound": result.epsilon_lower_bound, "tightness": result.tightness,
            "epsilon_pld": pld_epsilon(doc), "ceiling": ceiling(args.canaries, list(settings.guess_fractions),
                                                                  args.delta),
            "canaries": args.canaries, "iterations": result.iterations, "sampling_rate": result.sampling_rate,
            "sigma_agg": result.sigma_agg, "sigma_sgd": result.sigma_sgd, "sgd_every": result.sgd_every,
            "best_guesses": result.best, "verdict": result.verdict, "seconds": time.time() - t0, "audit": doc,
        }
        rows.append(row)
        print(f"ε = {eps:g}: lower bound {row['epsilon_lower_bound']:.3f} vs ledger {row['epsilon_ledger']:.3f} "
              f"({row['tightness']:.2f}×; PLD ε {row['epsilon_pld'] if row['epsilon_pld'] is None else round(row['epsilon_pld'], 3)}, "
              f"ceiling {row['ceiling']:.2f}) → {row['verdict']}; T={row['iterations']}, {row['seconds']:.0f} s")
    command = "python bench/audit_run.py " + " ".join(
        [f"--epsilons {' '.join(f'{e:g}' for e in args.epsilons)}", f"--canaries {args.canaries}",
         f"--seed {args.seed}"])
    (out / "audit_run.json").write_text(json.dumps({"command": command, "dataset": "mnist-5k", "delta": args.delta,
                                                    "rows": rows}, indent=1))
    plot(rows, out / "audit_run.png")
    print(f"wrote {out / 'audit_run.json'} and {out / 'audit_run.png'}")


if __name__ == "__main__":
    main()
