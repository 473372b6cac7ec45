"""Image dataset distillation: learn a few synthetic images per class that train networks
almost as well as the whole real training set.

Methods (one file each): coreset baselines (``baselines``: random subset, herding), gradient
matching with differentiable Siamese augmentation (``dc``), distribution matching (``dm``),
matching training trajectories (``mtt``) and flat trajectory distillation (``ftd``). Shared
pieces: ``data`` (digits, image folders, torchvision-style datasets; standardising or ZCA),
``nets`` (ConvNet, MLP, small ResNet; a functional forward pass), ``augment`` (DSA) and
``evaluate`` (the field's protocol: fresh networks trained on the distilled set, test accuracy
mean +- std, across architectures).
"""
