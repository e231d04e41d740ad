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


# ---- the paper's analysis (Lemma 3.1, Theorem 3.2, gradient coupling) -------------------------------

@pytest.mark.parametrize("q, r", [(0.3, 0.4), (0.6, 0.2)])
def test_lemma_3_1_flawed_action_has_negative_expected_advantage(q, r):
    """Bandit: flawed action w.p. q; success prob p with the good action, p - r with the flawed one.
    With the group-mean baseline (which includes the sample itself) E[A * 1{flawed}] = (G-1)/G * q*r*(q-1)."""
    p, G, groups = 0.7, 8, 200_000
    gen = torch.Generator().manual_seed(0)
    flawed = torch.rand(groups, G, generator=gen) < q
    success_prob = torch.where(flawed, p - r, p)
    rewards = (torch.rand(groups, G, generator=gen) < success_prob).float()
    raw = ga.grpo_advantages(rewards, scale_by_std=False)
    expected = (G - 1) / G * q * r * (q - 1)
    assert abs(float((raw * flawed).mean()) - expected) < 0.1 * abs(expected)
    assert float((ga.grpo_advantages(rewards) * flawed).mean()) < 0          # the sign holds with std scaling
    assert float((raw[flawed] > 0).float().mean()) > 0.2                     # yet many flawed steps get A > 0


def test_squeezing_raises_the_likely_bad_action_but_bad_mass_falls():
    probs = torch.tensor([0.3, 0.5, 0.2])                # bad (pushed down), bad (most likely), good
    new = ga.squeezing_step(probs, action=0, advantage=-1.0, lr=0.5)
    assert new[1] > probs[1]                              # squeezing: the other bad action gains
    assert new[0] + new[1] < probs[0] + probs[1]          # total bad mass falls
    assert new[2] > probs[2]                              # the good action gains
    assert torch.allclose(new.sum(), torch.tensor(1.0))


def test_coupled_pairs_differ_in_one_cell_with_opposite_labels():
    for split in ("train", "held_out"):
        pairs = toy_env.coupled_pairs(split, 10, seed=2)
        assert len(pairs) == 10 and pairs == toy_env.coupled_pairs(split, 10, seed=2)
        for good, flawed, action in pairs:
            assert sum(a != b for a, b in zip(good, flawed)) == 1
            assert toy_env.GridWorld.from_string(good).is_good(action)
            assert not toy_env.GridWorld.from_string(flawed).is_good(action)


def test_coupling_probe_identical_states_and_first_order_agreement(tiny):
    s, model, tokenizer = tiny
    layout = toy_env.coupled_pairs("train", 1, seed=0)[0][0]
    action = toy_env.GridWorld.from_string(layout).good_actions()[0]
    same = ga.coupling_probe(model, tokenizer, [(layout, layout, action)], step_size=1e-4)
    assert abs(same["coupling_cos"] - 1) < 1e-5 and abs(same["hidden_cos"] - 1) < 1e-5
    result = ga.coupling_probe(model, tokenizer, toy_env.coupled_pairs("train", 8, seed=0), step_size=1e-4)
    assert np.sign(result["coupling_step"]) == np.sign(result["coupling_pred"])
    assert abs(result["coupling_step"] - result["coupling_pred"]) < 0.25 * abs(result["coupling_pred"])


def test_probes_leave_model_grads_and_optimizer_untouched(tiny):
    s, model, tokenizer = tiny
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    moves, _, _ = ga.rollout(model, tokenizer, toy_env.sample_layouts("train", 2, 0), 2, s, generator=torch.Generator().manual_seed(0))
    ga.grpo_update(model, tokenizer, moves, torch.linspace(-1, 1, len(moves)), optimizer, s)  # fills grads and Adam state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    adam = {k: v.clone() for k, v in optimizer.state[next(model.parameters())].items()}
    ga.coupling_probe(model, tokenizer, toy_env.coupled_pairs("train", 3, seed=0), step_size=1e-2)
    ga.flawed_mass(model, tokenizer, [(toy_env.GridWorld.from_string(LAYOUT).observation(), ["right", "down"])])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(v, optimizer.state[next(model.parameters())][k]) for k, v in adam.items())


