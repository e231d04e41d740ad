"""Where did the verdict tell the twins apart? A diagnostic script outside the project's commands,
calling its functions, on the paired test's saved policies (the `policy/` folders, not committed:
remake them with the test's command). Run from the repository root:

    python results/smollm2/gcd-test/verdict-position/twins_at_verdict.py 0 1 2 \
        --extra anchor1-grpo+cls-oracle-h0-seed0

For each seed, on the coupling probe's 32 twin pairs (the same move, good in one state and flawed
in its near-identical twin), at the warm start and at the end of each arm:
- the twins' last-layer hidden states where the move is predicted (the probe's hidden_cos and
  hidden_cos_centred, recomputed: a check against summary.json), and at the verdict's position
  (after state + move + query, where the verdict word is predicted), raw and centred the same way;
- the verdict on the twins: its balanced accuracy over the 64 (state, move) twins, and the mean
  gap log p(good | good twin) - log p(good | flawed twin).
"""

import json
import os
import sys

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, ROOT)
import experiments as lab  # noqa: E402
import grpo_agentic as ga  # noqa: E402
import toy_env  # noqa: E402

TEST = os.path.join(ROOT, "results", "smollm2", "gcd-test")


def twin_cosines(hidden: torch.Tensor) -> tuple[float, float]:
    """(raw, centred) mean cosine of (pairs, 2, d) twins; centred as ga.coupling_probe does."""
    centred = hidden - hidden.mean(dim=(0, 1))
    raw = torch.cosine_similarity(hidden[:, 0], hidden[:, 1], dim=1).mean().item()
    cen = torch.cosine_similarity(centred[:, 0], centred[:, 1], dim=1).mean().item()
    return raw, cen


@torch.no_grad()
def verdict_position_states(model, tokenizer, twins, fmt, verdict) -> torch.Tensor:
    """Last-layer hidden state where the verdict word is predicted, (pairs, 2, d) float32."""
    states = []
    for obs_good, obs_flawed, action in twins:
        prompts = ga.no_history_prompts(tokenizer, [obs_good, obs_flawed], fmt)
        move = ga.action_ids_for(tokenizer, action, fmt)
        asked = [p + ga.with_turn_end(move, verdict) + verdict.query for p in prompts]
        ids, attention, positions = ga.model_inputs(model, asked, tokenizer.pad_token_id)
        out = model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        states.append(out.hidden_states[-1].float()[:, -1])  # (2, d), left-padded
    return torch.stack(states)


@torch.no_grad()
def verdict_on_twins(model, tokenizer, twins, fmt, verdict) -> tuple[float, float]:
    """(balanced accuracy, mean log p(good) gap good twin - flawed twin) of the verdict."""
    observations = [o for good, flawed, _ in twins for o in (good, flawed)]
    actions = [a for _, _, a in twins for _ in range(2)]
    prompts = ga.no_history_prompts(tokenizer, observations, fmt)
    moves = [ga.action_ids_for(tokenizer, a, fmt) for a in actions]
    logp = ga.verdict_logprobs(model, prompts, moves, verdict, tokenizer.pad_token_id)  # (2P, 2)
    labels = torch.tensor([ga.GOOD, ga.BAD] * len(twins))
    bacc = ga.balanced_accuracy(logp.argmax(dim=1), labels)
    good = logp[:, ga.GOOD].view(-1, 2)  # (P, 2): good twin, flawed twin
    return bacc, (good[:, 0] - good[:, 1]).mean().item()


def measure(model, tokenizer, s) -> dict:
    fmt, verdict = ga.toy_formats(tokenizer, s.chat)
    twins = []
    for good, flawed, action in toy_env.coupled_pairs("train", s.probe_pairs, s.data_seed):
        observe = [toy_env.GridWorld.from_string(x).observation() for x in (good, flawed)]
        twins.append((*observe, action))
    model.eval()
    at_move, _ = ga.twin_hidden_states(model, tokenizer, twins, fmt)
    at_verdict = verdict_position_states(model, tokenizer, twins, fmt, verdict)
    bacc, gap = verdict_on_twins(model, tokenizer, twins, fmt, verdict)
    move_raw, move_centred = twin_cosines(at_move)
    verdict_raw, verdict_centred = twin_cosines(at_verdict)
    return {
        "hidden_cos": move_raw,
        "hidden_cos_centred": move_centred,
        "verdict_pos_cos": verdict_raw,
        "verdict_pos_cos_centred": verdict_centred,
        "verdict_bacc_twins": bacc,
        "verdict_logp_good_gap": gap,
    }


def main(seeds: list[str], extra: list[str]) -> None:
    """extra: more finished runs of the test's folder, each measured at its end."""
    torch.set_num_threads(1)  # beside a running experiment on 2 cores: do not fight it for both
    rows = []
    for seed in seeds:
        grpo_dir = os.path.join(TEST, f"grpo-h0-seed{seed}")
        gcd_dir = os.path.join(TEST, f"grpo+cls-oracle-h0-seed{seed}")
        model, tokenizer, s, _ = lab.saved_policy(grpo_dir)
        start = torch.load(os.path.join(TEST, f"warm-start-h0-seed{seed}.pt"), map_location="cpu")
        model.load_state_dict(start["policy"])
        rows.append((seed, "warm start", measure(model, tokenizer, s), None))
        for name, run_dir in (("GRPO end", grpo_dir), ("GCD end", gcd_dir)):
            model, tokenizer, s, _ = lab.saved_policy(run_dir)
            with open(os.path.join(run_dir, "summary.json")) as f:
                logged = json.load(f)["end"]
            rows.append((seed, name, measure(model, tokenizer, s), logged))
    for run in extra:
        model, tokenizer, s, _ = lab.saved_policy(os.path.join(TEST, run))
        with open(os.path.join(TEST, run, "summary.json")) as f:
            logged = json.load(f)["end"]
        rows.append((s.seed, run, measure(model, tokenizer, s), logged))
    keys = list(rows[0][2])
    print("| seed | policy | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for seed, name, row, _ in rows:
        print(f"| {seed} | {name} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    print()
    for seed, name, row, logged in rows:
        if logged is not None:  # the recomputed probe against the run's own
            for k in ("hidden_cos", "hidden_cos_centred"):
                print(f"check seed {seed} {name} {k}: here {row[k]:.4f}, summary {logged[k]:.4f}")


if __name__ == "__main__":
    args = sys.argv[1:]
    cut = args.index("--extra") if "--extra" in args else len(args)
    main(args[:cut], args[cut + 1 :])
