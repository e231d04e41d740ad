"""The lab beside the reference: instruments, arms over seeds and regimes, paired intervals, tables.

    python experiments.py run --out-dir results/default          # one run with every instrument
    python experiments.py compare --out-dir results/compare-llama --tiny-arch llama
                                              # 3 arms x 2 regimes (H = 0, 2) x 5 seeds: 30 runs
    python experiments.py between results/compare-gpt2 results/compare-llama   # same runs, 2 models
    python experiments.py plot results/default                # curves.png (needs matplotlib)
    python experiments.py plot RUN_DIR RUN_DIR --out both.png  # two runs' curves overlaid
    python experiments.py plot results/compare-llama          # compare.png: arms' means
    python experiments.py self-check-control results/compare-llama   # verdict vs a coin
    python experiments.py probe-baselines results/default     # what the coupling probe reads
    python experiments.py label-noise results/default         # advantage labels vs the oracle
    python experiments.py bump-memory results/compare-llama  # what memory of bumps is worth
    python experiments.py rollout-speed [old/grpo_agentic.py]  # decisions/s at H = 0, 2, longest
    python experiments.py update-cost [--model DIR] [--version old/grpo_agentic.py]  # one update
    python experiments.py gain RUN_DIR [OTHER_RUN_DIR]   # success before/after, layout by layout
    python experiments.py shared-head MODEL   # a chat model's rollout, update: head shared or not

The instruments reach grpo_agentic.train through its extension points: probes that add columns
to every evaluation (how held-out episodes fail, the self-check, flawed mass, the recovery probe),
GiGPO's step credit, and the oracle's labels for the classification loss. `run` takes every flag
of grpo_agentic.py and the lab's own (--cls-labels, --step-credit-coef, --gamma, --self-check);
with none of the lab's flags it trains exactly as `python grpo_agentic.py`, with more columns.

`compare` trains every arm in every regime on every seed with the same budget. Arms (--arms):
GRPO, GRPO + the actor's own classification (GCD) with oracle labels, GiGPO (and GCD with
advantage labels, on request). Regimes (--histories): the --history of every arm. A seed fixes the
initialisation, the rollouts and the layouts (train and held-out sets are drawn with the seed as
their data seed), so the arms of one regime and seed share everything up to the warm start, which
is made once per regime and seed and reused. Differences between arms are paired by seed within a
regime, and differences between regimes by arm and seed, with 95 % Student-t intervals. The flags
of grpo_agentic.py apply to every run (e.g. --iters 50, --tiny-arch gpt2), except those the
comparison sets per run (--seed, --data-seed, --history, --cls-coef, --cls-warmup-steps): use
--seeds, --histories, --gcd-coef, --gcd-warmup-steps, --gigpo-coef, --self-check-tries. With one
worker the runs go seed by seed (a seed's arms finish together); with several, arm by arm.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

import grpo_agentic as ga
import toy_env

# ---- Statistics ---------------------------------------------------------------------------------


def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` degrees of freedom, by bisection on its
    CDF, which is integrated numerically (Simpson's rule) from the density

        f(t) = c * (1 + t^2 / df)^(-(df + 1) / 2),
        c    = Gamma((df + 1) / 2) / (sqrt(df * pi) * Gamma(df / 2))

    >>> round(student_t_quantile(0.975, 4), 3), round(student_t_quantile(0.975, 10), 3)
    (2.776, 2.228)
    """
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 4001)  # an even number of intervals for Simpson's rule
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(t**2 / df))
        h = x / 4000
        integral = h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum())
        integral += h / 3 * 2 * density[2:-1:2].sum()
        return 0.5 + integral

    low, high = 0.0, 1000.0
    for _ in range(60):
        middle = (low + high) / 2
        if cdf(middle) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def paired_interval(diffs: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-seed paired differences and its 95 % t-interval,

        mean +- t_{0.975, n-1} * sd(diffs, ddof=1) / sqrt(n)

    >>> [round(x, 3) for x in paired_interval([0.1, 0.2, 0.3])]
    [0.2, -0.048, 0.448]
    """
    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return float(d.mean()), math.nan, math.nan
    half = student_t_quantile(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def interval_decimals(mean: float, half_width: float) -> int:
    """Decimals that show two digits of an interval's half-width (of its mean without one):
    3, and more for a small difference, such as the twins' hidden cosines of a pretrained LM,
    which differ in the fourth decimal (at most 6).

    >>> interval_decimals(0.2, 0.25), interval_decimals(0.0002, 0.00035), interval_decimals(0, 0)
    (3, 5, 3)
    """
    visible = 5e-7  # below this, 6 decimals show nothing: seeds that agree to rounding
    size = abs(half_width) if abs(half_width) >= visible else abs(mean)  # nan: False
    if not size >= visible:  # also nan
        return 3
    return min(6, max(3, 1 - math.floor(math.log10(size))))


def show_interval(diffs: list[float]) -> str:
    mean, low, high = paired_interval(diffs)
    d = interval_decimals(mean, high - mean)
    return f"{mean:+.{d}f} [{low:+.{d}f}, {high:+.{d}f}]"


# ---- Instruments: what a lab run adds to grpo_agentic's, through train()'s extension points ----
def step_returns(episodes: list[int], episode_rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return from each move on, (N,), for moves listed in the order they were played
    and an outcome reward that arrives after an episode's last move:

        R_i = gamma^(moves of the same episode after i) * r_episode(i)

    >>> step_returns([0, 1, 0, 0], torch.tensor([1.0, 0.0]), gamma=0.5)  # episode 0: 3 moves, won
    tensor([0.2500, 0.0000, 0.5000, 1.0000])
    """
    after = [episodes[i + 1 :].count(e) for i, e in enumerate(episodes)]
    return episode_rewards[episodes] * gamma ** torch.tensor(after, dtype=torch.float)


def gigpo_step_advantages(
    anchors: list, returns: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GiGPO's step-level advantage (Feng et al., 2025, arXiv 2505.10978), (N,) -> (N,). Moves with
    the same anchor -- the same task and the same observation, in any of that task's G episodes --
    form a step group, and each move's step return is compared within it, as grpo_advantages does:

        A_step_i = (R_i - mean_{j in group(i)} R_j) / (std_{j in group(i)} R_j + eps)

    A group of one, or of equal returns, gets 0. Two visits of one state, R = 1.0 (straight on)
    and 0.81 (two moves more to the goal), and a state visited once:

    >>> gigpo_step_advantages([("t", "s"), ("t", "s"), ("t", "u")], torch.tensor([1.0, 0.81, 0.9]))
    tensor([ 1.0000, -1.0000,  0.0000])
    """
    groups: dict = {}
    for i, key in enumerate(anchors):
        groups.setdefault(key, []).append(i)
    step_adv = torch.zeros_like(returns)
    for members in groups.values():
        step_adv[members] = ga.grpo_advantages(returns[members][None], scale_by_std, eps)[0]
    return step_adv


def step_anchors(episodes: list[int], observations: list[list[int]], group_size: int) -> list:
    """GiGPO's anchor of each move: (task, the observation the agent sees now), history left out,
    as verl-agent does. Keyed on the whole prompt, two moves with different pasts would never share
    a group, and with history step credit would silently vanish.

    >>> step_anchors([0, 1, 2], [[7, 8], [7, 8], [7, 8]], group_size=2)
    [(0, (7, 8)), (0, (7, 8)), (1, (7, 8))]
    """
    if not all(observations):  # an empty key would put every move of a task into one group
        raise ValueError("step_anchors needs each move's observation ids (Move.observation_ids)")
    return [(e // group_size, tuple(ids)) for e, ids in zip(episodes, observations)]


def gigpo_credit(coef: float, gamma: float, group_size: int, scale_by_std: bool = True):
    """A credit function for ga.train: A_i = A_episode[e(i)] + coef * A_step_i (GiGPO; coef = 1
    in its paper), the step advantage over discounted step returns in (task, observation) groups."""

    def credit(rewards: torch.Tensor, moves: list) -> torch.Tensor:
        episodes = [m.episode for m in moves]
        anchors = step_anchors(episodes, [m.observation_ids for m in moves], group_size)
        returns = step_returns(episodes, rewards.flatten(), gamma)  # (N,)
        step_adv = gigpo_step_advantages(anchors, returns, scale_by_std)  # (N,)
        return ga.move_advantages(rewards, episodes, scale_by_std) + coef * step_adv

    return credit


def oracle_labelled_pairs(moves: list, advantages: torch.Tensor, tokenizer, chat: bool = False):
    """A labeller for ga.train, the upper bound only a toy allows: all 4 moves (in the action
    format) at every distinct prompt visited, labelled by the oracle (1 = good, 0 = bad):
    (prompts, actions, labels). With history a prompt is a (history, observation) pair: the verdict
    is read in the context the move was made in, and a cell reached along several paths appears
    once per path. `advantages` is not used; `chat`: the moves in the chat format."""
    fmt, _ = ga.toy_formats(tokenizer, chat)
    states = {tuple(m.prompt_ids): m.info["good_actions"] for m in moves}  # distinct visited states
    pairs = [(state, a) for state in states for a in toy_env.ACTIONS]
    prompts = [list(state) for state, _ in pairs]
    actions = [ga.action_ids_for(tokenizer, a, fmt) for _, a in pairs]
    labels = torch.tensor([int(a in states[state]) for state, a in pairs], dtype=torch.long)
    return prompts, actions, labels


def self_checking(judge, tries: int):
    """A sampler with generate_actions' signature for ga.rollout: the self-check. A move that
    judge(prompts, actions) -> [ok, ...] rejects is resampled (temperature sampling, never greedy)
    up to `tries` times; the last sample stands; an accepted move is never judged again."""

    def sample(model, tokenizer, prompts, max_tokens, temperature, greedy, generator):
        action_ids, logps, texts = ga.generate_actions(
            model, tokenizer, prompts, max_tokens, temperature, greedy, generator
        )
        pending = list(range(len(prompts)))  # not yet accepted by the judge
        for _ in range(tries):
            verdicts = judge([prompts[k] for k in pending], [action_ids[k] for k in pending])
            pending = [k for k, ok in zip(pending, verdicts) if not ok]
            if not pending:
                break
            redo = ga.generate_actions(
                model,
                tokenizer,
                [prompts[k] for k in pending],
                max_tokens,
                temperature,
                False,
                generator,
            )
            for k, a, lp, text in zip(pending, *redo):
                action_ids[k], logps[k], texts[k] = a, lp, text
        return action_ids, logps, texts

    return sample


FAILURE_KINDS = ("bump_toward", "detour_toward", "away", "off_format")


def flaw_kind(move, env: toy_env.GridWorld) -> str:
    """Which of FAILURE_KINDS a move the oracle calls flawed is; `env` is its episode's (walls and
    goal). Only meaningful for flawed moves: a good detour move would come out as "away"."""
    if move.action is None:
        return "off_format"
    cell = move.info["cell"]
    toward = env.heads_for_goal(move.action, cell)
    bumped = env.next_pos(cell, move.action) == cell
    if toward and bumped:
        return "bump_toward"
    return "detour_toward" if toward else "away"


def failure_anatomy(moves: list, envs: list[toy_env.GridWorld]) -> dict:
    """How episodes fail, and whether the agent repeats a bump (oracle labels: diagnostics only).

    fail_<kind>        share of the failed episodes whose first flawed move is of that kind:
                       bump_toward   a bump into a wall in the goal's direction, as the crow flies
                                     (the coupled error: without that wall the move would
                                     usually be good)
                       detour_toward a step toward the goal where a wall forces a detour
                       away          any other flawed move: a step, or a bump, away from the goal
                       off_format    text that is not one of the four moves
    repeat_after_bump  over bumps followed by another move of the same episode, the share of next
                       moves with the same ids. 1.0 by construction for a greedy policy without
                       history: after a bump it reads the same prompt again.
    A share of nothing (no failure, no bump) is NaN."""
    by_episode: dict[int, list] = {}
    for m in moves:  # in the order played
        by_episode.setdefault(m.episode, []).append(m)
    kinds, repeats = [], []
    for episode, played in by_episode.items():
        env = envs[episode]
        if env.pos != env.goal:
            kinds.append(flaw_kind(next(m for m in played if not m.info["good"]), env))
        for move, after in zip(played, played[1:]):
            cell = move.info["cell"]
            if move.action is not None and env.next_pos(cell, move.action) == cell:
                repeats.append(after.action_ids == move.action_ids)
    row = {
        f"fail_{kind}": kinds.count(kind) / len(kinds) if kinds else math.nan
        for kind in FAILURE_KINDS
    }
    row["repeat_after_bump"] = float(np.mean(repeats)) if repeats else math.nan
    return row


@torch.no_grad()
def flawed_mass(model, tokenizer, probe: list[tuple[str, list[str]]], chat: bool = False) -> dict:
    """Theorem 3.2 checked on fixed probe states (observation, good moves):

    p_flawed     = mean_s (1 - sum_{a good} pi(a|s))   all mass not on a good move, off-format too
    p_flawed_max = mean_s max_{a flawed} pi(a|s)        the single most likely flawed move"""
    observations = [o for o, _ in probe for _ in toy_env.ACTIONS]
    moves = list(toy_env.ACTIONS) * len(probe)
    fmt, _ = ga.toy_formats(tokenizer, chat)
    logps = ga.text_action_logprobs(model, tokenizer, observations, moves, fmt)  # (S * 4,)
    p = logps.exp().view(len(probe), -1)  # (S, 4)
    good = [[a in g for a in toy_env.ACTIONS] for _, g in probe]
    good = torch.tensor(good, device=p.device)  # (S, 4)
    return {
        "p_flawed": float((1 - (p * good).sum(1)).mean()),
        "p_flawed_max": float(p.masked_fill(good, 0).max(1).values.mean()),
    }


@functools.lru_cache(maxsize=8)
def bump_states(split: str, n: int, seed: int) -> tuple[tuple[str, str, tuple], ...]:
    """Up to `n` (observation, move, good moves) where the move bumps into a wall in the goal's
    direction: the flawed twins of toy_env.coupled_pairs. Cached: measured at every evaluation."""
    bumps = []
    for _, flawed_layout, move in toy_env.coupled_pairs(split, n, seed):
        env = toy_env.GridWorld.from_string(flawed_layout)
        if env.heads_for_goal(move):
            bumps.append((env.observation(), move, tuple(env.good_actions())))
    return tuple(bumps)


def after_bump_prompts(
    tokenizer, bumps: list[tuple[str, str]], history: int, chat: bool = False
) -> list[list[int]]:
    """Prompts right after a bump, one per (observation, move) pair where the move bumps into a
    wall: that observation and that move as the last turn, then the same observation again."""
    fmt, _ = ga.toy_formats(tokenizer, chat)
    seen = ga.encode_observations(tokenizer, [o for o, _ in bumps])
    written = [ga.action_ids_for(tokenizer, a, fmt) for _, a in bumps]
    return [ga.history_prompt(fmt, [(o, a)], o, history) for o, a in zip(seen, written)]


@torch.no_grad()
def repeat_probability(
    model, tokenizer, bumps: list[tuple[str, str]], history: int, chat: bool = False
) -> float:
    """The recovery probe: over states right after a bump (after_bump_prompts), the mean
    probability of bumping again,

        p_repeat = mean pi(move | [observation, move] as the last turn, then the same observation)

    With history = 0 the prompt is the observation alone: nothing tells the policy it just bumped,
    and p_repeat is the probability of the move at that state."""
    prompts = after_bump_prompts(tokenizer, bumps, history, chat)
    fmt, _ = ga.toy_formats(tokenizer, chat)
    written = [ga.action_ids_for(tokenizer, a, fmt) for _, a in bumps]
    logps = ga.action_logprobs(model, prompts, written, tokenizer.pad_token_id, 1.0)  # (S,)
    return logps.exp().mean().item()


@dataclass
class LabRun:
    """What a lab run sets on top of grpo_agentic.Settings (the same names those flags had there,
    so a run's settings read the same before and after they moved)."""

    cls_labels: str = field(
        default="advantage",
        metadata={
            "help": "labels of the classification loss: 'advantage' (the sign of each A != 0 "
            "move's advantage) or 'oracle' (every move at every visited state)"
        },
    )
    step_credit_coef: float = field(
        default=0.0, metadata={"help": "w in A = A_episode + w * A_step: GiGPO (0 = plain GRPO)"}
    )
    gamma: float = field(default=0.95, metadata={"help": "discount of GiGPO's step returns"})
    self_check: int = field(
        default=0,
        metadata={
            "help": "K > 0: at the end, also evaluate held-out layouts with a self-check "
            "(a move the actor's verdict calls bad is resampled, up to K times)"
        },
    )

    def __post_init__(self):
        if self.cls_labels not in ("advantage", "oracle"):
            raise ValueError(
                f"--cls-labels must be 'advantage' or 'oracle', got {self.cls_labels!r}"
            )
        for name in ("step_credit_coef", "gamma", "self_check"):
            if not getattr(self, name) >= 0:  # NaN too
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be >= 0, got {getattr(self, name)!r}")


def lab_probes(s: ga.Settings, self_check: int) -> list:
    """The lab's probes for ga.measure: how held-out episodes fail, the self-check (at the end
    only: costly, and final), flawed mass at train start states, and the recovery probe."""
    _, eval_sets = ga.task_sets(s.train_tasks, s.eval_tasks, s.data_seed)
    train_envs = [toy_env.GridWorld.from_string(x) for x in eval_sets["train"][: s.probe_states]]
    start_states = [(env.observation(), env.good_actions()) for env in train_envs]

    def anatomy(model, tokenizer, it, played):
        moves, _, envs = played["held_out"]
        return failure_anatomy(moves, envs)

    def self_check_probe(model, tokenizer, it, played):
        if not self_check or it != s.iters:
            return {}

        _, verdict = ga.toy_formats(tokenizer, s.chat)
        pad = tokenizer.pad_token_id

        def judge(prompts, actions):
            return ga.verdict_is_good(model, prompts, actions, verdict, pad).tolist()

        sample = self_checking(judge, self_check)
        _, rewards, _ = ga.greedy_episodes(model, tokenizer, eval_sets["held_out"], s, sample)
        return {"eval_held_out_success_self_check": rewards.mean().item()}

    def mass(model, tokenizer, it, played):
        return flawed_mass(model, tokenizer, start_states, s.chat)

    def recovery(model, tokenizer, it, played):
        bumps = bump_states("held_out", s.probe_states, s.data_seed)  # (observation, move, good)
        pairs = [b[:2] for b in bumps]
        prompts = after_bump_prompts(tokenizer, pairs, s.history, s.chat)
        good_moves = [good for _, _, good in bumps]
        fmt, verdict = ga.toy_formats(tokenizer, s.chat)
        return {
            "p_repeat_bump": repeat_probability(model, tokenizer, pairs, s.history, s.chat),
            "cls_bacc_after_bump": ga.classification_bacc(
                model, tokenizer, prompts, good_moves, fmt, verdict
            ),
        }

    twins = []  # the coupling probe's pairs (ga.measure), as texts
    for good, flawed, action in toy_env.coupled_pairs("train", s.probe_pairs, s.data_seed):
        observe = [toy_env.GridWorld.from_string(x).observation() for x in (good, flawed)]
        twins.append((*observe, action))

    def twin_spread(model, tokenizer, it, played):
        """95 % half-widths, over the pairs, of the coupling probe's hidden_cos and _centred."""
        fmt, _ = ga.toy_formats(tokenizer, s.chat)
        states, _ = ga.twin_hidden_states(model, tokenizer, twins, fmt)  # (pairs, 2, d)
        centred = states - states.mean(dim=(0, 1))  # as ga.coupling_probe centres them
        spread = {}
        for name, hidden in (("hidden_cos", states), ("hidden_cos_centred", centred)):
            per_pair = torch.cosine_similarity(hidden[:, 0], hidden[:, 1], dim=1).tolist()
            mean, _, high = paired_interval(per_pair)  # the t-interval of a mean, here over pairs
            spread[f"{name}_ci"] = high - mean
        return spread

    return [anatomy, self_check_probe, mass, recovery, twin_spread]


def solved_recorder(path: str):
    """A probe that appends, at each evaluation, which layouts the greedy policy solved (1/0, in
    the eval sets' order) to a JSON-lines file: the paired data of `experiments.py gain`."""
    open(path, "w").close()  # a run starts the file afresh

    def record(model, tokenizer, it, played):
        solved = {split: rewards.tolist() for split, (_, rewards, _) in played.items()}
        with open(path, "a") as f:
            f.write(json.dumps({"iter": it, **solved}) + "\n")
        return {}

    return record


def lab_run(s: ga.Settings, extra: LabRun, out_dir: str, log=print, start=None) -> dict:
    """ga.run with the lab's probes, GiGPO's credit and the oracle's labels as `extra` asks;
    solved.jsonl records each evaluation's solved layouts; lab.json beside settings.json records
    `extra` once the run is done."""
    credit = None
    if extra.step_credit_coef:
        credit = gigpo_credit(extra.step_credit_coef, extra.gamma, s.group_size, s.scale_by_std)
    labeller = None
    if extra.cls_labels == "oracle":
        labeller = functools.partial(oracle_labelled_pairs, chat=s.chat)
    os.makedirs(out_dir, exist_ok=True)
    probes = [
        *lab_probes(s, extra.self_check),
        solved_recorder(os.path.join(out_dir, "solved.jsonl")),
    ]
    summary = ga.run(s, out_dir, log, start=start, probes=probes, credit=credit, labeller=labeller)
    with open(os.path.join(out_dir, "lab.json"), "w") as f:  # with summary.json: a finished run
        json.dump(dataclasses.asdict(extra), f, indent=1)
    return summary


# ---- The comparison -----------------------------------------------------------------------------
ARMS = ("grpo", "grpo+cls-advantage", "grpo+cls-oracle", "gigpo")  # "grpo" is the baseline
SET_PER_ARM = ("seed", "data_seed", "cls_coef", "cls_warmup_steps", "history")  # LabRun: all
NOT_PART_OF_A_RUN = ("out_dir", "overwrite", "device", "model_cache")  # where and how, not what
WARM_START_FIELDS = (  # everything the supervised warm-up depends on
    "seed",
    "data_seed",
    "train_tasks",
    "sft_steps",
    "sft_lr",
    "sft_batch",
    "model",
    "tiny_arch",
    "tiny_layers",
    "tiny_dim",
    "max_action_tokens",
    "history",
    "chat",
)
CREDIT = ("adv_flawed_mean", "adv_abs_mean", "adv_flawed_rel", "flawed_pos_adv_frac")
CHAIN = (
    "cls_bacc_train",
    "cls_bacc_held_out",
    "cls_bacc_after_bump",
    "hidden_cos",
    "hidden_cos_move",
    "hidden_cos_centred",
    "coupling_cos",
    "coupling_ratio",
    "p_flawed",
)
SUCCESS = ("eval_train_success", "eval_held_out_success", "eval_held_out_success_self_check")
ANATOMY = tuple(f"fail_{kind}" for kind in FAILURE_KINDS) + (
    "repeat_after_bump",
    "p_repeat_bump",
)
# At the start of RL, after an arm's own warm-up (the verdict's): the same policy in every arm?
START = SUCCESS[:2] + (
    "cls_bacc_held_out",
    "hidden_cos_centred",
    "coupling_cos",
    "p_repeat_bump",
    "p_flawed",
)
TABLES = (  # (title, metrics, read at the "start" of RL or after it, GRPO's own change shown?)
    ("The start of RL (after each arm's own warm-up)", START, "start", False),
    ("Credit: what the advantage says about flawed moves (all iterations)", CREDIT, "end", False),
    ("The chain, link by link (end of training)", CHAIN, "end", True),
    ("Success, greedy, and with the self-check (end of training)", SUCCESS, "end", True),
    ("How held-out episodes fail, recovery after a bump (end of training)", ANATOMY, "end", True),
)
BETWEEN = SUCCESS[:2] + ANATOMY + CHAIN  # compared between regimes, arm by arm
DECIMALS = {  # a pretrained LM's twins sit at hidden cosines 0.9994-1.0000: 3 decimals hide them
    "hidden_cos": 4,
    "hidden_cos_ci": 4,
    "hidden_cos_move": 4,
}
PER_SEED = (  # the chain's links, each seed's value (hidden_cos*_ci: its spread over the pairs)
    "cls_bacc_held_out",
    "hidden_cos",
    "hidden_cos_ci",
    "hidden_cos_centred",
    "hidden_cos_centred_ci",
    "coupling_cos",
    "p_repeat_bump",
    "p_flawed",
    "eval_train_success",
    "eval_held_out_success",
)


@dataclass
class Lab:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "seeds"})
    arms: list[str] = field(
        default_factory=lambda: ["grpo", "grpo+cls-oracle", "gigpo"],
        metadata={"help": f"arms, 'grpo' first (the baseline); any of {', '.join(ARMS)}"},
    )
    histories: list[int] = field(
        default_factory=lambda: [0, 2],
        metadata={"help": "regimes: --history of every arm; differences to the first are paired"},
    )
    workers: int = field(
        default=2, metadata={"help": "runs at once, each in its own process (1: in this one)"}
    )
    gcd_coef: float = field(default=0.5, metadata={"help": "--cls-coef of the two GCD arms"})
    gcd_warmup_steps: int = field(
        default=0, metadata={"help": "--cls-warmup-steps of the two GCD arms (the verdict's own)"}
    )
    gigpo_coef: float = field(default=1.0, metadata={"help": "--step-credit-coef of GiGPO"})
    self_check_tries: int = field(
        default=3, metadata={"help": "K of every arm's self-check (0: no self-check)"}
    )
    resume: bool = field(
        default=False,
        metadata={"help": "go on with an --out-dir that holds runs: finished ones are read back"},
    )

    def __post_init__(self):
        distinct = len(set(self.seeds)) == len(self.seeds)
        if not self.seeds or any(x < 0 for x in self.seeds) or not distinct:
            raise ValueError(f"--seeds must be distinct integers >= 0, got {self.seeds}")
        known = all(arm in ARMS for arm in self.arms) and len(set(self.arms)) == len(self.arms)
        if not self.arms or self.arms[0] != "grpo" or not known:
            raise ValueError(f"--arms must be distinct arms of {ARMS}, 'grpo' first")
        regimes = self.histories
        if not regimes or any(h < 0 for h in regimes) or len(set(regimes)) != len(regimes):
            raise ValueError(f"--histories must be distinct integers >= 0, got {regimes}")
        if self.gcd_warmup_steps < 0:
            raise ValueError(f"--gcd-warmup-steps must be >= 0, got {self.gcd_warmup_steps}")
        if self.workers < 1 or self.self_check_tries < 0:
            raise ValueError("--workers must be >= 1 and --self-check-tries >= 0")
        if not (self.gcd_coef > 0 and self.gigpo_coef > 0):
            raise ValueError("--gcd-coef and --gigpo-coef must be > 0")