# ---- the command line -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run_cli(*TINY, "--iters", "4", "--eval-every", "2", "--out-dir", str(out / "a"))
    return out, result


def test_cli_run_writes_metrics_summary_and_a_loadable_policy(cli_run):
    out, result = cli_run
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 3, 4]
    for key in ("success", "valid_frac", "adv_flawed_mean", "adv_good_mean", "flawed_pos_adv_frac", "flawed_frac"):
        assert key in rows[0]
    for key in ("p_flawed", "p_flawed_max", "coupling_cos", "coupling_step", "hidden_cos"):
        assert key in rows[1]
    summary = json.loads((out / "a" / "summary.json").read_text())
    for key in ("eval_train_success", "eval_held_out_success", "wall_seconds", "settings"):
        assert key in summary
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out / "a" / "policy")
    tokenizer = AutoTokenizer.from_pretrained(out / "a" / "policy")
    assert tokenizer.decode(ga.action_ids_for(tokenizer, "left"), skip_special_tokens=True) == "left"
    assert model.config.n_layer == 1
    again = run_cli("--eval-only", "--model", str(out / "a" / "policy"), "--eval-tasks", "8")
    assert again.returncode == 0 and "greedy success" in again.stdout


def test_same_seed_same_metrics_on_cpu(cli_run):
    out, first = cli_run
    second = run_cli(*TINY, "--iters", "4", "--eval-every", "2", "--out-dir", str(out / "b"))
    assert second.returncode == 0, second.stderr
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if not k.endswith("_s")} for l in path.read_text().splitlines()]
    assert strip(out / "a" / "metrics.jsonl") == strip(out / "b" / "metrics.jsonl")


