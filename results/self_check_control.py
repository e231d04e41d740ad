"""Is it the verdict that helps the self-check, or any resampling? A control (README, self-check).

    python results/self_check_control.py results/compare      # a few minutes on 2 CPU cores

For every finished run of a --compare directory, loads policy/ and evaluates greedy success on the
held-out layouts three ways, each with the evaluation's own seeded generator:
  none     plain greedy (eval_held_out_success);
  verdict  the self-check as --self-check K does it: a move the actor's verdict calls bad is resampled,
           up to K times (eval_held_out_success_self_check); the share of judged moves it rejects is counted;
  random   the same resampling, but each judged move is rejected by a coin that comes up "bad" at exactly
           that share: the same amount of resampling, with no judgement in it.
Prints each arm's means over seeds and the paired differences verdict - random, mean [95 % t-interval].
"""
import dataclasses, json, os, sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo_agentic as ga  # noqa: E402


@torch.no_grad()
def held_out_success(model, tokenizer, s, judge=None, tries=0):
    generator = torch.Generator().manual_seed(s.seed)  # as evaluate(): the same samples for the same calls
    _, rewards, _ = ga.rollout(model, tokenizer, ga.task_sets(s)[1]["held_out"], 1, s, greedy=True,
                               generator=generator, judge=judge, tries=tries)
    return rewards.mean().item()


def control(run_dir):
    s = ga.Settings(**{k: v for k, v in json.load(open(os.path.join(run_dir, "settings.json"))).items()
                       if k in {f.name for f in dataclasses.fields(ga.Settings)}})
    model, tokenizer = ga.load_policy(dataclasses.replace(s, model=os.path.join(run_dir, "policy")), torch.device("cpu"))
    model.eval()
    counts = {"judged": 0, "rejected": 0}

    def verdict(prompts, actions):
        ok = (ga.verdict_logits(model, tokenizer, prompts, actions).argmax(1) == 0).tolist()
        counts["judged"] += len(ok)
        counts["rejected"] += ok.count(False)
        return ok

    out = {"none": held_out_success(model, tokenizer, s), "verdict": held_out_success(model, tokenizer, s, verdict, s.self_check)}
    out["reject_rate"] = counts["rejected"] / max(counts["judged"], 1)
    coin = np.random.default_rng(s.seed)
    out["random"] = held_out_success(model, tokenizer, s, lambda prompts, actions: (coin.random(len(prompts)) >= out["reject_rate"]).tolist(),
                                     s.self_check)
    return out


def main(compare_dir):
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per policy
    torch.set_num_threads(2)
    runs = sorted(d for d in os.listdir(compare_dir) if os.path.exists(os.path.join(compare_dir, d, "summary.json")))
    results = {d: control(os.path.join(compare_dir, d)) for d in runs}
    for d, r in results.items():
        print(f"{d}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    print("\n| arm | verdict rejects | none | verdict | random (same rate) | verdict - none | random - none | verdict - random |")
    print("|---|---|---|---|---|---|---|---|")
    for arm in dict.fromkeys(d.rsplit("-seed", 1)[0] for d in runs):
        rs = [r for d, r in results.items() if d.rsplit("-seed", 1)[0] == arm]
        mean = lambda key: np.mean([r[key] for r in rs])
        diff = lambda a, b: ga.paired_interval([r[a] - r[b] for r in rs])
        print(f"| {arm} | {mean('reject_rate'):.0%} | {mean('none'):.3f} | {mean('verdict'):.3f} | {mean('random'):.3f} | "
              f"{diff('verdict', 'none')} | {diff('random', 'none')} | {diff('verdict', 'random')} |")
    print(f"\n{len(rs)} seeds per arm; paired by seed, mean [95 % t-interval].")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/compare")
