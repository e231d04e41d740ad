"""Tests as documentation: hand-computed math, env rules, masking, batching, and CLI runs.

Run:  python -m pytest -q test_grpo_agentic.py      (about 2 minutes on 2 CPU cores)
"""
import json
import os
import random
import subprocess
import sys
from collections import deque

import numpy as np
import pytest
import torch

import grpo_agentic as ga
import toy_env

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--tiny-layers", "1", "--tiny-dim", "32", "--eval-tasks", "8", "--train-tasks", "16",
        "--tasks-per-iter", "4", "--group-size", "4", "--sft-steps", "5", "--sft-batch", "16", "--render-every", "0"]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "grpo_agentic.py"), *args], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout)


# ---- GRPO advantage: hand-computed values ----------------------------------------------------------

def test_advantage_hand_computed():
    # group 1: mean 0.5, population std 0.5 -> +-1.  group 2: mean 0.25, std sqrt(0.25*0.75)=0.4330
    adv = ga.grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]), eps=0.0)
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.75 / 0.4330127, -0.25 / 0.4330127, -0.25 / 0.4330127, -0.25 / 0.4330127]])
    assert torch.allclose(adv, expected, atol=1e-5)
    assert torch.allclose(adv.sum(dim=1), torch.zeros(2), atol=1e-6)  # zero mean within each group


@pytest.mark.parametrize("value", [0.0, 1.0, 0.3])
def test_equal_rewards_give_exactly_zero_never_nan(value):
    adv = ga.grpo_advantages(torch.full((3, 5), value))
    assert torch.equal(adv, torch.zeros(3, 5))


# ---- the environment ----------------------------------------------------------------------------

LAYOUT = "A.#\n..#\n#.G"


def test_transitions_walls_edges_goal():
    env = toy_env.GridWorld.from_string(LAYOUT)
    assert env.distance[env.start] == 4 and env.max_steps == 4 + toy_env.BUDGET_SLACK
    assert env.reset() == "A . #\n. . #\n# . G\naction:"
    _, r, done, info = env.step("up")              # the grid's edge counts as a wall
    assert env.pos == (0, 0) and (r, done, info["valid"], info["good"]) == (0.0, False, True, False)
    _, _, _, info = env.step("right")              # distance 4 -> 3
    assert env.pos == (0, 1) and info["good"]
    _, _, _, info = env.step("right")              # into the wall '#': stays, flawed
    assert env.pos == (0, 1) and not info["good"]
    env.step("down"), env.step("down")
    _, r, done, info = env.step(" Right\n")       # case and surrounding whitespace are forgiven
    assert (r, done, info["success"], env.pos) == (1.0, True, True, (2, 2))
    with pytest.raises(RuntimeError):
        env.step("up")


def test_budget_ends_episode_with_zero_reward():
    env = toy_env.GridWorld.from_string(LAYOUT, max_steps=4)  # exactly the shortest path: no slack
    for k in range(4):
        _, r, done, info = env.step("left")        # bumping the edge: a step spent, nothing gained
        assert r == 0.0 and done == (k == 3) and info["valid"] and not info["good"]
    with pytest.raises(ValueError, match="budget"):
        toy_env.GridWorld.from_string(LAYOUT, max_steps=3)


def brute_force_distance(env, pos):
    """Distance by exhaustive breadth-first search from `pos` itself (not the oracle's goal-side BFS)."""
    seen, frontier = {pos}, deque([(pos, 0)])
    while frontier:
        p, d = frontier.popleft()
        if p == env.goal:
            return d
        for a in toy_env.ACTIONS:
            q = env.next_pos(p, a)
            if q not in seen:
                seen.add(q)
                frontier.append((q, d + 1))
    return None


def test_oracle_labels_match_brute_force():
    for split in ("train", "held_out"):
        for layout in toy_env.sample_layouts(split, 20, seed=3):
            env = toy_env.GridWorld.from_string(layout)
            for pos in env.free_cells():
                d = brute_force_distance(env, pos)
                assert d == env.distance[pos]
                for a in toy_env.ACTIONS:
                    assert env.is_good(a, pos) == (brute_force_distance(env, env.next_pos(pos, a)) < d)


def test_splits_disjoint_deterministic_solvable():
    for seed in range(5):
        train = toy_env.sample_layouts("train", 200, seed)
        held = toy_env.sample_layouts("held_out", 200, seed)
        assert not set(train) & set(held)
        assert train == toy_env.sample_layouts("train", 200, seed)
        assert len(set(train)) == 200
        assert {toy_env.split_of(x) for x in train} == {"train"} and {toy_env.split_of(x) for x in held} == {"held_out"}
        for layout in train[:50] + held[:50]:
            env = toy_env.GridWorld.from_string(layout)
            assert env.distance[env.start] >= toy_env.MIN_START_DISTANCE
    # the held-out split is shifted: denser walls
    assert np.mean([x.count("#") for x in held]) > np.mean([x.count("#") for x in train]) + 2


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("   \n ", "empty"), (None, "empty"),
    ("A..\n.G", "ragged"), ("A.x\n..G", "unknown character 'x'"),
    ("...\n..G", "exactly one 'A'"), ("AA.\n..G", "exactly one 'A'"),
    ("A..\n...", "exactly one 'G'"), ("A.G\n..G", "exactly one 'G'"),
    ("A#.\n##G", "unreachable"),
])
def test_from_string_rejects_malformed_layouts(text, message):
    with pytest.raises(ValueError, match=message):
        toy_env.GridWorld.from_string(text)


