"""Baselines for the coupling probe, so that its numbers mean something (README, "How to read the probes").

    python results/probe_baselines.py results/default      # prints a markdown table; ~1 minute on 2 CPU cores

For the warm-started policy (re-created from the run's settings: same seed, same warm-up) and for the
final policy (the run's policy/), it measures coupling_cos, coupling_ratio and hidden_cos on
  coupled:   the probe's pairs -- two states one cell apart, the same move good in one, flawed in the other
  unrelated: the start states of two different train layouts, the same move
  other move: one state, the probe's move against a different move (gradient cosine only)
"""
import dataclasses, json, os, sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo_agentic as ga  # noqa: E402
import toy_env  # noqa: E402


def grad(model, tokenizer, obs, action):
    logp = ga.action_logprobs(model, tokenizer, [obs], [action])[0]
    return torch.cat([g.flatten() for g in torch.autograd.grad(logp, list(model.parameters()))])


def measure(model, tokenizer, s):
    pairs = toy_env.coupled_pairs("train", s.probe_pairs, s.data_seed)
    layouts = toy_env.sample_layouts("train", 2 * s.probe_pairs, seed=s.data_seed + 1)
    unrelated = [(layouts[2 * k], layouts[2 * k + 1], a) for k, (_, _, a) in enumerate(pairs)]
    rows = {"coupled": ga.coupling_probe(model, tokenizer, pairs), "unrelated": ga.coupling_probe(model, tokenizer, unrelated)}
    cos = []
    for good, _, action in pairs:
        obs = toy_env.GridWorld.from_string(good).observation()
        other = next(a for a in toy_env.ACTIONS if a != action)
        cos.append(F.cosine_similarity(grad(model, tokenizer, obs, action), grad(model, tokenizer, obs, other), dim=0).item())
    rows["other move"] = {"coupling_cos": float(np.mean(cos))}
    return rows


def main(run_dir):
    s = ga.Settings(**{k: v for k, v in json.load(open(os.path.join(run_dir, "settings.json"))).items()
                       if k in {f.name for f in dataclasses.fields(ga.Settings)}})
    model, tokenizer = ga.load_policy(dataclasses.replace(s, model=""), torch.device("cpu"))
    model.eval()
    pool, _ = ga.task_sets(s)
    ga.sft_warmup(model, tokenizer, pool, s, np.random.default_rng(s.seed))   # the run's policy at iteration 0
    start = measure(model, tokenizer, s)
    final, tokenizer = ga.load_policy(dataclasses.replace(s, model=os.path.join(run_dir, "policy")), torch.device("cpu"))
    end = measure(final.eval(), tokenizer, s)
    print("| pairs | coupling_cos start -> end | coupling_ratio start -> end | hidden_cos start -> end |\n|---|---|---|---|")
    for kind in start:
        cells = [f"{start[kind][k]:.3f} -> {end[kind][k]:.3f}" if k in start[kind] else "--"
                 for k in ("coupling_cos", "coupling_ratio", "hidden_cos")]
        print(f"| {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
