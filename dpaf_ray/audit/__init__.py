"""Empirical privacy audits: lower bounds on ε measured on the real code path.

- `release_level`: one release of each kind (DPAGG group sums, the conv2 DP-SGD update, the noisy
  score), a worst-case canary in or out, 10⁶ runs per side, a likelihood-ratio threshold test.
- `run_level`: one audited run with m canaries (Steinke, Nasr & Jagielski 2023).
- `bounds`: Clopper–Pearson, ε from (TPR, FPR), the Gaussian mechanism's exact ε, the one-run bound.
- `cli`: `python -m dpaf_ray audit --level release|run`.

A lower bound below the claim does not prove the claim; one above it disproves it.
"""