@pytest.mark.parametrize("args, message", [
    (["--iters", "-1"], "--iters must be >= 1"),
    (["--group-size", "1"], "--group-size must be >= 2"),
    (["--device", "tpu"], "--device"),
    (["--model", "./no/such/model"], "no such file"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--iters", "ten"], "invalid int value"),
])
def test_bad_command_line_is_one_clear_line_and_exit_2(args, message, tmp_path):
    result = run_cli(*args, "--out-dir", str(tmp_path / "x"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # stopped before any work


def test_existing_run_is_never_overwritten(cli_run):
    out, _ = cli_run
    before = (out / "a" / "metrics.jsonl").read_text()
    result = run_cli(*TINY, "--iters", "1", "--out-dir", str(out / "a"))
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (out / "a" / "metrics.jsonl").read_text() == before


def test_non_finite_loss_stops_cleanly_and_keeps_outputs(tmp_path):
    # the KL term keeps every move in the update, so the absurd step happens even if all groups tie
    result = run_cli(*TINY, "--iters", "6", "--lr", "1e30", "--lr-warmup-iters", "0", "--kl-coef", "0.1", "--out-dir", str(tmp_path))
    assert result.returncode == 1 and "stopped" in result.stderr and "Traceback" not in result.stderr
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every line written before the stop is valid JSON


# ---- another tokenizer: actions span several tokens ---------------------------------------------------

def test_byte_level_bpe_model_trains_end_to_end(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    corpus = [toy_env.GridWorld.from_string(x).observation() for x in toy_env.sample_layouts("train", 50, 0)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus + ["up down left right"], vocab_size=300, min_frequency=1, special_tokens=["<|eos|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|eos|>")  # no pad token: eos is used
    assert any(len(ga.action_ids_for(tokenizer, a)) > 2 for a in toy_env.ACTIONS)  # some action is >1 token + eos
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    assert len(tokenizer(" " + ga.VERDICTS[1], add_special_tokens=False)["input_ids"]) > 1  # multi-token verdict
    s = ga.Settings(model=str(tmp_path / "m"), iters=2, train_tasks=8, eval_tasks=4, tasks_per_iter=2, group_size=2,
                    sft_steps=3, sft_batch=8, max_action_tokens=6, probe_pairs=2, render_every=0,
                    cls_coef=0.5, cls_labels="oracle")
    summary = ga.train(s, str(tmp_path), log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    model, tokenizer = summary["model"], summary["tokenizer"]  # verdict words span several tokens here
    moves, labels = cls_moves(tokenizer, toy_env.coupled_pairs("train", 2, seed=0))
    assert ga.verdict_logits(model, tokenizer, moves).shape == (4, 2)
    assert torch.isfinite(ga.classification_loss(model, tokenizer, moves, labels))
    assert 0.0 <= summary["eval_train_success"] <= 1.0


# ---- it learns -------------------------------------------------------------------------------------

def test_short_seeded_run_improves_over_the_untrained_policy(tmp_path):
    s = ga.Settings(iters=40, train_tasks=16, eval_tasks=16, tasks_per_iter=8, sft_steps=40, render_every=0,
                    eval_every=40, probe_pairs=2, tiny_layers=2, tiny_dim=64)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    untrained = ga.evaluate(model, tokenizer, ga.task_sets(s)[1]["train"], s)["success"]
    summary = ga.train(s, str(tmp_path), log=lambda *_: None)
    assert summary["eval_train_success"] >= untrained + 0.4


# ---- the classification head (GCD) ------------------------------------------------------------------

def test_classification_labels_advantage_sign_and_oracle():
    moves = [ga.Move(0, [], [], [], "", True, good) for good in (True, False, True, False)]
    advantages = torch.tensor([0.7, -0.2, 0.0, 0.0])
    assert ga.classification_labels(moves, advantages, "advantage").tolist() == [1, 0, -1, -1]  # A = 0: no label
    assert ga.classification_labels(moves, advantages, "oracle").tolist() == [1, 0, 1, 0]


def cls_moves(tokenizer, pairs):
    """Both states of each coupled pair with the same action: good in the first, flawed in the second."""
    moves = []
    for good_layout, flawed_layout, action in pairs:
        for layout, label in ((good_layout, True), (flawed_layout, False)):
            prompt = ga.encode_prompts(tokenizer, [toy_env.GridWorld.from_string(layout).observation()])[0]
            moves.append(ga.Move(0, prompt, ga.action_ids_for(tokenizer, action), [], action, True, label))
    return moves, torch.tensor([int(m.good) for m in moves])


def test_classification_adds_no_parameters_and_its_gradient_reaches_the_trunk():
    s = ga.Settings(tiny_layers=2, tiny_dim=32)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    count = sum(p.numel() for p in model.parameters())
    moves, labels = cls_moves(tokenizer, toy_env.coupled_pairs("train", 4, seed=0))
    ga.classification_loss(model, tokenizer, moves, labels).backward()
    assert sum(p.numel() for p in model.parameters()) == count   # the verdict is read off the LM head
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0   # first block: shared trunk
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_classification_separates_good_and_bad_representations():
    """The mechanism GCD relies on: learning to tell (s_good, a) from (s_flawed, a) -- prompts one cell
    apart -- pushes their last-layer hidden states (where the verdict is read) apart."""
    torch.manual_seed(0)
    s = ga.Settings(tiny_layers=2, tiny_dim=64)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    moves, labels = cls_moves(tokenizer, toy_env.coupled_pairs("train", 8, seed=0))
    query = tokenizer(ga.VERDICT_QUERY, add_special_tokens=False)["input_ids"]

    def pair_cosine():
        seqs = [ga.Move(0, m.prompt_ids + m.action_ids + query, [], [], "", True, True) for m in moves]
        ids, attention, _ = ga.build_batch(seqs, tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
        last = h[torch.arange(len(seqs)), attention.sum(1) - 1]                  # (2 * pairs, d)
        return float(torch.nn.functional.cosine_similarity(last[0::2], last[1::2], dim=1).mean())

    before = pair_cosine()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        optimizer.zero_grad()
        ga.classification_loss(model, tokenizer, moves, labels).backward()
        optimizer.step()
    accuracy = float(((ga.verdict_logits(model, tokenizer, moves).argmax(1) == 0).long() == labels).float().mean())
    after = pair_cosine()
    assert accuracy == 1.0, accuracy
    assert before > 0.9 and after < before - 0.5, (before, after)  # measured here: 0.993 -> -0.45