def arm_settings(arm: str, lab: Lab) -> tuple[dict, LabRun]:
    """What makes an arm, on top of the settings every arm shares: (Settings fields, LabRun)."""
    tries = lab.self_check_tries
    gcd = {"cls_coef": lab.gcd_coef, "cls_warmup_steps": lab.gcd_warmup_steps}
    return {
        "grpo": ({}, LabRun(self_check=tries)),
        "grpo+cls-advantage": (gcd, LabRun(self_check=tries)),
        "grpo+cls-oracle": (gcd, LabRun(cls_labels="oracle", self_check=tries)),
        "gigpo": ({}, LabRun(step_credit_coef=lab.gigpo_coef, self_check=tries)),
    }[arm]


def run_name(arm: str, history: int, seed: int) -> str:
    return f"{arm}-h{history}-seed{seed}"


def job_settings(
    s: ga.Settings, lab: Lab, arm: str, history: int, seed: int, out_dir: str
) -> tuple[ga.Settings, LabRun]:
    """The settings of one (arm, history, seed) run: the seed also draws the layouts."""
    changes, extra = arm_settings(arm, lab)
    job = dataclasses.replace(
        s,
        seed=seed,
        data_seed=seed,
        history=history,
        render_every=0,
        out_dir=os.path.join(out_dir, run_name(arm, history, seed)),
        **changes,
    )
    return job, extra