def test_any_action_text_is_accepted():
    rng = random.Random(0)
    env = toy_env.GridWorld.from_string(LAYOUT, max_steps=10_000)
    garbage = ["", " ", "UPP", "up down", "\x00", "🙂", "ü" * 100_000, "left!", None, 42, b"up"]
    garbage += ["".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(30))) for _ in range(300)]
    for text in garbage:
        before = env.pos
        _, r, done, info = env.step(text)
        assert not info["valid"] and not info["good"] and env.pos == before and r == 0.0
    assert env.steps == len(garbage)


# ---- masks, batching, generation ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    s = ga.Settings(tiny_layers=1, tiny_dim=32, max_action_tokens=4)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    return s, model, tokenizer


def test_only_generated_action_tokens_carry_gradient(tiny):
    s, model, tokenizer = tiny
    layouts = toy_env.sample_layouts("train", 3, seed=0)
    moves, rewards, _ = ga.rollout(model, tokenizer, layouts, 2, s, generator=torch.Generator().manual_seed(0))
    moves = moves[:6]
    ids, attention, action_mask = ga.build_batch(moves, tokenizer.pad_token_id, "cpu")
    assert (action_mask.sum(1) == torch.tensor([len(m.action_ids) for m in moves], dtype=torch.float)).all()
    logp = ga.token_logprobs(model, ids, attention)
    logp.retain_grad()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    loss, _ = ga.grpo_loss(logp, logp.detach(), advantages, action_mask, clip_eps=0.2)
    loss.backward()
    assert (logp.grad[action_mask == 0] == 0).all()           # prompt and padding: no gradient
    assert (logp.grad[action_mask == 1] != 0).all()           # every generated token: gradient
    # the action tokens in the batch are exactly the sampled ids, not re-tokenised text
    for i, m in enumerate(moves):
        assert ids[i][action_mask[i] == 1].tolist() == m.action_ids


def test_padding_comes_from_the_mask_not_from_token_ids(tiny):
    s, model, tokenizer = tiny
    env = toy_env.GridWorld.from_string(LAYOUT)
    short = ga.Move(0, ga.encode_prompts(tokenizer, [env.observation()])[0], ga.action_ids_for(tokenizer, "up"), [], "", 1, 1)
    longer = ga.Move(1, short.prompt_ids + short.prompt_ids[:3], short.action_ids, [], "", 1, 1)
    ids, attention, mask = ga.build_batch([short, longer], tokenizer.pad_token_id, "cpu")
    scrambled = ids.clone()
    scrambled[attention == 0] = tokenizer.eos_token_id       # a pad id that looks like a real token
    a = ga.token_logprobs(model, ids, attention) * mask
    b = ga.token_logprobs(model, scrambled, attention) * mask
    assert torch.allclose(a, b, atol=1e-6)


def test_batched_rollout_matches_one_episode_at_a_time(tiny):
    """Greedy: the batched (left-padded, KV-cached) rollout plays exactly the episodes a one-by-one
    loop plays; sampled: the log-probs recorded while generating equal a fresh full forward pass."""
    s, model, tokenizer = tiny
    layouts = toy_env.sample_layouts("train", 4, seed=1) + toy_env.sample_layouts("held_out", 4, seed=1)
    batched, rewards, _ = ga.rollout(model, tokenizer, layouts, 1, s, greedy=True)
    for k, layout in enumerate(layouts):
        single, r, _ = ga.rollout(model, tokenizer, [layout], 1, s, greedy=True)
        mine = [m for m in batched if m.episode == k]
        assert [(m.prompt_ids, m.action_ids) for m in mine] == [(m.prompt_ids, m.action_ids) for m in single]
        assert float(r) == float(rewards[k])
    moves, _, _ = ga.rollout(model, tokenizer, layouts, 2, s, generator=torch.Generator().manual_seed(0))
    ids, attention, mask = ga.build_batch(moves, tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        recomputed = ga.token_logprobs(model, ids, attention)[mask == 1]
    recorded = torch.tensor([lp for m in moves for lp in m.sample_logps])
    assert torch.allclose(recomputed, recorded, atol=1e-4)


def test_clipped_loss_hand_computed():
    # one move, two action tokens, A = +1: ratios e^0.5 (clipped to 1.2) and e^-0.5 (not clipped)
    logp, old = torch.tensor([[0.0, 0.5, -0.5]]), torch.zeros(1, 3)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    loss, info = ga.grpo_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    assert abs(float(loss) - (-(1.2 + np.exp(-0.5)) / 2)) < 1e-6
    assert info["clip_frac"] == 1.0  # |ratio - 1| > eps for both tokens (0.649 and 0.393)
    loss, _ = ga.grpo_loss(logp, old, torch.tensor([-1.0]), mask, clip_eps=0.2)  # A < 0: min picks the clipped 0.8
    assert abs(float(loss) - (np.exp(0.5) + 0.8) / 2) < 1e-6
