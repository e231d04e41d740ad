"""What the advantage labels say about the moves they label, against the oracle (README, GCD section).

    python results/label_noise.py results/default      # a few seconds on 2 CPU cores

Loads a run's policy/ and settings, samples `iters` iterations of GRPO rollouts on its train layouts
(no training), labels every move with A != 0 by the sign of its advantage, as --cls-labels advantage
does, and prints the confusion against the oracle: how often each label is right.
"""
import dataclasses, json, os, sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo_agentic as ga  # noqa: E402


def main(run_dir, iters=20):
    s = ga.Settings(**{k: v for k, v in json.load(open(os.path.join(run_dir, "settings.json"))).items()
                       if k in {f.name for f in dataclasses.fields(ga.Settings)}})
    model, tokenizer = ga.load_policy(dataclasses.replace(s, model=os.path.join(run_dir, "policy")), torch.device("cpu"))
    model.eval()
    pool, _ = ga.task_sets(s)
    rng, generator = np.random.default_rng(s.seed), torch.Generator().manual_seed(s.seed)
    counts = np.zeros((2, 2), dtype=int)                      # [label good?][oracle good?]
    for _ in range(iters):
        picked = rng.choice(len(pool), size=s.tasks_per_iter, replace=False)
        moves, rewards, _ = ga.rollout(model, tokenizer, [pool[k] for k in picked], s.group_size, s, generator=generator)
        advantages = ga.grpo_advantages(rewards, s.scale_by_std).flatten()[[m.episode for m in moves]]
        for m, a in zip(moves, advantages.tolist()):
            if a != 0:
                counts[int(a > 0), int(m.good)] += 1
    n = counts.sum()
    print(f"{n} labelled moves from {iters} iterations of {s.tasks_per_iter} x {s.group_size} episodes ({run_dir}/policy)")
    print(f"label 'good' (A > 0): {counts[1].sum()} moves, {counts[1, 1] / counts[1].sum():.0%} of them good by the oracle")
    print(f"label 'bad'  (A < 0): {counts[0].sum()} moves, {counts[0, 0] / counts[0].sum():.0%} of them flawed by the oracle")
    print(f"disagreement with the oracle (cls_label_noise): {(counts[0, 1] + counts[1, 0]) / n:.0%}")


if __name__ == "__main__":
    main(sys.argv[1])