def check_shared(s: ga.Settings) -> None:
    """The comparison sets these per arm and seed; a flag for them would be silently ignored."""
    for f in dataclasses.fields(ga.Settings):
        if f.name in SET_PER_ARM and getattr(s, f.name) != f.default:
            flag = f.name.replace("_", "-")
            raise ValueError(
                f"--{flag} is set per arm by the comparison; use --seeds, --histories, "
                "--gcd-coef or --gcd-warmup-steps"
            )


VERDICT_WARMUP_ONLY = ("cls_lr", "cls_warmup_states", "cls_anchor")  # read by its warm-up alone


def outcome_fields(settings: dict, keep: tuple | None = None) -> dict:
    """The fields of a settings dict that decide a run's outcome (or only those in `keep`).
    Without a verdict warm-up its flags decide nothing: a GRPO arm made before one of them
    existed is the same run."""
    unread = NOT_PART_OF_A_RUN
    if not settings.get("cls_warmup_steps"):
        unread += VERDICT_WARMUP_ONLY
    return {k: v for k, v in settings.items() if k not in unread and (keep is None or k in keep)}


def differences(wanted: dict, found: dict) -> str:
    keys = sorted(set(wanted) | set(found))
    return ", ".join(
        f"{k} {wanted.get(k)!r} here, {found.get(k)!r} there"
        for k in keys
        if wanted.get(k) != found.get(k)
    )


AS_BEFORE_THEIR_FLAGS = {  # what a run made before each of these flags existed trained as
    "chat": False,  # plain prompts
    "cls_warmup_steps": 0,  # no verdict warm-up
    "cls_lr": 5e-5,
    "cls_warmup_states": 8,
    "cls_anchor": 0.0,  # the verdict warm-up alone, free to move the policy
}


def run_fields(run_dir: str) -> dict:
    """The settings a run was made with: settings.json and, for a lab run, lab.json (runs made
    before the lab's flags left grpo_agentic.Settings hold them all in settings.json)."""
    with open(os.path.join(run_dir, "settings.json")) as f:
        fields = {**AS_BEFORE_THEIR_FLAGS, **json.load(f)}  # older runs lack later flags
    fields.setdefault("cls_batch", fields.get("cls_samples", 128))  # older: one share per step
    if os.path.exists(os.path.join(run_dir, "lab.json")):
        with open(os.path.join(run_dir, "lab.json")) as f:
            fields.update(json.load(f))
    return fields


def check_existing(jobs: list[tuple[ga.Settings, LabRun]], warm_paths: dict[tuple, str]) -> None:
    """Refuse to resume from finished runs or warm starts made with other settings."""
    for job, extra in jobs:
        if os.path.exists(os.path.join(job.out_dir, "summary.json")):
            found = outcome_fields(run_fields(job.out_dir))
            asked = {**dataclasses.asdict(job), **dataclasses.asdict(extra)}
            wanted = outcome_fields(json.loads(json.dumps(asked)))
            if found != wanted:
                raise ValueError(
                    f"{job.out_dir} was made with other settings ({differences(wanted, found)}); "
                    "choose another --out-dir or delete that run"
                )
    for job, _ in jobs:
        warm_path = warm_paths[job.history, job.seed]
        if os.path.exists(warm_path):
            made_with = torch.load(warm_path, map_location="cpu").get("settings") or {}
            found = outcome_fields(made_with, WARM_START_FIELDS)
            wanted = outcome_fields(dataclasses.asdict(job), WARM_START_FIELDS)
            if found != wanted:
                raise ValueError(
                    f"{warm_path} was made with other settings ({differences(wanted, found)}); "
                    "choose another --out-dir or delete it"
                )


