"""Fair synthetic tabular data: a procedurally biased dataset and a CSV reader, a fair latent
representation learnt against an adversary, distilled into a small generator, and fairness,
utility and fidelity metrics."""
