"""One-step generative super-resolution (CTMSR): paired data, the LR -> HR trajectory, the
objective and the SR network. The recipe is ``fewstep distill image-sr-ctmsr``."""