def compare_job(job: tuple[ga.Settings, LabRun, str, int]) -> dict:
    """One (arm, history, seed) run, in a worker process with its share of the CPU threads, from
    the warm start of its history and seed (made by the first of its arms to start). A finished run
    is read back."""
    s, extra, warm_path, workers = job
    if workers > 1:  # a worker process; one worker runs in the caller's process, as it is
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    summary_path = os.path.join(s.out_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    device = ga.resolve_device(s.device)
    with open(f"{s.out_dir}.log", "w", buffering=1) as log_file:  # beside the run, as it goes

        def log(line: str) -> None:
            log_file.write(line + "\n")

        log(f"{os.path.basename(s.out_dir)}: settings {json.dumps(dataclasses.asdict(s))}")
        if not os.path.exists(warm_path):
            model, tokenizer = ga.load_policy(s, device)
            start = ga.warm_start(model.eval(), tokenizer, s, log)
            start["settings"] = dataclasses.asdict(s)
            partial = f"{warm_path}.{os.getpid()}"
            torch.save(start, partial)
            os.replace(partial, warm_path)  # whole or absent, even if stopped or made twice at once
        start = torch.load(warm_path, map_location=device)  # one from CUDA resumes on the CPU
        log(f"warm start: {warm_path}")
        return lab_run(s, extra, s.out_dir, log, start)


def end_values(summary: dict) -> dict:
    """The numbers a table reads from one run: its end, and its credit over the run."""
    over_run = summary["over_run"]
    values = {**summary["end"], **over_run}
    scale = over_run["adv_abs_mean"]  # mean |A|: 0 when no move had any credit
    values["adv_flawed_rel"] = over_run["adv_flawed_mean"] / scale if scale else math.nan
    return values


def tables(
    end: dict, start: dict, seeds: list[int], arms: list[str], start_check: list[str] | None = None
) -> str:
    """One regime's tables: for each table, each arm's mean over seeds, then paired differences.
    `end` and `start` are keyed by (arm, seed). The first table is the start of RL: an arm with
    a warm-up of its own (the verdict's) starts RL after it, and a difference in success there
    means the arms did not start from the same policy; `start_check` (the same-start check's
    lines) follows it. "Gains in RL": (the arm's end - its start) - (grpo's end - its start), what
    RL added to each; where the starts differ, so does the room to gain: read it beside the start.
    """
    others = arms[1:]
    out = []
    for title, keys, when, with_own_change in TABLES:
        values = start if when == "start" else end
        out += [f"### {title}", "", "| metric | " + " | ".join(arms) + " |"]
        out.append("|---" * (len(arms) + 1) + "|")
        for key in keys:
            means = [np.mean([values[arm, x].get(key, math.nan) for x in seeds]) for arm in arms]
            d = DECIMALS.get(key, 3)
            out.append(f"| {key} | " + " | ".join(f"{m:.{d}f}" for m in means) + " |")
        columns = [f"{arm} - grpo" for arm in others]
        if with_own_change:  # what RL added from each arm's own start, then GRPO's own change
            columns += [f"{arm} - grpo, gains in RL" for arm in others]
            columns.append("grpo: end - start")
        if not columns:  # GRPO alone, and nothing to compare it with
            out.append("")
            continue
        out += ["", "| paired difference | " + " | ".join(columns) + " |"]
        out.append("|---" * (len(columns) + 1) + "|")
        for key in keys:
            cells = []
            for arm in others:
                diffs = [
                    values[arm, x].get(key, math.nan) - values["grpo", x].get(key, math.nan)
                    for x in seeds
                ]
                cells.append(show_interval(diffs))
            measured = with_own_change and all(key in start[a, x] for a in arms for x in seeds)
            if measured:
                own = [end["grpo", x][key] - start["grpo", x][key] for x in seeds]
                for arm in others:  # (the arm's end - its start) - (grpo's end - its start)
                    gains = [end[arm, x][key] - start[arm, x][key] for x in seeds]
                    cells.append(show_interval([g - o for g, o in zip(gains, own)]))
                cells.append(show_interval(own))
            elif with_own_change:
                cells += ["not measured at the start"] * (len(others) + 1)
            out.append(f"| {key} | " + " | ".join(cells) + " |")
        out.append("")
        if when == "start" and start_check:
            out += [
                "The same-start check: arm - grpo in greedy success at the start of RL, seed by "
                "seed, paired layout by layout (mean [95 % t-interval over the layouts]; lost: "
                "solved at GRPO's start only, gained: at the arm's only):",
                "",
                *start_check,
                "",
            ]
    out += ["### Seed by seed (end of training)", ""]
    out += ["| metric | arm | " + " | ".join(f"seed {x}" for x in seeds) + " |"]
    out.append("|---" * (len(seeds) + 2) + "|")
    for key in PER_SEED:
        for arm in arms:
            values = [end[arm, x].get(key, math.nan) for x in seeds]
            shown = " | ".join(f"{v:.{DECIMALS.get(key, 3)}f}" for v in values)
            out.append(f"| {key} | {arm} | {shown} |")
    out.append("")
    out.append(
        f"Seeds {' '.join(map(str, seeds))}, each with its own layouts (data seed = seed); "
        "means over seeds; differences paired by seed (the same-start check's: by layout), mean "
        "[95 % t-interval] (to two digits of its half-width); gains in RL: each arm's end minus "
        "its own start, against GRPO's (read beside the start); _ci: the 95 % half-width of a "
        "seed's value over its probe pairs."
    )
    return "\n".join(out) + "\n"


def layout_change(before: list, after: list, split: str) -> tuple[list[float], int, int]:
    """Greedy success after - before, layout by layout (each -1, 0 or +1), and the layouts lost
    (solved before only) and gained (solved after only). Refuses lists that are not paired."""
    a = np.asarray(after, dtype=float)
    b = np.asarray(before, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"{split}: {len(b)} layouts before, {len(a)} after: not paired")
    return (a - b).tolist(), int(((b > 0) & (a == 0)).sum()), int(((b == 0) & (a > 0)).sum())


def same_start(
    out_dir: str, arms: list[str], history: int, seeds: list[int]
) -> tuple[list[str], list[str]]:
    """The same-start check. Seed by seed, each arm's first greedy evaluation (the start of RL,
    after its own warm-up) against GRPO's on the same layouts: arm - grpo, mean [95 % t-interval
    over the layouts], with the layouts lost and gained. An interval that excludes 0 says the
    arm did not start RL from GRPO's policy; one that holds 0 is no evidence of a difference, not
    proof of none (layouts lost and gained can cancel), and over many seeds and splits some
    intervals exclude 0 by chance. Returns the table's lines and a warning for each split that
    differs or could not be checked."""
    columns = ["seed", "arm", "split", "grpo success", "arm success", "arm - grpo", "lost"]
    columns += ["gained", "differs?"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    warnings = []
    for x in seeds:
        grpo_dir = os.path.join(out_dir, run_name("grpo", history, x))
        for arm in arms[1:]:
            name = run_name(arm, history, x)
            arm_dir = os.path.join(out_dir, name)
            paths = [os.path.join(d, "solved.jsonl") for d in (grpo_dir, arm_dir)]
            if not all(os.path.exists(path) for path in paths):  # a run made before solved.jsonl
                lines.append(f"| {x} | {arm} | - | - | - | - | - | - | not checked |")
                warnings.append(f"{name}: its start of RL not checked (no solved.jsonl)")
                continue
            grpo_solved = solved_at(grpo_dir, 0)
            arm_solved = solved_at(arm_dir, 0)
            for split in ("train", "held_out"):
                diffs, lost, gained = layout_change(grpo_solved[split], arm_solved[split], split)
                _, low, high = paired_interval(diffs)
                differs = "no evidence"
                if math.isnan(low):  # fewer than 2 layouts
                    differs = "not checked"
                elif low > 0 or high < 0:
                    differs = "**yes**"
                lines.append(
                    f"| {x} | {arm} | {split} | {np.mean(grpo_solved[split]):.3f} | "
                    f"{np.mean(arm_solved[split]):.3f} | {show_interval(diffs)} | {lost} | "
                    f"{gained} | {differs} |"
                )
                if differs == "**yes**":
                    warnings.append(
                        f"{name} did not start RL from GRPO's policy: greedy success ({split}) "
                        f"{show_interval(diffs)} against grpo, layout by layout"
                    )
                elif differs == "not checked":
                    warnings.append(f"{name}: its start of RL ({split}) not checked: < 2 layouts")
    return lines, warnings


def between_regimes(end: dict, seeds: list[int], arms: list[str], histories: list[int]) -> str:
    """Each arm with history H against the same arm and seed in the first regime (H = 0 here):
    paired differences of BETWEEN. `end` is keyed by (arm, history, seed)."""
    base = histories[0]
    columns = [f"{arm}: h{h} - h{base}" for h in histories[1:] for arm in arms]
    out = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key in BETWEEN:
        cells = [
            show_interval([end[arm, h, x][key] - end[arm, base, x][key] for x in seeds])
            for h in histories[1:]
            for arm in arms
        ]
        out.append(f"| {key} | " + " | ".join(cells) + " |")
    out.append("\nSame arm, same seed, same layouts; mean [95 % t-interval] of the differences.")
    return "\n".join(out) + "\n"


def compare(s: ga.Settings, lab: Lab, out_dir: str) -> str:
    """Every arm in every regime on every seed, `lab.workers` runs at a time; writes and returns
    compare.md."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    check_shared(s)
    # One run at a time: seed by seed, so that every finished seed has both arms (work that stops
    # leaves pairs). In parallel: arm by arm, so that a seed's first arm usually makes its warm
    # start before the others need it (with more workers than seeds two arms of a seed may start
    # together and both make it: the same file, replaced whole, only time lost).
    keys = [(arm, h, seed) for h in lab.histories for seed in lab.seeds for arm in lab.arms]
    if lab.workers > 1:
        keys = [(arm, h, seed) for h in lab.histories for arm in lab.arms for seed in lab.seeds]
    jobs = [job_settings(s, lab, arm, h, seed, out_dir) for arm, h, seed in keys]
    warm_paths = {
        (h, x): os.path.join(out_dir, f"warm-start-h{h}-seed{x}.pt")
        for h in lab.histories
        for x in lab.seeds
    }
    started = os.path.isdir(out_dir) and any(
        name.startswith(ARMS) or name.startswith("warm-start") for name in os.listdir(out_dir)
    )
    if started and not lab.resume:
        raise ValueError(
            f"{out_dir} already holds runs of a comparison; pass --resume to go on with it "
            "(finished runs with the same settings are read back, not repeated)"
        )
    check_existing(jobs, warm_paths)
    os.makedirs(out_dir, exist_ok=True)
    end, start = {}, {}
    work = [(job, extra, warm_paths[job.history, job.seed], lab.workers) for job, extra in jobs]
    if s.model.endswith(".gguf"):  # converted once here, not by each worker at once
        ga.gguf_to_folder(s.model, s.model_cache)
    # One worker runs in this process: nothing to start, and a debugger can follow it.
    pool = None
    if lab.workers > 1:
        pool = ProcessPoolExecutor(lab.workers, mp_context=get_context("spawn"))  # no fork
    with pool or contextlib.nullcontext():
        summaries = pool.map(compare_job, work) if pool else map(compare_job, work)
        for key, summary in zip(keys, summaries):
            end[key] = end_values(summary)
            start[key] = summary["start"]
            shown = ", ".join(f"{k} {end[key].get(k, math.nan):.3f}" for k in SUCCESS)
            print(f"{run_name(*key)}: {shown}", flush=True)
    parts = []
    for h in lab.histories:
        regime_end = {(arm, x): end[arm, hh, x] for arm, hh, x in keys if hh == h}
        regime_start = {(arm, x): start[arm, hh, x] for arm, hh, x in keys if hh == h}
        check = []
        if len(lab.arms) > 1:
            check, warnings = same_start(out_dir, lab.arms, h, lab.seeds)
            for warning in warnings:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        regime = tables(regime_end, regime_start, lab.seeds, lab.arms, check)
        parts.append(f"## History H = {h}\n\n" + regime)
    if len(lab.histories) > 1:
        parts.append(
            "## Between regimes\n\n" + between_regimes(end, lab.seeds, lab.arms, lab.histories)
        )
    table = "\n".join(parts)
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(table)
    return table


def between_dirs(dir_a: str, dir_b: str) -> str:
    """Runs of the same name in two comparisons (say, two tiny models): B - A for each arm and
    regime, paired by seed, over SUCCESS[:2], ANATOMY and CHAIN."""
    names = [
        d
        for d in sorted(os.listdir(dir_a))
        if os.path.exists(summary_path(dir_a, d)) and os.path.exists(summary_path(dir_b, d))
    ]
    if not names:
        raise ValueError(f"{dir_a} and {dir_b} have no finished run of the same name")
    groups = list(dict.fromkeys(d.rsplit("-seed", 1)[0] for d in names))

    def read(directory, name):
        with open(summary_path(directory, name)) as f:
            values = end_values(json.load(f))
        if not set(BETWEEN) <= values.keys():
            raise ValueError(
                f"{directory}/{name} lacks the lab's columns: make it with experiments.py run"
            )
        return values

    out = [
        f"B = {dir_b}, A = {dir_a}",
        "",
        "| metric | " + " | ".join(f"{g}: A | B | B - A" for g in groups) + " |",
        "|---" * (3 * len(groups) + 1) + "|",
    ]
    for key in BETWEEN:
        cells = []
        for g in groups:
            runs = [d for d in names if d.rsplit("-seed", 1)[0] == g]
            a = [read(dir_a, d)[key] for d in runs]
            b = [read(dir_b, d)[key] for d in runs]
            diff = show_interval([y - x for x, y in zip(a, b)])
            cells.append(f"{np.mean(a):.3f} | {np.mean(b):.3f} | {diff}")
        out.append(f"| {key} | " + " | ".join(cells) + " |")
    seeds = {
        g: [d.rsplit("-seed", 1)[1] for d in names if d.rsplit("-seed", 1)[0] == g] for g in groups
    }
    shown = "; ".join(f"{g}: {' '.join(sorted(x, key=int))}" for g, x in seeds.items())
    out.append(f"\nSeeds ({shown}); paired by run name; mean [95 % t-interval].")
    return "\n".join(out) + "\n"


def summary_path(out_dir: str, run: str) -> str:
    return os.path.join(out_dir, run, "summary.json")


# ---- Figures: one run's curves, runs overlaid, a comparison's means (need matplotlib) ----------
def figure_class():
    """matplotlib's Figure, imported only here: pictures need matplotlib, training does not.
    A Figure made directly, not through pyplot, draws with Agg: no window, no global state."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "plot needs matplotlib (not a run-time dependency): pip install matplotlib"
        ) from None
    return Figure


@dataclass(frozen=True)
class Curve:
    """One line of a panel: a column of a run's files."""

    column: str  # its name in metrics.jsonl, the name the README and the log use
    measured: bool  # written at each measure (iteration 0 too), else at every iteration
    colour: str
    gloss: str = ""  # what the name does not say, in the legend after it
    right: bool = False  # on the panel's second y-axis


PANELS = (  # (title, y label, [curves]); a curve with right=True goes on a second y-axis
    (
        "Success: sampled, and greedy (eval_*)",
        "share of episodes won",
        [
            Curve("success", False, "tab:gray", "sampled"),
            Curve("eval_train_success", True, "tab:blue"),
            Curve("eval_held_out_success", True, "tab:orange"),
        ],
    ),
    (
        "Lemma 3.1: flawed moves punished on average",
        "mean advantage A",
        [
            Curve("adv_flawed_mean", False, "tab:red"),
            Curve("adv_good_mean", False, "tab:green"),
            Curve("flawed_pos_adv_frac", False, "tab:purple", "right", right=True),
        ],
    ),
    (
        "Coupling of the probe's twins",
        "cosine, good vs flawed twin",
        [
            Curve("coupling_cos", True, "tab:brown", "gradients"),
            Curve("hidden_cos", True, "tab:cyan", "hidden states"),
        ],
    ),
    (
        "The learning signal",
        "share of groups with unequal rewards",
        [Curve("mixed_groups", False, "tab:olive")],
    ),
)
RIGHT_Y_LABEL = "share of flawed moves, A > 0"  # panel 2's second axis
TREND_HALF_WINDOW = 5  # a per-iteration column's trend: the mean of the 11 iterations around it
# One line style per overlaid run (named in the title); a colour stays with its column.
RUN_STYLES = (("-", "solid"), ("--", "dashed"), (":", "dotted"), ("-.", "dash-dot"))
HOW_TO_READ = (  # under the panels
    f"faint: each iteration; bold: the mean of the {2 * TREND_HALF_WINDOW + 1} around it; "
    "dots: the measures (greedy success and probes)"
)
# Differences that do not tell runs apart: where and how a run ran, its log, and what "model"
# (model_name) already says.
NOT_A_LABEL = NOT_PART_OF_A_RUN + ("render_every", "tiny_arch", "tiny_layers", "tiny_dim")
MAX_LABEL_SETTINGS = 3  # runs that differ in more are told apart by their directories


def read_run(run_dir: str) -> dict:
    """A run's own files: "settings" (settings.json, and lab.json for a lab run), "rows" (one per
    iteration, metrics.jsonl) and "start" (iteration 0's measure, summary.json's "start"; None
    while the run is still going: summary.json is written at its end)."""
    needed = [os.path.join(run_dir, name) for name in ("settings.json", "metrics.jsonl")]
    if not all(os.path.isfile(path) for path in needed):
        raise ValueError(
            f"{run_dir} is not a run: a run directory holds settings.json and metrics.jsonl"
        )
    with open(needed[1]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    start = None
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            start = json.load(f).get("start")
    return {"settings": run_fields(run_dir), "rows": rows, "start": start}


def as_float(value) -> float:
    """A JSON value as a float: null (how a run writes NaN) and a missing value become NaN."""
    return math.nan if value is None else float(value)


def curve_points(run: dict, curve: Curve) -> tuple[list[int], list[float]]:
    """(iterations, values) of one curve of one run. A measured column is read at iteration 0
    (summary.json's "start") and at the rows of metrics.jsonl that hold it; any other column at
    every row. A null or missing value is NaN: a gap in the line."""
    rows = run["rows"]
    if curve.measured:
        rows = [{"iter": 0, **run["start"]}] if run["start"] else []
        rows += [r for r in run["rows"] if curve.column in r]
    return [r["iter"] for r in rows], [as_float(r.get(curve.column)) for r in rows]


def model_name(settings: dict) -> str:
    """The policy a run trained: a --model's file or folder name, or the built-in tiny model."""
    if settings.get("model"):
        return os.path.basename(settings["model"].rstrip("/"))
    arch = settings.get("tiny_arch", "gpt2")  # runs from before --tiny-arch: GPT-2 was the one
    return f"tiny {arch} ({settings.get('tiny_layers')} x {settings.get('tiny_dim')})"


def run_labels(run_dirs: list[str], runs: list[dict]) -> list[str]:
    """A legend label per run: the settings the runs differ in ("history 2"), or, where they
    differ in none or in more than MAX_LABEL_SETTINGS, the run's directory."""
    settings = [{**r["settings"], "model": model_name(r["settings"])} for r in runs]
    keys = sorted(set().union(*settings) - set(NOT_A_LABEL))
    differ = [k for k in keys if len({json.dumps(s.get(k)) for s in settings}) > 1]
    if not differ or len(differ) > MAX_LABEL_SETTINGS:
        return list(run_dirs)
    return [", ".join(f"{k} {s.get(k)}" for k in differ) for s in settings]


def figure_title(run_dirs: list[str], runs: list[dict], labels: list[str]) -> str:
    """Model, history and seed where the runs share them; then which line style is which run
    (one run: its directory first)."""
    described = [
        {
            "model": model_name(r["settings"]),
            **{k: r["settings"].get(k) for k in ("history", "seed")},
        }
        for r in runs
    ]
    shared = [
        value if key == "model" else f"{key} {value}"
        for key, value in described[0].items()
        if all(d[key] == value for d in described)
    ]
    if len(runs) == 1:
        return f"{run_dirs[0]}: " + ", ".join(shared)
    styles = [f"{name}: {label}" for (_, name), label in zip(RUN_STYLES, labels)]
    one_line = "; ".join(styles)
    styles = one_line if len(one_line) <= 100 else "\n".join(styles)  # else: too wide to read
    return "\n".join(part for part in (", ".join(shared), styles) if part)


def window_mean(values: list[float], half: int) -> list[float]:
    """Each value replaced by the mean of the finite values at most `half` places from it (NaN
    where there are none): the trend of a noisy per-iteration column.

    >>> window_mean([0.0, 1.0, math.nan, 3.0], half=1)
    [0.5, 0.5, 2.0, 3.0]
    """
    y = np.asarray(values, dtype=float)
    means = []
    for i in range(len(y)):
        near = y[max(0, i - half) : i + half + 1]
        near = near[~np.isnan(near)]
        means.append(float(near.mean()) if len(near) else math.nan)
    return means


def draw_curve(ax, x: list[int], y: list[float], curve: Curve, style: str, label: str):
    """One curve of one run; returns the line its legend shows. A measured column: a line through
    its measures. Any other: each iteration faint, and its trend (window_mean) over it."""
    if curve.measured:
        (line,) = ax.plot(x, y, style, color=curve.colour, marker="o", markersize=4, label=label)
        return line
    ax.plot(x, y, style, color=curve.colour, linewidth=0.6, alpha=0.35, label=label)
    trend = window_mean(y, TREND_HALF_WINDOW)
    (line,) = ax.plot(x, trend, style, color=curve.colour, linewidth=1.6, label=f"{label}, trend")
    return line


def draw_panel(ax, title: str, y_label: str, curves: list[Curve], runs: list[dict], labels):
    """One panel: each curve of each run, in the curve's colour and the run's line style, each
    line labelled "column (gloss)", then ": run label" when runs are overlaid. A curve no run
    holds a value of is left out (a column older runs lack; no oracle, no flawed moves), and a
    panel left empty says so. Returns the panel's legend: {legend text: the curve's first line}."""
    right_ax = ax.twinx() if any(c.right for c in curves) else None
    legend = {}
    for curve in curves:
        for run, label, (style, _) in zip(runs, labels, RUN_STYLES):
            x, y = curve_points(run, curve)
            if np.isnan(y).all():
                continue
            text = f"{curve.column} ({curve.gloss})" if curve.gloss else curve.column
            line_label = text + (f": {label}" if len(runs) > 1 else "")
            line = draw_curve(right_ax if curve.right else ax, x, y, curve, style, line_label)
            legend.setdefault(text, line)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    if right_ax is not None:
        right_ax.set_ylabel(RIGHT_Y_LABEL, color="tab:purple")
    if not legend:
        ax.text(0.5, 0.5, "not in these runs' files", ha="center", transform=ax.transAxes)
    # The legend sits above the panel, under its title, where it covers no line.
    ax.legend(
        legend.values(),
        legend.keys(),
        title=title,
        title_fontproperties={"size": 10},
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=min(len(curves), 2),  # wider than its panel, a legend would cover the next one
        fontsize=7,
        frameon=False,
        handlelength=2.5,
    )
    return legend


def plot_runs(run_dirs: list[str], path: str):
    """One picture of runs' curves, read from their own files: success, Lemma 3.1, coupling and
    the learning signal, 2 x 2 panels; several runs overlaid, each in its own line style. Saves
    it to `path` and returns the matplotlib Figure (its lines hold the data drawn)."""
    Figure = figure_class()
    if len(run_dirs) > len(RUN_STYLES):
        raise ValueError(f"plot overlays at most {len(RUN_STYLES)} runs, got {len(run_dirs)}")
    runs = [read_run(d) for d in run_dirs]
    labels = run_labels(run_dirs, runs)
    fig = Figure(figsize=(9, 6), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).flatten()
    for ax, (title, y_label, curves) in zip(axes, PANELS):
        draw_panel(ax, title, y_label, curves, runs, labels)
    for ax in axes[2:]:
        ax.set_xlabel("GRPO iteration (0: after the warm-up)")
    fig.suptitle(figure_title(run_dirs, runs, labels), fontsize=11)
    fig.supxlabel(HOW_TO_READ, fontsize=8, color="dimgray")
    save_figure(fig, path)
    return fig


def save_figure(fig, path: str) -> None:
    """Saves at 100 dpi; a PNG in 256 colours (Pillow comes with matplotlib): about 40 % of the
    bytes of matplotlib's own RGBA file, which its faint, antialiased lines make large, and to
    the eye the same picture."""
    fig.savefig(path, dpi=100)
    if path.lower().endswith(".png"):
        from PIL import Image

        with Image.open(path) as drawn:
            fewer_colours = drawn.convert("RGB").quantize(256)
        fewer_colours.save(path, optimize=True)


def is_comparison(directory: str) -> bool:
    """A directory of finished runs (experiments.py compare's --out-dir), not a run itself."""
    if not os.path.isdir(directory) or os.path.exists(os.path.join(directory, "metrics.jsonl")):
        return False
    return any(os.path.exists(summary_path(directory, d)) for d in os.listdir(directory))


def plot_comparison(compare_dir: str, path: str) -> str:
    """The chain over training (iteration 0: after the warm-up), each arm's mean over seeds."""
    Figure = figure_class()
    keys = ("cls_bacc_held_out", "hidden_cos_centred", "coupling_cos", "eval_held_out_success")
    fig = Figure(figsize=(17, 3.8))
    axes = fig.subplots(1, len(keys))
    finished = [
        d for d in sorted(os.listdir(compare_dir)) if os.path.exists(summary_path(compare_dir, d))
    ]
    for arm in sorted({d.rsplit("-seed", 1)[0] for d in finished}):
        curves = []
        for d in (d for d in finished if d.rsplit("-seed", 1)[0] == arm):
            with open(summary_path(compare_dir, d)) as f:
                curve = [{"iter": 0, **json.load(f)["start"]}]
            with open(os.path.join(compare_dir, d, "metrics.jsonl")) as f:
                curve += [row for row in map(json.loads, f) if "coupling_cos" in row]  # measured
            curves.append(curve)
        for ax, key in zip(axes, keys):
            mean = np.mean([[row[key] for row in curve] for curve in curves], axis=0)
            label = f"{arm} ({len(curves)} seeds)"
            ax.plot([row["iter"] for row in curves[0]], mean, marker="o", label=label)
            ax.set_xlabel("GRPO iteration")
            ax.set_title(key)
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_command(args: list[str]) -> str:
    """experiments.py plot: runs' curves (RUN_DIR/curves.png for one run; --out for several),
    or, given a comparison's directory, its arms' means (compare.png there). Returns the path."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="experiments.py plot",
        description="A run's curves in one picture; several runs overlaid; or a comparison's.",
    )
    parser.add_argument("dirs", nargs="+", metavar="RUN_DIR", help="runs, or one comparison")
    parser.add_argument("--out", help="the picture's file (.png); needed for several runs")

    def one_line_error(message: str):
        raise ValueError(message)  # main prints it on one line and returns 2

    parser.error = one_line_error
    parsed = parser.parse_args(args)
    figure_class()  # first: without matplotlib nothing else can help
    dirs, out = parsed.dirs, parsed.out
    if len(dirs) == 1 and is_comparison(dirs[0]):
        return plot_comparison(dirs[0], out or os.path.join(dirs[0], "compare.png"))
    if len(dirs) > 1 and not out:
        raise ValueError("give --out FILE.png to overlay several runs")
    path = out or os.path.join(dirs[0], "curves.png")
    plot_runs(dirs, path)
    return path


# ---- Controls and baselines on saved runs -------------------------------------------------------
def settings_of(run_dir: str) -> tuple[ga.Settings, LabRun]:
    """The Settings and LabRun a run was made with (see run_fields)."""
    saved = run_fields(run_dir)
    saved["device"] = "cpu"  # analysed here, wherever it was trained
    known = {f.name for f in dataclasses.fields(ga.Settings)}
    lab_known = {f.name for f in dataclasses.fields(LabRun)}
    s = ga.Settings(**{k: v for k, v in saved.items() if k in known})
    return s, LabRun(**{k: v for k, v in saved.items() if k in lab_known})


def saved_policy(run_dir: str):
    """(model in eval mode, tokenizer, settings, lab settings) of a finished run, on the CPU."""
    s, extra = settings_of(run_dir)
    policy = dataclasses.replace(s, model=os.path.join(run_dir, "policy"))
    model, tokenizer = ga.load_policy(policy, torch.device("cpu"))
    return model.eval(), tokenizer, s, extra


def self_check_control(run_dir: str) -> dict:
    """Held-out success three ways: plain greedy; the self-check (the verdict rejects, the move is
    resampled up to K times); and the same resampling decided by a coin that rejects at the
    verdict's own rate -- as much resampling, no judgement in it."""
    model, tokenizer, s, extra = saved_policy(run_dir)
    layouts = ga.task_sets(s.train_tasks, s.eval_tasks, s.data_seed)[1]["held_out"]
    counts = {"judged": 0, "rejected": 0}

    def success(judge=None):
        sample = self_checking(judge, extra.self_check) if judge else None
        return ga.greedy_episodes(model, tokenizer, layouts, s, sample)[1].mean().item()

    _, verdict_format = ga.toy_formats(tokenizer, s.chat)

    def verdict(prompts, actions):
        pad = tokenizer.pad_token_id
        ok = ga.verdict_is_good(model, prompts, actions, verdict_format, pad).tolist()
        counts["judged"] += len(ok)
        counts["rejected"] += ok.count(False)
        return ok

    out = {"none": success()}
    out["verdict"] = success(verdict)
    out["reject_rate"] = counts["rejected"] / max(counts["judged"], 1)
    coin = np.random.default_rng(s.seed)

    def coin_judge(prompts, actions):
        return (coin.random(len(prompts)) >= out["reject_rate"]).tolist()

    out["random"] = success(coin_judge)
    return out


def self_check_control_table(compare_dir: str) -> str:
    runs = [
        d for d in sorted(os.listdir(compare_dir)) if os.path.exists(summary_path(compare_dir, d))
    ]
    results = {}
    for d in runs:
        results[d] = self_check_control(os.path.join(compare_dir, d))
        print(f"{d}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[d].items()), flush=True)
    lines = [
        "| arm | verdict rejects | none | verdict | coin (same rate) "
        "| verdict - none | coin - none | verdict - coin |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in dict.fromkeys(d.rsplit("-seed", 1)[0] for d in runs):
        rs = [r for d, r in results.items() if d.rsplit("-seed", 1)[0] == arm]

        def mean(key):
            return np.mean([r[key] for r in rs])

        def diff(a, b):
            return show_interval([r[a] - r[b] for r in rs])

        lines.append(
            f"| {arm} | {mean('reject_rate'):.0%} | {mean('none'):.3f} | {mean('verdict'):.3f} "
            f"| {mean('random'):.3f} | {diff('verdict', 'none')} | {diff('random', 'none')} "
            f"| {diff('verdict', 'random')} |"
        )
    lines.append(f"\n{len(rs)} seeds per arm; paired by seed, mean [95 % t-interval].")
    return "\n".join(lines)


def probe_rows(model, tokenizer, s: ga.Settings) -> dict:
    """The coupling probe on its coupled pairs, on unrelated pairs, and on another move."""

    def observation(layout):
        return toy_env.GridWorld.from_string(layout).observation()

    triples = toy_env.coupled_pairs("train", s.probe_pairs, s.data_seed)
    coupled = [(observation(g), observation(f), a) for g, f, a in triples]
    layouts = toy_env.sample_layouts("train", 2 * s.probe_pairs, seed=s.data_seed + 1)
    unrelated = [
        (observation(layouts[2 * k]), observation(layouts[2 * k + 1]), a)
        for k, (_, _, a) in enumerate(triples)
    ]
    fmt, _ = ga.toy_formats(tokenizer, s.chat)
    rows = {
        "coupled": ga.coupling_probe(model, tokenizer, coupled, fmt),
        "unrelated": ga.coupling_probe(model, tokenizer, unrelated, fmt),
    }
    params = list(model.parameters())

    def grad(obs, action):
        logp = ga.text_action_logprobs(model, tokenizer, [obs], [action], fmt)[0]
        return torch.cat([g.flatten() for g in torch.autograd.grad(logp, params)])

    cosines = []
    for obs, _, action in coupled:
        other = next(a for a in toy_env.ACTIONS if a != action)
        cos = torch.nn.functional.cosine_similarity(grad(obs, action), grad(obs, other), dim=0)
        cosines.append(cos.item())
    rows["other move"] = {"coupling_cos": float(np.mean(cosines))}
    return rows


def probe_baselines(run_dir: str) -> str:
    """The probe at the start of RL (the run's warm-up, redone) and on the final policy."""
    s, _ = settings_of(run_dir)
    model, tokenizer = ga.load_policy(dataclasses.replace(s, model=""), torch.device("cpu"))
    model.eval()
    ga.warm_start(model, tokenizer, s, log=lambda line: None)  # the run's policy at iteration 0
    start = probe_rows(model, tokenizer, s)
    final, tokenizer, _, _ = saved_policy(run_dir)
    end = probe_rows(final, tokenizer, s)
    lines = [
        "| pairs | coupling_cos start -> end | coupling_ratio start -> end "
        "| hidden_cos start -> end |",
        "|---|---|---|---|",
    ]
    for kind in start:
        cells = [
            f"{start[kind][k]:.3f} -> {end[kind][k]:.3f}" if k in start[kind] else "--"
            for k in ("coupling_cos", "coupling_ratio", "hidden_cos")
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def label_noise(run_dir: str, iters: int = 20) -> str:
    """How often the advantage labels (--cls-labels advantage) agree with the oracle, on `iters`
    iterations of rollouts of the run's final policy on its train layouts (no training)."""
    model, tokenizer, s, _ = saved_policy(run_dir)
    pool, _ = ga.task_sets(s.train_tasks, s.eval_tasks, s.data_seed)
    rng = np.random.default_rng(s.seed)
    generator = torch.Generator().manual_seed(s.seed)
    fmt, _ = ga.toy_formats(tokenizer, s.chat)
    counts = np.zeros((2, 2), dtype=int)  # [label good?][oracle good?]
    for _ in range(iters):
        moves, rewards, _ = ga.sample_groups(model, tokenizer, pool, rng, generator, s, fmt)
        advantages = ga.move_advantages(rewards, [m.episode for m in moves])
        for m, a in zip(moves, advantages.tolist()):
            if a != 0:
                counts[int(a > 0), int(m.info["good"])] += 1
    n = counts.sum()
    episodes = f"{s.tasks_per_iter} x {s.group_size} episodes"
    return "\n".join(
        [
            f"{n} labelled moves from {iters} iterations of {episodes} ({run_dir}/policy)",
            f"label 'good' (A > 0): {counts[1].sum()} moves, "
            f"{counts[1, 1] / counts[1].sum():.0%} of them good by the oracle",
            f"label 'bad'  (A < 0): {counts[0].sum()} moves, "
            f"{counts[0, 0] / counts[0].sum():.0%} of them flawed by the oracle",
            f"disagreement with the oracle: {(counts[0, 1] + counts[1, 0]) / n:.1%}",
        ]
    )


@torch.no_grad()
def greedy_with_bump_memory(model, tokenizer, layouts: list[str], memory: bool) -> float:
    """Success of a Markov policy (history 0) taking, at each turn, its most likely of the four
    moves in the action format; with `memory`, the most likely among those that have not already
    bumped into a wall at this cell in this episode: perfect memory of that one fact."""
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    bumped = [set() for _ in envs]  # per episode: (cell, move) pairs that left the agent in place
    live = list(range(len(envs)))
    while live:
        observations = [envs[i].observation() for i in live for _ in toy_env.ACTIONS]
        moves = list(toy_env.ACTIONS) * len(live)
        fmt = ga.plain_format(tokenizer)
        logps = ga.text_action_logprobs(model, tokenizer, observations, moves, fmt)
        logps = logps.view(len(live), -1)  # (episodes, 4)
        for k, i in enumerate(live):
            cell = envs[i].pos
            ranked = [toy_env.ACTIONS[j] for j in logps[k].argsort(descending=True).tolist()]
            allowed = [m for m in ranked if not (memory and (cell, m) in bumped[i])]
            envs[i].step(allowed[0])
            if envs[i].pos == cell:
                bumped[i].add((cell, allowed[0]))
        live = [i for i in live if not envs[i].done]
    return float(np.mean([env.pos == env.goal for env in envs]))


def bump_memory(compare_dir: str) -> str:
    """The yardstick for history: each finished H = 0 GRPO policy of a comparison on its held-out
    layouts, without and with perfect memory of its bumps, beside the greedy success GRPO reached
    in each regime of the same seed (regimes finished for every such seed only)."""
    finished = {d for d in os.listdir(compare_dir) if os.path.exists(summary_path(compare_dir, d))}
    seeds = sorted(int(d.rsplit("-seed", 1)[1]) for d in finished if d.startswith("grpo-h0-seed"))
    if not seeds:
        raise ValueError(f"{compare_dir} holds no finished grpo-h0-seed* run")
    histories = sorted(
        int(d[len("grpo-h") :].split("-")[0]) for d in finished if d.startswith("grpo-h")
    )
    histories = [
        h
        for h in dict.fromkeys(histories)
        if all(run_name("grpo", h, x) in finished for x in seeds)
    ]
    rows = {}
    for seed in seeds:
        run_dir = os.path.join(compare_dir, run_name("grpo", 0, seed))
        model, tokenizer, s, _ = saved_policy(run_dir)
        layouts = ga.task_sets(s.train_tasks, s.eval_tasks, s.data_seed)[1]["held_out"]
        row = {
            "argmax": greedy_with_bump_memory(model, tokenizer, layouts, memory=False),
            "memory": greedy_with_bump_memory(model, tokenizer, layouts, memory=True),
        }
        for h in histories:
            with open(summary_path(compare_dir, run_name("grpo", h, seed))) as f:
                row[f"greedy h{h}"] = json.load(f)["eval_held_out_success"]
        rows[seed] = row
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    keys = list(rows[seeds[0]])
    means = [np.mean([r[k] for r in rows.values()]) for k in keys]
    lines = ["| held-out success | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines.append("| mean | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    gain = [r["memory"] - r["argmax"] for r in rows.values()]
    lines.append(f"\nmemory - argmax (what remembering bumps is worth): {show_interval(gain)}")
    for h in histories[1:]:
        learned = [r[f"greedy h{h}"] - r["greedy h0"] for r in rows.values()]
        lines.append(
            f"greedy h{h} - greedy h0 (history: its warm-up and RL): {show_interval(learned)}"
        )
    lines.append(f"\nSeeds {' '.join(map(str, seeds))}; paired by seed, mean [95 % t-interval].")
    return "\n".join(lines)


def rollout_speed(rounds: int = 9, other_file: str | None = None) -> str:
    """Decisions per second of `rollout` at H = 0, 2 and the longest H the budget allows, each on
    an untrained built-in tiny model sized for it (every episode runs its whole budget, so prompts
    reach their longest), 16 layouts x 8 episodes per rollout, 1 thread, the variants taking turns
    in one process so that a busy machine slows them alike; medians over `rounds`. With
    `other_file` (another version of grpo_agentic.py), its rollout at H = 0 on the same model takes
    turns too: a version from before the restructure (its rollout takes layouts), e.g. 344c445."""
    import importlib.util
    import statistics
    import time

    torch.set_num_threads(1)
    tokenizer = ga.build_word_tokenizer()
    s = ga.Settings()
    pool, eval_sets = ga.task_sets(s.train_tasks, s.eval_tasks, s.data_seed)
    layouts = pool + eval_sets["held_out"]
    longest = max(toy_env.GridWorld.from_string(x).max_steps for x in layouts) - 1
    parse = ga.exact_format_parser(tokenizer, toy_env.ACTIONS)

    def play(picked, model, generator, history):
        groups = [[toy_env.GridWorld.from_string(x) for _ in range(8)] for x in picked]
        return ga.rollout(
            model,
            tokenizer,
            groups,
            parse,
            max_action_tokens=4,
            temperature=1.0,
            generator=generator,
            **history,
        )[0]

    variants = {}
    for h in dict.fromkeys((0, 2, longest)):
        torch.manual_seed(0)
        positions = ga.positions_needed(tokenizer, layouts, s.max_action_tokens, h)
        model = ga.build_tiny_model(tokenizer, s.tiny_layers, s.tiny_dim, positions, s.tiny_arch)
        model.eval()
        variants[f"H = {h}"] = (play, model, {"history": h})
        if h == 0 and other_file:
            spec = importlib.util.spec_from_file_location("other_version", other_file)
            other = importlib.util.module_from_spec(spec)
            sys.modules["other_version"] = other  # dataclasses look their module up here
            spec.loader.exec_module(other)

            def play_other(picked, model, generator, history, other=other):
                return other.rollout(model, tokenizer, picked, 8, 4, 1.0, generator=generator)[0]

            variants[f"H = 0, {other_file}"] = (play_other, model, {})
    rates = {name: [] for name in variants}
    rng = np.random.default_rng(0)
    for r in range(rounds):
        picked = [pool[k] for k in rng.choice(len(pool), size=16, replace=False)]
        for name, (play, model, history) in variants.items():
            generator = torch.Generator().manual_seed(r)
            t = time.perf_counter()
            moves = play(picked, model, generator, history)
            rates[name].append(len(moves) / (time.perf_counter() - t))
    lines = ["| rollout | decisions per second (median) | relative to H = 0 |", "|---|---|---|"]
    base = statistics.median(rates["H = 0"])
    for name, values in rates.items():
        rate = statistics.median(values)
        lines.append(f"| {name} | {rate:.0f} | {rate / base:.2f} |")
    lines.append(f"\n{rounds} rounds; the longest H the budget allows is {longest}.")
    return "\n".join(lines)


def shared_head_speed(model_path: str, rounds: int = 3, moves_scored: int = 48) -> str:
    """What running a batch's common prompt head once saves (grpo_agentic.forward_batch), on a
    chat model: seconds of a rollout (2 train layouts x 8 episodes, history 0, from the policy as
    loaded) and of a grpo_update on its first `moves_scored` moves (one minibatch, every move with
    A != 0, lr 0 so that every round is the same), with the head shared and without
    (SHARED_HEAD_MIN out of reach), taking turns in one process; medians over `rounds`, and the
    largest difference between the two ways' sampled log-probs of the same greedy moves."""
    import statistics
    import time

    s = ga.Settings(model=model_path, chat=True, train_tasks=16, eval_tasks=8)
    model, tokenizer = ga.load_policy(s, torch.device("cpu"))
    model.eval()
    fmt, _ = ga.toy_formats(tokenizer, True)
    parse = ga.exact_format_parser(tokenizer, toy_env.ACTIONS, fmt)
    layouts = toy_env.sample_layouts("train", 2, 0)
    least = ga.SHARED_HEAD_MIN
    seconds = {(way, phase): [] for way in ("shared", "alone") for phase in ("rollout", "update")}
    greedy_logps = {}
    for r in range(rounds):
        for way, threshold in (("shared", least), ("alone", 10**9)):
            ga.SHARED_HEAD_MIN = threshold
            groups = [[toy_env.GridWorld.from_string(x) for _ in range(8)] for x in layouts]
            t = time.perf_counter()
            moves, _ = ga.rollout(
                model,
                tokenizer,
                groups,
                parse,
                max_action_tokens=s.max_action_tokens,
                temperature=1.0,
                fmt=fmt,
                greedy=r == 0,  # the first round: the same moves both ways, to compare
                generator=torch.Generator().manual_seed(r),
            )
            seconds[way, "rollout"].append(time.perf_counter() - t)
            if r == 0:
                greedy_logps[way] = [lp for m in moves for lp in m.sample_logps]
            batch = moves[:moves_scored]
            t = time.perf_counter()
            ga.grpo_update(
                model,
                [m.prompt_ids for m in batch],
                [m.action_ids for m in batch],
                [m.sample_logps for m in batch],
                torch.linspace(-1.0, 1.0, len(batch)) + 1e-3,  # (n,) every move with A != 0
                torch.optim.SGD(model.parameters(), lr=0.0),
                np.random.default_rng(r),
                pad_id=tokenizer.pad_token_id,
                temperature=1.0,
                minibatch_moves=len(batch),
            )
            seconds[way, "update"].append(time.perf_counter() - t)
    ga.SHARED_HEAD_MIN = least
    head = ga.common_head([m.prompt_ids for m in moves], keep=1)
    lines = [
        f"| phase | head shared (s) | whole prompts (s) | ratio | ({head} shared ids) |",
        "|---|---|---|---|---|",
    ]
    for phase in ("rollout", "update"):
        shared = statistics.median(seconds["shared", phase])
        alone = statistics.median(seconds["alone", phase])
        lines.append(f"| {phase} | {shared:.2f} | {alone:.2f} | {shared / alone:.2f} | |")
    both = zip(greedy_logps["shared"], greedy_logps["alone"])
    lines.append(
        f"\nmax |log-prob difference| of the greedy moves: {max(abs(a - b) for a, b in both):.1e}"
    )
    lines.append(f"{rounds} rounds, medians, {torch.get_num_threads()} threads.")
    return "\n".join(lines)


def update_cost(
    model_name: str = "",
    moves: int = 8,
    prompt_tokens: int = 256,
    rounds: int = 3,
    version: str | None = None,
) -> str:
    """What one grpo_update costs: `moves` moves of `prompt_tokens`-token prompts (random ids) and
    2-token actions, one minibatch, on `model_name` (a folder; '' = a tiny Llama with a 32,000-token
    vocabulary, built from a config). Reports the bytes autograd keeps for backward in tensors
    with a vocabulary axis (each storage once), as a multiple of one float32 (N, T, V) tensor;
    the seconds of an update
    (median over `rounds`, lr 0 so every round is the same); ratio_dev_first; and this process's
    peak resident memory before and after the updates. `version`: another file of grpo_agentic.py
    to measure instead (e.g. e8289d7's, which scored the whole vocabulary at every position); run
    each version in its own process."""
    import importlib.util
    import inspect
    import resource
    import statistics
    import time
    from types import SimpleNamespace

    module = ga
    if version:
        spec = importlib.util.spec_from_file_location("other_version", version)
        module = importlib.util.module_from_spec(spec)
        sys.modules["other_version"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    torch.manual_seed(0)
    if model_name:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float32)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=32_000,
            hidden_size=96,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=512,
        )
        model = LlamaForCausalLM(config)
    model.eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = rng.integers(vocab, size=(moves, prompt_tokens)).tolist()
    actions = rng.integers(vocab, size=(moves, 2)).tolist()
    pad = SimpleNamespace(pad_token_id=0)  # all the update needs of a tokenizer here
    with torch.no_grad():
        logp, on_action = ga.action_token_logprobs(model, prompts, actions, 0, 1.0)
    old = [row[mask].tolist() for row, mask in zip(logp, on_action)]
    advantages = torch.linspace(-1.0, 1.0, moves) + 0.01  # every move with A != 0
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved_logits = {}  # storage -> bytes, of the saved tensors with a vocabulary axis

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and tensor.dim() and tensor.shape[-1] == vocab:
            saved_logits[storage.data_ptr()] = storage.nbytes()
        return tensor

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GB (Linux: KiB)
    seconds, stats, kept_logits = [], {}, 0
    for r in range(rounds):
        saved_logits.clear()  # storages are freed after each update and their addresses reused
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        t = time.perf_counter()
        before_tokenizer = "pad_id" not in inspect.signature(module.grpo_update).parameters
        head = (model, pad) if before_tokenizer else (model,)  # versions before 2026-12 take one
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            stats = module.grpo_update(
                *head,
                prompts,
                actions,
                old,
                advantages,
                optimizer,
                np.random.default_rng(r),
                temperature=1.0,
                minibatch_moves=moves,
                **({} if before_tokenizer else {"pad_id": 0}),
            )
        seconds.append(time.perf_counter() - t)
        kept_logits = max(kept_logits, sum(saved_logits.values()))
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    full = moves * (prompt_tokens + 2) * vocab * 4  # one float32 (N, T, V) tensor
    return (
        f"| {version or 'grpo_agentic.py'} | {model_name or 'tiny Llama, V = 32,000'} | "
        f"{moves} x {prompt_tokens} | {kept_logits / full:.3f} | "
        f"{statistics.median(seconds):.2f} s | "
        f"{stats['ratio_dev_first']:.1e} | {peak_before:.2f} -> {peak_after:.2f} GB |"
    )


def solved_at(run_dir: str, it: int | None = None) -> dict:
    """One evaluation's row of a lab run's solved.jsonl: iteration `it`, or the last one."""
    path = os.path.join(run_dir, "solved.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir} has no solved.jsonl (made by experiments.py run)")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    picked = [r for r in rows if it is None or r["iter"] == it]
    if not picked:
        raise ValueError(f"{run_dir} has no evaluation at iteration {it}")
    return picked[-1]


def gain(run_dir: str, other_dir: str | None = None) -> str:
    """Greedy success before and after, paired layout by layout, with a 95 % t-interval on the
    mean of the per-layout differences (each -1, 0 or +1), and the churn: layouts lost and gained.
    One run: its first evaluation (the start of RL) against its last. With `other_dir`: this run's
    last evaluation against the other's last, on the same layouts (e.g. RL against a yardstick
    that spent the same minutes on more warm-up)."""
    after = solved_at(run_dir)
    before = solved_at(other_dir) if other_dir else solved_at(run_dir, 0)
    lines = [
        f"after: {run_dir} @ iter {after['iter']}; before: {other_dir or run_dir} @ iter "
        f"{before['iter']}",
        "| split | layouts | before | after | after - before [95 % CI] | lost | gained |",
        "|---|---|---|---|---|---|---|",
    ]
    for split in ("train", "held_out"):
        diffs, lost, gained = layout_change(before[split], after[split], split)
        lines.append(
            f"| {split} | {len(diffs)} | {np.mean(before[split]):.3f} | "
            f"{np.mean(after[split]):.3f} | {show_interval(diffs)} | {lost} | {gained} |"
        )
    return "\n".join(lines)


# ---- Command line -------------------------------------------------------------------------------
COMMANDS = (
    "run",
    "compare",
    "between",
    "plot",
    "self-check-control",
    "probe-baselines",
    "label-noise",
    "bump-memory",
    "rollout-speed",
    "update-cost",
    "shared-head",
    "gain",
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python experiments.py {{{','.join(COMMANDS)}}} ...\n\n{__doc__}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per saved policy
    try:
        if command in ("run", "compare"):
            flags = (ga.Settings, LabRun if command == "run" else Lab)
            parser = ga.HfArgumentParser(flags, prog=f"experiments.py {command}")

            def one_line_error(message: str):
                parser.exit(2, f"experiments.py {command}: error: {message}\n")

            parser.error = one_line_error
            try:
                s, more = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)
            except ValueError as e:
                parser.error(str(e))
            if not s.out_dir:
                parser.error("--out-dir is required")
            if command == "compare":
                print(compare(s, more, s.out_dir))
                return 0
            if ga.where_error(s):
                parser.error(ga.where_error(s))
            print("settings: " + json.dumps({**dataclasses.asdict(s), **dataclasses.asdict(more)}))
            lab_run(s, more, s.out_dir)
        elif command == "rollout-speed":
            if len(rest) > 1 or (rest and not os.path.isfile(rest[0])):
                print("experiments.py rollout-speed: error: give at most one file", file=sys.stderr)
                return 2
            print(rollout_speed(9, rest[0] if rest else None))
        elif command == "shared-head":
            if len(rest) != 1 or not os.path.exists(rest[0]):
                print("experiments.py shared-head: error: give one chat model", file=sys.stderr)
                return 2
            print(shared_head_speed(rest[0]))
        elif command == "update-cost":
            import argparse

            parser = argparse.ArgumentParser(prog="experiments.py update-cost")
            parser.add_argument("--model", default="", help="a model folder ('' = tiny Llama)")
            parser.add_argument("--moves", type=int, default=8)
            parser.add_argument("--prompt-tokens", type=int, default=256)
            parser.add_argument("--rounds", type=int, default=3)
            parser.add_argument("--version", default=None, help="another grpo_agentic.py")
            a = parser.parse_args(rest)
            if a.version and not os.path.isfile(a.version):
                parser.error(f"--version {a.version}: no such file")
            print(update_cost(a.model, a.moves, a.prompt_tokens, a.rounds, a.version))
        elif command == "gain":
            if not 1 <= len(rest) <= 2 or not all(os.path.isdir(d) for d in rest):
                print(
                    "experiments.py gain: error: give one or two run directories", file=sys.stderr
                )
                return 2
            print(gain(*rest))
        elif command == "plot":
            print(f"wrote {plot_command(rest)}")
        elif command == "between":
            if len(rest) != 2 or not all(os.path.isdir(d) for d in rest):
                print(
                    "experiments.py between: error: give two existing directories", file=sys.stderr
                )
                return 2
            print(between_dirs(*rest))
        elif len(rest) != 1 or not os.path.isdir(rest[0]):
            print(f"experiments.py {command}: error: give one existing directory", file=sys.stderr)
            return 2
        elif command == "self-check-control":
            print(self_check_control_table(rest[0]))
        elif command == "probe-baselines":
            print(probe_baselines(rest[0]))
        elif command == "bump-memory":
            print(bump_memory(rest[0]))
        else:
            print(label_noise(rest[0]))
    except ga.NonFiniteError as e:
        print(f"experiments.py {command}: stopped: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, ImportError) as e:
        print(f"experiments.py {command}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
