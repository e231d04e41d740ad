"""Agentic GRPO on a text gridworld, in one file: a teaching reference for arXiv 2509.23870.

    pip install -r requirements.txt && python grpo_agentic.py    # about 75 s on 2 CPU cores
    python grpo_agentic.py --help                                # every setting, with its meaning
    python grpo_agentic.py --model runs/<run>/policy --iters 0 --sft-steps 0   # evaluate a policy
    torchrun --standalone --nproc_per_node 2 grpo_agentic.py --out-dir runs/ddp   # data-parallel

A tiny Llama (built from a config: nothing is downloaded) is warm-started on oracle moves, then
trained with GRPO. Each iteration it plays G episodes on each of B layouts; every turn it reads the
grid as text (with --history H, also its last H turns) and *writes* its move; the reward is 1 if the
goal is reached within the budget, else 0. Every move inherits its episode's advantage: the reward
standardised within its group of G. With --cls-coef the actor also learns to judge its own moves
good or bad (the paper's classification objective, GCD: Generative Classification Disentanglement;
--cls-warmup-steps first trains the verdict alone, at its own --cls-lr).
Every --eval-every iterations: greedy success on seen and unseen layouts, the verdict's accuracy
and the gradient-coupling probe. `--model` trains a pretrained causal LM instead (a .gguf too).

Reading path. The lesson comes first, in the order the data flows:
  1. Prompts and the rollout    PromptFormat, history_prompt, action_ids_for, generate_actions,
                                Move, exact_format_parser, rollout
  2. Credit                     grpo_advantages, move_advantages
  3. The loss and the update    action_token_logprobs, action_logprobs, grpo_loss, grpo_update
  4. GCD: the actor's verdict   verdict_logprobs, classification_loss, verdict_aux_loss
  5. Diagnostics                squeezing_step, text_action_logprobs, coupling_probe
  6. One GRPO iteration         grpo_iteration: sample -> credit -> verdict's pairs -> update
Then what runs it on the toy (Settings, warm-up, evaluation, train, main), and an appendix to skip
on a first read: the checks (each core function calls one at its door), padding, data parallel
under torchrun (sums over ranks: the identity in one process), the chat template's pieces, the tiny
model, loading. One contract from the appendix matters everywhere:
batches are left-padded (left_pad), positions count real tokens only, and every sequence ends at
the right edge, so the sampler and the scorer see each token at the same position; a head of 32 or
more ids that every row shares (a chat's system turn) runs once per batch (forward_batch).
`CORE` marks what lifts out: it takes a model, a tokenizer, ids, tensors and plain numbers, never
Settings. The lab (experiments.py) adds GiGPO's step credit, oracle labels and more probes through
train()'s extension points. Deviations from DeepSeekMath GRPO and from the paper, and why:
README.md.

Shapes:  B tasks (layouts) per iteration, G episodes per task (the group), N moves in a batch,
         P prompt tokens, K generated action tokens, T = prompt + action tokens, V vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

import toy_env

# ================================ THE LESSON ================================================


# ---- 1. CORE: prompts as ids, and the rollout: all live episodes step together ---------------
@dataclass
class PromptFormat:
    """The ids that frame observations and moves. A prompt holding an episode's last turns is

        prefix + [obs + after_observation + move + after_move] per past turn
               + obs + after_observation

    Plain text (plain_format): prefix = the tokenizer's start tokens, nothing between turns. Chat
    (chat_format): the pieces of the tokenizer's chat template, the system turn in the prefix."""

    prefix: list[int]
    after_observation: list[int]
    after_move: list[int]
    turn_end: list[int]  # chat: [end-of-turn], added to a move cut off by the token budget
    move_lead: str  # the text before a move word: ' ' after a plain 'action:', '' in a chat


def history_prompt(
    fmt: PromptFormat, turns: list[tuple], observation_ids: list[int], history: int
) -> list[int]:
    """The prompt of one move, as ids: the last `history` turns, then what the agent sees now.
    `turns` holds (observation ids, action ids as sampled) pairs, oldest first:

        prompt = prefix + obs_{t-H} + act_{t-H} + ... + obs_{t-1} + act_{t-1} + obs_t

    each obs followed by fmt.after_observation and each act by fmt.after_move (PromptFormat).

    >>> fmt = PromptFormat([9], [], [], [], " ")
    >>> history_prompt(fmt, [([1, 2], [5, 0]), ([1, 3], [6, 0])], [1, 4], history=1)
    [9, 1, 3, 6, 0, 1, 4]
    """
    # Token-in/token-out: the actions are the ids the policy wrote, never decoded text encoded
    # again (' le' + 'ft' decodes to ' left', which encodes as one other token).
    ids = list(fmt.prefix)
    past = turns[max(0, len(turns) - history) :] if history else []  # [-0:] would keep them all
    for seen, written in past:
        ids += seen + fmt.after_observation + with_turn_end(written, fmt) + fmt.after_move
    return ids + observation_ids + fmt.after_observation


def with_turn_end(move: list[int], fmt: PromptFormat) -> list[int]:
    """A move as it stands in a later prompt: its ids as sampled, and in a chat an end-of-turn
    after a move the token budget cut off (the template closes every turn)."""
    if fmt.turn_end and move[-len(fmt.turn_end) :] != fmt.turn_end:
        return move + fmt.turn_end
    return move


def action_ids_for(tokenizer, action: str, fmt: PromptFormat) -> list[int]:
    """The one action format, as ids: move_lead + the word, then end-of-text (' left' + eos in
    plain text; 'left' + eos in a chat, where eos is the end-of-turn token)."""
    text = fmt.move_lead + action
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@torch.no_grad()
def generate_actions(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_tokens: int,
    temperature: float,
    greedy: bool,
    generator: torch.Generator | None,
):
    """Sample one action per prompt, each up to its end-of-text or `max_tokens` tokens.
    Returns (token ids per action, their log-probs, decoded texts): lists of N.

    Our own loop rather than `model.generate`: the tokens come from exactly softmax(logits / T)
    (no top-k/top-p/repetition processors), and the log-probs are the ones the loss will score."""
    check_sampler(model, tokenizer, temperature, generator)
    device = next(model.parameters()).device
    n = len(prompts)
    tokens = torch.zeros(n, max_tokens, dtype=torch.long, device=device)  # (N, K)
    token_logps = torch.zeros(n, max_tokens, device=device)  # (N, K)
    written = torch.zeros(n, max_tokens, dtype=torch.bool, device=device)  # (N, K) part of action
    finished = torch.zeros(n, dtype=torch.bool, device=device)  # (N,) end-of-text written
    broken = torch.zeros((), dtype=torch.bool, device=device)  # a NaN or +inf logit was seen
    # The prompts (a common head once: forward_batch), the last position's logits only:
    # (N, 1, V), not (N, P, V). mask and positions (N, T) go on with the cache.
    out, _, mask, positions = forward_batch(
        model, prompts, tokenizer.pad_token_id, keep=1, more_tokens=max_tokens, use_cache=True
    )
    for k in range(max_tokens):
        logits = out.logits[:, -1, :].float() / temperature  # (N, V)
        bad = torch.isnan(logits) | torch.isposinf(logits)  # (N, V); -inf is a legal mask
        broken |= bad.any()  # raised after the loop: checking here would wait on the device
        logprobs = torch.log_softmax(logits.masked_fill(bad, 0.0), dim=-1)  # (N, V)
        if greedy:
            token = logprobs.argmax(dim=-1)  # (N,)
        else:
            token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)  # (N,)
        tokens[:, k] = token
        token_logps[:, k] = logprobs.gather(1, token[:, None]).squeeze(1)
        written[:, k] = ~finished  # before the update below: end-of-text is part of the action
        finished |= token == tokenizer.eos_token_id
        # The one wait per token: stop as soon as every action is complete.
        if finished.all() or k == max_tokens - 1:
            break
        cache = getattr(out, "cache", None)
        require(cache is not None, "the model returned no key/value cache in out.cache")
        positions = positions[:, -1:] + 1  # (N, 1)
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
        out = model(
            input_ids=token[:, None],  # (N, 1)
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    if broken:
        raise NonFiniteError("the policy's logits are not finite")
    lengths = written.sum(dim=1).tolist()
    all_tokens = tokens.tolist()
    all_logps = token_logps.tolist()
    actions = [row[:length] for row, length in zip(all_tokens, lengths)]
    logps = [row[:length] for row, length in zip(all_logps, lengths)]
    texts = tokenizer.batch_decode(actions, skip_special_tokens=True)
    return actions, logps, texts


@dataclass
class Move:
    """One decision: what the policy read, what it wrote (token ids, as sampled), what it meant."""

    episode: int  # e = b * G + g: episode g of group (task) b; group = episode // G
    prompt_ids: list[int]  # everything the policy read: history, then the current observation
    observation_ids: list[int]  # the current observation alone
    action_ids: list[int]  # as sampled; end-of-text included when it was generated
    sample_logps: list[float]  # log pi(token) recorded while sampling: the old log-probs
    text: str  # decoded, for logs
    action: str | None  # what the parser made of the ids; None = off-format
    info: dict  # what the environment's step returned; an oracle's label is info["good"]


def exact_format_parser(tokenizer, actions: tuple[str, ...], fmt: PromptFormat | None = None):
    """A parser of action ids: the action whose ids are exactly action_ids_for's, else None.
    Anything else, say 'left \\n \\n', is off-format. `fmt`: the rollout's (default plain)."""
    fmt = fmt or plain_format(tokenizer)
    formats = {tuple(action_ids_for(tokenizer, a, fmt)): a for a in actions}
    unknown = tokenizer.unk_token_id in sum(map(list, formats), [])
    require(
        len(formats) == len(actions) and not unknown,
        f"the tokenizer cannot write the actions {actions} apart: add their words to it",
    )

    def parse(ids: list[int]) -> str | None:
        return formats.get(tuple(ids))

    parse.tokens_needed = max(len(ids) for ids in formats)  # rollout checks its budget against it
    parse.fmt = fmt  # rollout checks that it prompts in the format this parser reads
    return parse


def rollout(
    model,
    tokenizer,
    groups: list[list],
    parse,
    *,
    max_action_tokens: int,
    temperature: float,
    fmt: PromptFormat | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    history: int = 0,
    max_turns: int = 100,
    sample=None,
):
    """Play one episode in each environment, all at once: (moves in the order played, rewards).

    groups: B lists of G environments each, the G episodes of one task; rewards (B, G), each
    episode's summed rewards (an outcome reward: what its last step returned). An environment has
    reset() -> observation text and step(action) -> (observation text, reward, done, info);
    parse(action ids) -> the action for step, None for off-format ids (step must then move
    nothing). `fmt` frames the prompts (default plain text; chat_format for instruct models).
    An episode still running after `max_turns` turns is cut off, with a warning. `sample`
    (default generate_actions) has its signature: the lab's self-check wraps it."""
    fmt = fmt or plain_format(tokenizer)
    check_rollout(model, tokenizer, groups, parse, fmt, max_action_tokens)
    sample = sample or generate_actions
    envs = [env for group in groups for env in group]  # group-major: episode e is in group e // G
    seen = encode_observations(tokenizer, [env.reset() for env in envs])  # current observation
    turns = [[] for _ in envs]  # per episode: (observation ids, action ids) of each turn so far
    rewards = torch.zeros(len(envs))  # (B*G,)
    moves = []
    live = list(range(len(envs)))  # episodes still running
    for _ in range(max_turns):
        prompt_ids = [history_prompt(fmt, turns[i], seen[i], history) for i in live]
        action_ids, logps, texts = sample(
            model, tokenizer, prompt_ids, max_action_tokens, temperature, greedy, generator
        )
        observations, still_live = [], []
        for i, p, a, lp, text in zip(live, prompt_ids, action_ids, logps, texts):
            action = parse(a)
            observation, reward, done, info = envs[i].step(action)
            rewards[i] += reward
            moves.append(Move(i, p, seen[i], a, lp, text, action, info))
            turns[i].append((seen[i], a))
            if not done:
                observations.append(observation)
                still_live.append(i)
        live = still_live
        for i, ids in zip(live, encode_observations(tokenizer, observations)):
            seen[i] = ids
        if not live:
            break
    warn_after_rollout(moves, live, max_turns)
    return moves, rewards.view(len(groups), -1)  # rewards (B, G)


# ---- 2. CORE: credit: one advantage per episode, inherited by every move of it -----------------
def grpo_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6):
    """Group-relative advantage, (num_groups, G) -> (num_groups, G).

        A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps),   std with ddof=0 (population std)
        A_ij =  r_ij - mean_j r_ij                          if not scale_by_std (Dr. GRPO)

    A group whose rewards are all equal carries no signal and gets exactly 0 (never NaN).

    >>> grpo_advantages(torch.tensor([[1., 0., 0., 1.], [1., 1., 1., 1.]]))
    tensor([[ 1.0000, -1.0000, -1.0000,  1.0000],
            [ 0.0000,  0.0000,  0.0000,  0.0000]])
    """
    rewards = as_tensor(rewards)  # a list or a numpy array too
    # 1-D is refused rather than read as one group: one baseline across all tasks would be the
    # silent result of a forgotten .view(B, G).
    require(
        rewards.dim() == 2,
        f"rewards must be (num_groups, G), got {tuple(rewards.shape)}: "
        "use rewards.view(B, G), or rewards[None] for one group",
    )
    rewards = rewards if rewards.is_floating_point() else rewards.float()  # 0/1 counts, bools
    mean = rewards.mean(dim=1, keepdim=True)  # (num_groups, 1)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)  # (num_groups, 1)
    if scale_by_std:
        advantages = (rewards - mean) / (std + eps)  # (num_groups, G)
    else:
        advantages = rewards - mean
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # (num_groups, 1)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)


def move_advantages(rewards: torch.Tensor, episodes: list[int], scale_by_std: bool = True):
    """The credit of each move, (N,): the step where outcome RL becomes *agentic* RL.

        A_i = A_episode[e(i)]

    rewards (B, G), as rollout returns them; episodes[i] = e(i), the episode of move i
    (Move.episode). Good and flawed moves of one episode get the same credit: only the average
    over many episodes tells them apart (the paper's Lemma 3.1). GiGPO adds a step-level term.

    Two groups of two: episode 0 won in two moves, 1 lost in one; 2 and 3 both won (no signal).
    >>> move_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), [0, 1, 0, 2, 3])
    tensor([ 1.0000, -1.0000,  1.0000,  0.0000,  0.0000])
    """
    rewards = as_tensor(rewards)  # a list or a numpy array too
    check_credit(rewards, episodes)
    episode_adv = grpo_advantages(rewards, scale_by_std).flatten()  # (B*G,)
    return episode_adv[episodes]  # (N,) each move inherits its episode's


# ---- 3. CORE: the loss and the update: a clipped surrogate over the action tokens --------------
def action_token_logprobs(
    model, prompts: list[list[int]], actions: list[list[int]], pad_id: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a_k | prompt, a_<k) of every action token, and on_action, True on real ones:

        logp[i, k] = log softmax(logits / temperature)[a_ik]        (N, K), K = longest action

    Row i's action fills its last len(a_i) columns (right-aligned):
        prompts [[7, 8], [9]], actions [[1, 2], [3]]  ->  rows [7 8 1 2], [pad pad 9 3];
        logp[0] = [lp(1), lp(2)], logp[1] = [0, lp(3)]; on_action [[T, T], [F, T]]
    """
    # No default temperature: the loss must score the distribution the rollout sampled from.
    device = next(model.parameters()).device
    k = max(len(a) for a in actions)
    sequences = [p + a for p, a in zip(prompts, actions)]
    # Left-padded as the sampler pads (positions count real tokens), so every action ends at the
    # right edge, and `logits_to_keep` builds (N, K + 1, V) logits instead of (N, T, V): for a
    # 50k vocabulary and 256-token prompts, the memory of the whole update.
    out, ids, _, _ = forward_batch(model, sequences, pad_id, keep=k + 1)  # ids (N, T)
    logits = out.logits[:, -(k + 1) : -1].float() / temperature  # (N, K, V) predict the last K
    logp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, -k:, None]).squeeze(2)  # (N, K)
    lengths = torch.tensor([len(a) for a in actions], device=device)  # (N,)
    on_action = torch.arange(k, device=device)[None, :] >= k - lengths[:, None]  # (N, K)
    return logp.masked_fill(~on_action, 0.0), on_action


def action_logprobs(
    model, prompts: list[list[int]], actions: list[list[int]], pad_id: int, temperature: float
) -> torch.Tensor:
    """log pi(action | prompt) of each whole action: its tokens' log-probs summed, (N,)."""
    logp, _ = action_token_logprobs(model, prompts, actions, pad_id, temperature)  # (N, K)
    return logp.sum(dim=1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    num_tokens=None,
):
    """PPO-clipped surrogate over the action tokens, token-level mean, plus an optional KL.
    logp, old_logp, ref_logp, action_mask (N, K) as action_token_logprobs gives them; advantages
    (N,). Sums run over the action tokens t (action_mask_t = 1); n_tok is their count, or
    `num_tokens` (under torchrun: every process's count, so that the mean is over all of them):

        ratio_t = exp(logp_t - old_logp_t)
        L_pg    = -(1 / n_tok) * sum_t min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)
        KL      =  (1 / n_tok) * sum_t (exp(d_t) - d_t - 1),   d_t = ref_logp_t - logp_t
        L       = L_pg + kl_coef * KL

    Returns (L, info): info["pg_loss"] is L_pg, info["ratio_dev"] = max_t |ratio_t - 1|."""
    check_loss(logp, old_logp, advantages, ref_logp, kl_coef)
    advantages = advantages.to(logp.device)  # (N,) wherever they were computed
    on_action = action_mask.bool()  # (N, K)
    # Normaliser: every action token of the minibatch weighs the same (DAPO's token-level mean),
    # however the tokens split into moves and episodes.
    n_tok = on_action.sum().clamp(min=1)
    n_mean = n_tok if num_tokens is None else num_tokens  # the mean's denominator
    # Padding is left out before any exp, so it can never overflow into NaN.
    adv = advantages[:, None].expand_as(logp)[on_action]  # (n_tok,) each token its move's A
    ratio = torch.exp(logp[on_action] - old_logp[on_action])  # (n_tok,)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (n_tok,)
    pg_loss = -surrogate.sum() / n_mean
    loss = pg_loss
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp[on_action] - logp[on_action]  # (n_tok,) Schulman's k3 of KL(pi || pi_ref)
        kl = (torch.exp(d) - d - 1).sum() / n_mean
        loss = pg_loss + kl_coef * kl
    deviation = (ratio.detach() - 1).abs()  # (n_tok,)
    info = {
        "pg_loss": pg_loss.item(),
        "clip_frac": (deviation > clip_eps).float().sum().item() / float(n_mean),
        "kl": kl.item(),
        "ratio_dev": deviation.max().item() if len(deviation) else 0.0,
    }
    return loss, info


def minibatches(
    n: int, size: int, rng: np.random.Generator, total: int | None = None
) -> list[np.ndarray]:
    """A fresh shuffle of range(n) cut into round(total / size) near-equal minibatches (sizes
    differ by at most 1), so that no tiny remainder gets a full optimiser step of its own.
    `total`: the moves of every process under torchrun, so that each cuts its own n into as many
    minibatches (default: n).

    >>> [len(b) for b in minibatches(600, 256, np.random.default_rng(0))]
    [300, 300]
    >>> [len(b) for b in minibatches(3, 2, np.random.default_rng(0), total=8)]  # 5 on other ranks
    [1, 1, 1, 0]
    """
    require(size >= 1, f"a minibatch holds at least one move, got size {size}")
    require(hasattr(rng, "permutation"), "rng: a numpy Generator, np.random.default_rng(seed)")
    total = n if total is None else total
    return np.array_split(rng.permutation(n), max(1, round(total / size)))


RATIO_TOLERANCE = 1e-3  # the first minibatch's max |ratio - 1| when sampler and scorer agree


def grpo_update(
    model,
    prompts: list[list[int]],
    actions: list[list[int]],
    old_logps: list[list[float]],
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    *,
    pad_id: int,
    temperature: float,
    clip_eps: float = 0.2,
    epochs: int = 1,
    minibatch_moves: int = 96,
    ref_model=None,
    kl_coef: float = 0.0,
    aux_loss=None,
    aux_coef: float = 0.0,
) -> dict:
    """One GRPO update over an iteration's moves; returns statistics for the log.

    One entry per move: prompt ids, action ids and their log-probs as sampled (the old
    log-probs, Move.sample_logps), advantages (N,). Only moves with A != 0 enter the loss.
    `epochs` passes, each a fresh shuffle (`rng`) cut into minibatches of about `minibatch_moves`
    moves: one AdamW step per minibatch, gradient norm clipped at 1, on

        L = L_pg + kl_coef * KL(pi || ref_model) + aux_coef * aux_loss(k, n)

    aux_loss(k, n): an auxiliary loss for minibatch k of the epoch's n, or None (GCD's verdict:
    verdict_aux_loss); aux_loss.min_steps, if set, is the fewest steps it needs (steps beyond the
    moves' minibatches carry it alone). `temperature`: the rollout's (no default). The model
    samples and is scored in eval mode (dropout off), so the first minibatch's ratio is 1."""
    check_update(model, actions, old_logps, advantages, optimizer, ref_model, kl_coef)
    require(epochs >= 1, f"epochs must be >= 1, got {epochs}: no step would be taken")
    require((aux_coef > 0) == (aux_loss is not None), "aux_coef > 0 and an aux_loss go together")
    device = next(model.parameters()).device
    # Moves with A = 0 have no gradient through the surrogate: left in, they would only dilute
    # the token mean (and take the KL where they carry no signal).
    signal = (advantages != 0).nonzero().flatten().tolist()  # indices of moves with A != 0
    # torchrun: each process (rank) holds a share of the moves. Counts are summed over all of
    # them (ranks_sum; the count itself in one process), so that every rank takes the same
    # steps, each on the token mean over every rank's tokens, summing their gradients.
    total = ranks_sum(len(signal))
    if not total and aux_loss is None:
        warnings.warn("every advantage is 0 (no group with mixed rewards): no step", stacklevel=2)
    steps = []
    for _ in range(epochs if total or aux_loss else 0):
        parts = minibatches(len(signal), minibatch_moves, rng, total)  # [empty]: no signal here
        # An aux loss with more than the moves' minibatches can carry (GCD's pairs, when few moves
        # have A != 0) gets steps of its own, so that no backward pass holds more than its bound.
        parts += [np.array([], dtype=int)] * (getattr(aux_loss, "min_steps", 1) - len(parts))
        for k, part in enumerate(parts):
            tokens = ranks_sum(sum(len(actions[signal[j]]) for j in part))  # torchrun: all ranks'
            if not tokens and aux_loss is None:
                continue  # torchrun: no rank has a move in this step (one process: never here)
            loss = torch.zeros((), device=device)
            nothing = 0.0 if tokens else math.nan  # torchrun: an empty share adds 0 to the sums
            info = {"pg_loss": nothing, "clip_frac": nothing, "kl": nothing}
            if len(part):
                idx = [signal[j] for j in part]
                batch_prompts = [prompts[i] for i in idx]
                batch_actions = [actions[i] for i in idx]
                logp, on_action = action_token_logprobs(
                    model, batch_prompts, batch_actions, pad_id, temperature
                )  # (n, K) each, actions right-aligned
                old = torch.zeros_like(logp)  # (n, K)
                recorded = [lp for i in idx for lp in old_logps[i]]  # row by row, in token order
                old[on_action] = torch.tensor(recorded, device=device)
                ref = None
                if ref_model is not None:
                    with torch.no_grad():
                        ref, _ = action_token_logprobs(
                            ref_model, batch_prompts, batch_actions, pad_id, temperature
                        )  # (n, K)
                move_adv = advantages[idx].to(device)  # (n,)
                loss, info = grpo_loss(
                    logp, old, move_adv, on_action, clip_eps, ref, kl_coef, num_tokens=tokens
                )
                # The first minibatch is scored by the very weights that sampled: ratio 1.
                if not steps and info["ratio_dev"] > RATIO_TOLERANCE:
                    warnings.warn(
                        f"the first minibatch's ratio is off 1 by {info['ratio_dev']:.3g}: the "
                        "scorer does not score what the sampler sampled (old log-probs from "
                        "weights that have changed since: a second update on the same batch? "
                        "The same temperature? Dropout off: model.eval()? float32 weights? "
                        "position_ids honoured?)",
                        stacklevel=2,
                    )
            aux = aux_loss(k, len(parts)) if aux_loss else None
            if aux is not None:
                loss = loss + aux_coef * aux
            if not torch.isfinite(loss):
                raise NonFiniteError(f"the GRPO loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # not so for a rank whose share of this step is empty
                loss.backward()
            sum_gradients(model)  # torchrun: every rank's gradient, summed, on every rank
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            info["loss"] = loss.item()
            info["aux_loss"] = aux.item() if aux is not None else math.nan
            steps.append(info)
    stats = {}
    for key in ("loss", "pg_loss", "clip_frac", "kl", "aux_loss"):
        values = [x[key] for x in steps if not math.isnan(x[key])]
        stats[key] = float(np.mean(values)) if values else math.nan
    stats["ratio_dev_first"] = next((x["ratio_dev"] for x in steps if "ratio_dev" in x), math.nan)
    stats["update_moves"] = len(signal)
    return stats


# ---- 4. CORE: GCD, the actor classifies its own moves -------------------------------------------
# The verdict is read from the actor's own LM head (no new parameters): after a move the query is
# appended (' verdict:' in plain text; in a chat a user turn asking it) and the verdict words are
# scored. Listed by label, so that verdict column c is label c everywhere.
VERDICT_QUERY = " verdict:"
VERDICTS = (" bad", " good")
BAD, GOOD = 0, 1
CHAT_VERDICT_QUESTION = "Was your last move good or bad? Answer with one word."
CHAT_VERDICTS = ("bad", "good")  # listed by label, as VERDICTS


@dataclass
class VerdictFormat:
    """The ids that ask the actor for its verdict on a move: move + query, then a verdict word."""

    query: list[int]  # appended after the move
    words: list[list[int]]  # the verdict words' ids, by label: words[BAD], words[GOOD]
    turn_end: list[int]  # as PromptFormat's: closes a move the token budget cut off


def plain_verdict(tokenizer) -> VerdictFormat:
    """The verdict in plain text: move + ' verdict:', then ' bad' or ' good'."""
    return verdict_format(tokenizer, VERDICT_QUERY, VERDICTS, turn_end=[])


def verdict_logprobs(
    model, prompts: list[list[int]], actions: list[list[int]], verdict: VerdictFormat, pad_id: int
) -> torch.Tensor:
    """The actor's own verdict on (state, move) pairs, read from its LM head:

        logp[i, c] = log p(verdict word c | prompt_i, action_i, query)      (N, 2)

    A verdict word of several tokens scores the sum of their log-probs."""
    require(prompts, "no (state, move) pairs to judge: the verdict needs at least one")
    asked = [p + with_turn_end(a, verdict) + verdict.query for p, a in zip(prompts, actions)]
    if all(len(w) == 1 for w in verdict.words):  # both read at one position: one short forward
        out, *_ = forward_batch(model, asked, pad_id, keep=1)
        last = out.logits[:, -1].float()  # (N, V) after the query
        return torch.log_softmax(last, dim=-1)[:, [w[0] for w in verdict.words]]  # (N, 2)
    logps = [action_logprobs(model, asked, [w] * len(asked), pad_id, 1.0) for w in verdict.words]
    return torch.stack(logps, dim=1)  # (N, 2)


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (N, 2) scores against (N,) labels (column = label), each class weighing
    the same whatever its count:

        L = mean over the classes c present of ( mean_{i: y_i = c} -log softmax(logits_i)[y_i] )

    Two good moves scored log 2 each, one bad move scored log(1 + e^2):
    >>> logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    >>> round(balanced_cross_entropy(logits, torch.tensor([1, 1, 0])).item(), 4)
    1.41
    """
    # Unweighted, where most moves are good, "always good" would be a minimum.
    check_labels(labels)
    target = labels.to(logits.device).long()  # (N,) class ids, also from 0./1. or bools
    count = torch.bincount(target, minlength=2).float()  # (2,)
    weight = torch.where(count > 0, 1 / count.clamp(min=1), 0.0)  # (2,)
    return F.cross_entropy(logits, target, weight=weight)


def classification_loss(
    model,
    prompts: list[list[int]],
    actions: list[list[int]],
    labels: torch.Tensor,
    verdict: VerdictFormat,
    pad_id: int,
) -> torch.Tensor:
    """Balanced cross-entropy of the actor's verdict on (state, move) pairs; labels 1 = good."""
    # The two words' log-probs, over the whole vocabulary, serve as logits: the cross-entropy
    # renormalises them over the two, p(good) / (p(good) + p(bad)).
    logps = verdict_logprobs(model, prompts, actions, verdict, pad_id)  # (N, 2)
    return balanced_cross_entropy(logps, labels)


def advantage_labelled_pairs(
    prompts: list[list[int]], actions: list[list[int]], advantages: torch.Tensor
):
    """What a real agent can label without an oracle: each move with A != 0, labelled by the sign
    of A (1 = good, 0 = bad). Noisy by design: a flawed move in a lucky episode gets A > 0
    (Lemma 3.1's other face). Returns (prompts, actions, labels (n,))."""
    keep = (advantages != 0).nonzero().flatten().tolist()
    labels = (advantages[keep] > 0).long()  # (n,)
    return [prompts[i] for i in keep], [actions[i] for i in keep], labels


def verdict_aux_loss(
    model,
    prompts: list[list[int]],
    actions: list[list[int]],
    labels: torch.Tensor,
    verdict: VerdictFormat,
    pad_id: int,
    rng: np.random.Generator,
    max_pairs: int | None = None,
    max_batch: int | None = None,
):
    """GCD's door into grpo_update: aux_loss(k, n), the classification loss on the k-th of n
    near-equal shares of the labelled pairs, reshuffled with `rng` at every epoch's first step
    (None for an empty share). At most `max_pairs` pairs, drawn now at random; None when there
    is no pair (aux_loss.pairs: how many it holds). At most `max_batch` pairs in one share:
    aux_loss.min_steps = ceil(pairs / max_batch) tells grpo_update how many steps that takes, so
    memory does not grow with the pairs. `rng`: a generator of the verdict's own, so that its
    draws leave those of the layouts and minibatches as they are without it."""
    require(max_batch is None or max_batch >= 1, f"max_batch must be >= 1, got {max_batch}")
    keep = rng.permutation(len(prompts))[:max_pairs]  # (n,) at random, capped
    if not len(keep):
        return None
    prompts = [prompts[i] for i in keep]
    actions = [actions[i] for i in keep]
    labels = labels[keep]
    shares = []

    def aux_loss(k: int, n: int) -> torch.Tensor | None:
        if k == 0:
            shares[:] = np.array_split(rng.permutation(len(prompts)), n)
        share = shares[k]
        if not len(share):
            return None
        return classification_loss(
            model,
            [prompts[i] for i in share],
            [actions[i] for i in share],
            labels[share],
            verdict,
            pad_id,
        )

    aux_loss.pairs = len(keep)
    aux_loss.min_steps = math.ceil(len(keep) / (max_batch or len(keep)))
    return aux_loss


# ---- 5. CORE: diagnostics: the paper's claims, measured (oracle labels, never trained on) -------
def squeezing_step(probs: torch.Tensor, action: int, advantage: float, lr: float) -> torch.Tensor:
    """One exact policy-gradient step on the logits z of a softmax policy pi = softmax(z), (K,):

        z' = z + lr * A * d log pi(action) / dz = z + lr * A * (onehot(action) - pi)

    With A < 0 every other logit rises by lr*|A|*pi_j: the most likely action gains most (the
    "squeezing effect", Ren & Sutherland 2024), even when it is itself a bad one.

    >>> squeezing_step(torch.tensor([0.3, 0.5, 0.2]), action=0, advantage=-1.0, lr=0.5)
    tensor([0.1968, 0.5975, 0.2057])

    Actions 0 and 1 are bad, 2 is good: bad action 1 rises from 0.50 to 0.60, yet bad mass falls
    0.80 -> 0.79 and good action 2 gains 0.20 -> 0.21.
    """
    onehot = F.one_hot(torch.tensor(action, device=probs.device), len(probs)).to(probs.dtype)
    z = torch.log(probs) + lr * advantage * (onehot - probs)
    return torch.softmax(z, dim=0)


def text_action_logprobs(
    model, tokenizer, observations: list[str], actions: list[str], fmt: PromptFormat
) -> torch.Tensor:
    """log pi(action | observation) from texts, no history, in the one action format, (N,)."""
    prompts = no_history_prompts(tokenizer, observations, fmt)
    action_ids = [action_ids_for(tokenizer, a, fmt) for a in actions]
    return action_logprobs(model, prompts, action_ids, tokenizer.pad_token_id, 1.0)


def no_history_prompts(tokenizer, observations: list[str], fmt: PromptFormat) -> list[list[int]]:
    """Prompts of the current observation alone (history 0)."""
    return [history_prompt(fmt, [], ids, 0) for ids in encode_observations(tokenizer, observations)]


def coupling_probe(model, tokenizer, pairs: list[tuple[str, str, str]], fmt: PromptFormat) -> dict:
    """Gradient coupling between near-identical states, over (obs_good, obs_flawed, action)
    triples: the same move, good in the first observation and flawed in the second. With
    g_x = grad_theta log pi(action | obs_x) (whole action, all parameters), over the pairs:

    coupling_cos   = mean cos(g_good, g_flawed)
    coupling_ratio = median <g_good, g_flawed> / <g_good, g_good>: a small step along g_good
                     raises log pi(a|s_good) by eta*|g_good|^2 and log pi(a|s_flawed) by
                     eta*<g_good, g_flawed> (first order), so the share of the gain that leaks
    hidden_cos     = mean cos(h_good, h_flawed), last-layer hidden states where the move is
                     predicted; _move: at the move's last token; _centred: minus the probe's
                     mean state (a component every grid shares). NaN with one pair.

    Changes no weight, no .grad and no train/eval mode (torch.autograd.grad)."""
    require(pairs, "coupling_probe needs at least one (obs_good, obs_flawed, action) pair")
    was_training = model.training
    model.eval()  # no dropout noise in the probe
    params = [p for p in model.parameters() if p.requires_grad]
    cosines, ratios = [], []
    for obs_good, obs_flawed, action in pairs:
        observations = [obs_good, obs_flawed]
        logps = text_action_logprobs(model, tokenizer, observations, [action, action], fmt)  # (2,)
        g_good = torch.cat(
            [g.flatten() for g in torch.autograd.grad(logps[0], params, retain_graph=True)]
        ).float()
        g_flawed = torch.cat([g.flatten() for g in torch.autograd.grad(logps[1], params)]).float()
        # In float32: in bfloat16, twins 0.999 alike read exactly 1.0.
        good_sq = (g_good @ g_good).item()
        flawed_sq = (g_flawed @ g_flawed).item()
        dot = (g_good @ g_flawed).item()
        # A zero gradient has no cosine (and, if it is g_good's, no ratio): that pair is left out.
        if good_sq * flawed_sq > 0:
            cosines.append(dot / math.sqrt(good_sq * flawed_sq))
        if good_sq > 0:
            ratios.append(dot / good_sq)
    states, moves = twin_hidden_states(model, tokenizer, pairs, fmt)  # (pairs, 2, d) each
    model.train(was_training)
    # One pair has no centred cosine: centred on its own two states, the twins are each other's
    # negative, a cosine of -1 by construction.
    centred = states - states.mean(dim=(0, 1))  # (pairs, 2, d)

    def twin_cosine(h: torch.Tensor) -> float:
        return F.cosine_similarity(h[:, 0], h[:, 1], dim=1).mean().item()

    return {
        "coupling_cos": float(np.mean(cosines)) if cosines else math.nan,
        # The median: as a good move nears certainty |g_good| shrinks and its ratio explodes.
        "coupling_ratio": float(np.median(ratios)) if ratios else math.nan,
        "hidden_cos": twin_cosine(states),
        "hidden_cos_move": twin_cosine(moves),
        "hidden_cos_centred": twin_cosine(centred) if len(pairs) > 1 else math.nan,
    }


@torch.no_grad()
def twin_hidden_states(model, tokenizer, pairs: list[tuple[str, str, str]], fmt: PromptFormat):
    """The last layer's hidden states of each (obs_good, obs_flawed, action) pair's twins, in the
    model's current mode: (states, moves), (pairs, 2, d) each, float32; states where the move is
    predicted, moves at the move's last token."""
    states, moves = [], []
    for obs_good, obs_flawed, action in pairs:  # left-padded: both rows end with the move
        prompts = no_history_prompts(tokenizer, [obs_good, obs_flawed], fmt)
        move = action_ids_for(tokenizer, action, fmt)
        both = [p + move for p in prompts]
        ids, attention, positions = model_inputs(model, both, tokenizer.pad_token_id)
        out = model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        hidden = out.hidden_states[-1].float()  # (2, T, d)
        states.append(hidden[:, -len(move) - 1])  # (2, d) where the move is predicted
        moves.append(hidden[:, -1])  # (2, d) the move's last token
    return torch.stack(states), torch.stack(moves)  # (pairs, 2, d) each


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present of the recall, (TPR + TNR) / 2: "always good" scores 0.5,
    whatever the share of good moves (plain accuracy would score that share).

    >>> balanced_accuracy(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 1, 0, 0]))
    0.75
    """
    check_labels(predicted, "predicted")  # 0/1 calls, not probabilities
    labels = labels.to(predicted.device)  # (N,) beside the predictions, wherever they are
    recalls = [(predicted[labels == c] == c).float().mean().item() for c in labels.unique()]
    return float(np.mean(recalls))


def verdict_is_good(
    model, prompts: list[list[int]], actions: list[list[int]], verdict: VerdictFormat, pad_id: int
) -> torch.Tensor:
    """(N,) bool: does the actor's verdict call each move good? A tie counts as good."""
    logps = verdict_logprobs(model, prompts, actions, verdict, pad_id)  # (N, 2)
    return logps[:, GOOD] >= logps[:, BAD]


# ---- 6. One GRPO iteration on the toy: sample -> credit -> the verdict's pairs -> update --------
def sample_groups(model, tokenizer, layouts, rng, generator, s: Settings, fmt: PromptFormat):
    """G episodes on each of B layouts drawn from `layouts` with `rng`, played by rollout:
    (moves, rewards (B, G), groups)."""
    # torchrun: rank 0 draws the B layouts for all (the ranks' generators part at the first
    # minibatch shuffle, whose draws depend on each rank's number of moves), each plays its share.
    picked = on_rank_zero(lambda: rng.choice(len(layouts), size=s.tasks_per_iter, replace=False))
    rank, world = rank_and_world()
    picked = np.array_split(picked, world)[rank]  # (B / ranks,) whole groups
    groups = [
        [toy_env.GridWorld.from_string(layouts[b]) for _ in range(s.group_size)] for b in picked
    ]  # B lists of G environments: a group is one task's G episodes
    parse = exact_format_parser(tokenizer, toy_env.ACTIONS, fmt)
    moves, rewards = rollout(
        model,
        tokenizer,
        groups,
        parse,
        max_action_tokens=s.max_action_tokens,
        temperature=s.temperature,
        fmt=fmt,
        generator=generator,
        history=s.history,
    )  # rewards (B, G)
    return moves, rewards, groups


def grpo_iteration(
    model,
    tokenizer,
    layouts: list[str],
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    generator: torch.Generator,
    s: Settings,
    fmt: PromptFormat,
    verdict: VerdictFormat,
    ref_model=None,
    credit=None,
    labeller=None,
    verdict_rng: np.random.Generator | None = None,
):
    """One iteration at the optimizer's current learning rate. Returns its row of statistics and
    what was played: (row, moves, rewards (B, G), groups). `credit` and `labeller`: the lab's.
    `verdict_rng`: the verdict's own draws (needed with --cls-coef), apart from `rng`'s layouts."""
    started = time.time()
    # 1. Sample: G episodes on each of B train layouts drawn at random, all stepping together.
    moves, rewards, groups = sample_groups(model, tokenizer, layouts, rng, generator, s, fmt)
    sampled = time.time()
    # 2. Credit: every move inherits its episode's group-relative advantage.
    if credit is None:
        advantages = move_advantages(rewards, [m.episode for m in moves], s.scale_by_std)  # (N,)
    else:
        advantages = credit(rewards, moves)  # (N,) the lab's GiGPO
    prompts = [m.prompt_ids for m in moves]
    actions = [m.action_ids for m in moves]
    # 3. GCD (--cls-coef > 0): the verdict's loss on up to --cls-samples labelled moves joins L.
    aux_loss = None
    if s.cls_coef > 0:
        if labeller is None:
            labelled = advantage_labelled_pairs(prompts, actions, advantages)  # sign of A
        else:
            labelled = labeller(moves, advantages, tokenizer)  # the lab's oracle labels
        require(verdict_rng is not None, "--cls-coef > 0 draws its pairs from a verdict_rng")
        pad = tokenizer.pad_token_id
        aux_loss = verdict_aux_loss(
            model, *labelled, verdict, pad, verdict_rng, s.cls_samples, s.cls_batch
        )
    # 4. Update: the clipped surrogate on the moves with A != 0 (+ KL, + the verdict's loss).
    stats = grpo_update(
        model,
        prompts,
        actions,
        [m.sample_logps for m in moves],
        advantages,
        optimizer,
        rng,
        pad_id=tokenizer.pad_token_id,
        temperature=s.temperature,
        clip_eps=s.clip_eps,
        epochs=s.epochs,
        minibatch_moves=s.minibatch_moves,
        ref_model=ref_model,
        kl_coef=s.kl_coef,
        aux_loss=aux_loss,
        aux_coef=s.cls_coef if aux_loss else 0.0,
    )
    stats = {"cls_loss" if k == "aux_loss" else k: v for k, v in stats.items()}  # GCD's loss
    row = {
        **rollout_stats(*everyones(moves, rewards, advantages)),  # torchrun: every rank's
        "lr": optimizer.param_groups[0]["lr"],
        **update_stats_over_ranks(stats),
        "cls_pairs": aux_loss.pairs if aux_loss else 0,
        "rollout_s": round(sampled - started, 3),
        "update_s": round(time.time() - sampled, 3),
    }
    return row, moves, rewards, groups


def rollout_stats(moves: list[Move], rewards: torch.Tensor, move_adv: torch.Tensor) -> dict:
    """What one iteration's rollouts look like, for the log. The oracle's labels (info["good"])
    show Lemma 3.1 at work: the mean advantage of flawed moves, and how many get A > 0 all the
    same; cls_label_noise is how often the sign of A mislabels a move (diagnostics only). An
    environment whose info has no "good" leaves these oracle columns NaN."""
    labelled = all("good" in m.info for m in moves)
    labels = [bool(m.info.get("good")) for m in moves]  # the oracle's, False where absent
    good = torch.tensor(labels)  # (N,)
    label_wrong = [(a > 0) != g for g, a in zip(labels, move_adv.tolist()) if a != 0]
    stats = {
        "success": rewards.mean().item(),
        "moves": len(moves),
        "valid_frac": float(np.mean([m.action is not None for m in moves])),
        "good_frac": float(np.mean(labels)),
        "mixed_groups": (rewards.std(dim=1) > 0).float().mean().item(),
        "adv_abs_mean": move_adv.abs().mean().item(),
        "flawed_frac": (~good).float().mean().item(),
        "adv_flawed_mean": move_adv[~good].mean().item(),  # NaN (null) without a flawed move
        "adv_good_mean": move_adv[good].mean().item(),
        "flawed_pos_adv_frac": (move_adv[~good] > 0).float().mean().item(),
        "cls_label_noise": float(np.mean(label_wrong)) if label_wrong else math.nan,
    }
    if labelled:
        return stats
    oracle = ["good_frac", "flawed_frac", "adv_flawed_mean", "adv_good_mean"]
    oracle += ["flawed_pos_adv_frac", "cls_label_noise"]  # what needs info["good"]
    return {k: math.nan if k in oracle else v for k, v in stats.items()}


# ================================ RUNNING IT ON THE TOY =====================================


# ---- Settings: the one source of truth; the command line and --help are derived from it -------
def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    seed: int = arg(0, "random seed (init, task sampling, rollouts, minibatch order)")
    iters: int = arg(150, "GRPO iterations; 0 with --sft-steps 0 evaluates --model")
    train_tasks: int = arg(256, "size of the fixed set of train layouts that RL and warm-up see")
    data_seed: int = arg(0, "seed of the train and held-out layout sets")
    tasks_per_iter: int = arg(16, "B: distinct train layouts per iteration")
    group_size: int = arg(8, "G: episodes per layout; the advantage baseline is this group's mean")
    scale_by_std: bool = arg(
        True, "divide advantages by the group's std (--no-scale-by-std: Dr. GRPO's r - mean)"
    )
    lr: float = arg(5e-4, "peak AdamW learning rate of the GRPO phase")
    lr_warmup_iters: int = arg(10, "iterations of linear lr warm-up to --lr; then linear decay")
    clip_eps: float = arg(0.2, "PPO clip range epsilon on the token probability ratio")
    kl_coef: float = arg(0.0, "weight of the k3 KL penalty to the policy at the start of RL")
    epochs: int = arg(1, "passes over each iteration's rollouts (PPO epochs; 1 as in TRL and verl)")
    minibatch_moves: int = arg(96, "target moves per gradient step (near-equal minibatches)")
    temperature: float = arg(1.0, "sampling temperature of rollouts (1.0 = the policy itself)")
    max_action_tokens: int = arg(4, "generation budget for one action, end-of-text included")
    history: int = arg(0, "H: past turns (observation, action ids) in each prompt; 0 = none")
    chat: bool = arg(False, "prompts in the --model tokenizer's chat template (instruct models)")
    sft_steps: int = arg(150, "supervised warm-up steps on oracle moves before RL (0 = none)")
    sft_lr: float = arg(1e-3, "AdamW learning rate of the warm-up")
    sft_batch: int = arg(128, "(state, oracle move) pairs per warm-up step")
    eval_every: int = arg(50, "evaluate and probe every this many iterations and at the end")
    eval_tasks: int = arg(256, "held-out layouts evaluated (in-domain: the first this many train)")
    render_every: int = arg(50, "print one sampled episode every this many iterations (0 = never)")
    cls_coef: float = arg(0.0, "weight of the actor's good/bad classification loss (GCD; 0 = off)")
    cls_samples: int = arg(128, "at most this many labelled (state, move) pairs per iteration")
    cls_batch: int = arg(
        128, "at most this many labelled pairs per gradient step (more pairs: more AdamW steps)"
    )
    cls_warmup_steps: int = arg(
        0, "GCD's cold start: steps of the verdict alone on oracle labels before RL (0 = none)"
    )
    cls_lr: float = arg(5e-5, "AdamW learning rate of the verdict's warm-up")
    cls_warmup_states: int = arg(8, "random train states per verdict warm-up step (4 moves each)")
    cls_anchor: float = arg(
        10.0,
        "the verdict warm-up's pull toward the warm start's moves: weight of policy_drift (0 = "
        "none: on SmolLM2 the verdict alone then broke the move format)",
    )
    probe_pairs: int = arg(16, "coupled (good, flawed) state pairs in the gradient-coupling probe")
    probe_states: int = arg(128, "start states per eval set of the verdict's accuracy (and probes)")
    model: str = arg(
        "",
        "a causal LM: hub name, saved folder or .gguf file ('' = the tiny model from a config)",
    )
    model_cache: str = arg("runs/models", "where a .gguf --model is converted once, to float32")
    tiny_arch: str = arg("llama", "the built-in tiny model: 'llama' or 'gpt2'")
    tiny_layers: int = arg(3, "layers of the built-in tiny model")
    tiny_dim: int = arg(96, "width of the built-in tiny model (a multiple of its 4 heads)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    out_dir: str = arg(
        "", "where the run's files go ('' = runs/<time>-seed<seed>; torchrun: needed)"
    )
    overwrite: bool = arg(False, "allow writing into an --out-dir that already holds a run")

    def __post_init__(self):
        """The first bad value raises one ValueError that names its flag."""
        rules = {  # setting -> (does it hold?, what it must be)
            "group_size": (self.group_size >= 2, ">= 2 (a group of one has no baseline)"),
            "tiny_dim": (
                self.tiny_dim >= 4 and self.tiny_dim % 4 == 0,
                "a positive multiple of 4 (the number of heads)",
            ),
            "tiny_arch": (self.tiny_arch in ("gpt2", "llama"), "'gpt2' or 'llama'"),
            "train_tasks": (self.train_tasks >= self.tasks_per_iter, ">= --tasks-per-iter"),
            "chat": (
                self.model or not self.chat,
                "used with a --model: the built-in model's word tokenizer has no chat template",
            ),
        }
        for name in ("lr", "sft_lr", "cls_lr", "temperature"):
            value = getattr(self, name)
            rules[name] = (value > 0 and math.isfinite(value), "a positive number")
        at_least = {
            1: "tasks_per_iter epochs minibatch_moves max_action_tokens sft_batch eval_every "
            "eval_tasks cls_samples cls_batch cls_warmup_states probe_pairs probe_states "
            "tiny_layers tiny_dim",
            0: "iters data_seed lr_warmup_iters clip_eps kl_coef history sft_steps render_every "
            "cls_coef cls_warmup_steps cls_anchor",
        }
        for least, names in at_least.items():
            for name in names.split():
                rules.setdefault(name, (getattr(self, name) >= least, f">= {least}"))
        for name, (holds, rule) in rules.items():
            if not holds:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be {rule}, got {getattr(self, name)!r}")
        resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu. An unknown or absent device is a ValueError."""
    available = {
        "cuda": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "mps": 1 if torch.backends.mps.is_available() else 0,  # MPS has one device: index 0
        "cpu": 1,
    }
    if name == "auto":
        return torch.device(next(kind for kind, count in available.items() if count))
    kind, _, index = name.partition(":")
    known = kind in available and (index == "" or index.isdigit())
    if not known or int(index or 0) >= available[kind]:
        present = ", ".join(f"{k} x{n}" for k, n in available.items() if n)
        raise ValueError(
            f"--device {name!r} is not available here (present: {present}); "
            "use auto, cpu, cuda, cuda:N or mps"
        )
    return torch.device(name)


def parse_settings(argv: list[str] | None = None) -> Settings:
    """The command line, built from Settings; any error is one line and exit code 2."""
    parser = HfArgumentParser(Settings, prog="grpo_agentic.py", description=__doc__.split("\n")[0])

    def one_line_error(message: str):
        parser.exit(2, f"grpo_agentic.py: error: {message} (see --help)\n")

    parser.error = one_line_error
    try:
        (s,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:  # from Settings.__post_init__, or arguments argparse did not use
        parser.error(str(e))
    if where_error(s):
        parser.error(where_error(s))
    return s


def where_error(s: Settings) -> str:
    """What is wrong with the paths of these settings, in one line ('' = nothing)."""
    looks_like_path = s.model.startswith((".", "/", "~")) or s.model.count("/") > 1  # not "org/x"
    looks_like_path = looks_like_path or s.model.endswith(".gguf")
    if s.model and looks_like_path and not os.path.exists(os.path.expanduser(s.model)):
        return f"--model {s.model}: no such file or directory"
    if s.out_dir and os.path.exists(os.path.join(s.out_dir, "metrics.jsonl")) and not s.overwrite:
        return f"--out-dir {s.out_dir} already holds a run; choose another or --overwrite"
    return ""


# ---- The toy's data, formats and schedule ------------------------------------------------------
def task_sets(train_tasks: int, eval_tasks: int, data_seed: int):
    """The fixed train layouts; eval sets: the first `eval_tasks` of them (in-domain) and as many
    unseen ("held-out") layouts, denser in walls."""
    pool = toy_env.sample_layouts("train", train_tasks, seed=data_seed)
    held_out = toy_env.sample_layouts("held_out", eval_tasks, seed=data_seed)
    return pool, {"train": pool[:eval_tasks], "held_out": held_out}


def toy_formats(tokenizer, chat: bool) -> tuple[PromptFormat, VerdictFormat]:
    """The gridworld's prompt and verdict formats: plain text, or (--chat) the tokenizer's chat
    template with the gridworld's rules (toy_env.CHAT_SYSTEM) as the system turn."""
    if chat:
        return chat_format(tokenizer, toy_env.CHAT_SYSTEM), chat_verdict(
            tokenizer, toy_env.CHAT_SYSTEM
        )
    return plain_format(tokenizer), plain_verdict(tokenizer)


def learning_rate(it: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate of RL iteration `it` (1-based): linear warm-up to `peak`, reached at iteration
    `warmup`, then linear decay that would reach 0 one iteration after the last:

        lr(it) = peak * min(1, it / warmup, (total + 1 - it) / max(1, total + 1 - warmup))

    Warm-up because Adam's first steps have size ~lr in every coordinate whatever the gradient's
    size (a noisy policy gradient would undo the warm-start); decay so the final policy settles.

    >>> [round(learning_rate(it, 1.0, warmup=2, total=6), 3) for it in range(1, 7)]
    [0.5, 1.0, 0.8, 0.6, 0.4, 0.2]
    """
    # it = 0 would be a step of rate 0; past total the rate is negative.
    require(1 <= it <= total, f"iteration {it} is outside 1..{total}: iterations are 1-based")
    rising = it / warmup if warmup else 1.0
    falling = (total + 1 - it) / max(1, total + 1 - warmup)
    return peak * min(1.0, rising, falling)


# ---- Warm-up: supervised steps on the oracle's moves ---------------------------------------
def sft_warmup(
    model,
    tokenizer,
    layouts: list[str],
    steps: int,
    lr: float,
    batch: int,
    rng: np.random.Generator,
    fmt: PromptFormat,
    history: int = 0,
    log=None,
) -> list[float]:
    """Supervised warm-up: maximise log pi(oracle move | random state), action tokens only.
    With history > 0 each prompt is in the format RL will show: a random walk of 0..history turns
    (bumps included, never onto the goal, never more than an episode can have) leads to the state,
    so RL does not start out of distribution. Returns the loss of each step: the mean NLL per
    action token. `log`: a progress line every 30 seconds."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    losses = []
    started = shown = time.time()
    for _ in range(steps):
        prompts, targets = [], []
        for env in (envs[k] for k in rng.integers(len(envs), size=batch)):
            prompt, good = random_state(env, tokenizer, rng, fmt, history)
            prompts.append(prompt)
            target = good[rng.integers(len(good))]  # a good move
            targets.append(action_ids_for(tokenizer, target, fmt))
        logp, on_action = action_token_logprobs(
            model, prompts, targets, tokenizer.pad_token_id, temperature=1.0
        )  # (n, K) each
        nll = -logp.sum() / on_action.sum()  # per action token
        optimizer.zero_grad(set_to_none=True)
        nll.backward()
        optimizer.step()
        losses.append(nll.item())
        if log and time.time() - shown > 30:
            shown = time.time()
            took = shown - started
            log(f"warm-up: step {len(losses)}/{steps}, nll {losses[-1]:.3f} ({took:.0f}s)")
    return losses


def random_state(env, tokenizer, rng: np.random.Generator, fmt: PromptFormat, history: int = 0):
    """A random state of `env` in the format RL will show it, and the oracle's good moves there:
    (prompt ids, good moves). With history > 0 a random walk of 0..history turns (bumps
    included, never onto the goal, never more than an episode can have) leads to the state."""
    pos = env.free_cells()[rng.integers(len(env.free_cells()))]  # a random cell
    turns = []
    walk = int(rng.integers(min(history, env.max_steps - 1) + 1)) if history else 0
    for _ in range(walk):
        options = [a for a in toy_env.ACTIONS if env.next_pos(pos, a) != env.goal]
        move = options[rng.integers(len(options))]
        seen = encode_observations(tokenizer, [env.observation(pos)])[0]
        turns.append((seen, action_ids_for(tokenizer, move, fmt)))
        pos = env.next_pos(pos, move)
    good = env.good_actions(pos)
    observation_ids = encode_observations(tokenizer, [env.observation(pos)])[0]
    return history_prompt(fmt, turns, observation_ids, history), good


def verdict_warmup(
    model,
    tokenizer,
    layouts: list[str],
    steps: int,
    lr: float,
    states: int,
    rng: np.random.Generator,
    fmt: PromptFormat,
    verdict: VerdictFormat,
    history: int = 0,
    anchor_coef: float = 10.0,
    log=None,
) -> tuple[list[float], list[float]]:
    """GCD's cold start: the verdict, on the oracle's labels, before RL, with the policy pulled
    back toward where the warm-up left it. Each step: `states` random train states (as
    sft_warmup draws them), all 4 moves at each, labelled good (1) or bad (0); the loss

        L = balanced cross-entropy of the verdict + anchor_coef * policy_drift

    (the drift from a frozen copy of the model as it came in, at each state's first good move),
    one AdamW step at `lr`, gradient norm clipped at 1. Its own optimizer and rate: on SmolLM2, at
    the policy's rate (2e-5, shared with the policy gradient) the verdict stays at chance, at the
    supervised warm-up's (3e-4) it collapses to one answer. The anchor: trained alone at 1e-4 for
    100 steps, the verdict learned (0.73 on held-out states) and took the policy with it, from
    greedy success 0.41 to 0.04 (46 % of its failed episodes ended on an answer that was no
    move); the arms of a comparison must start RL from the same policy. Anchored at 1.0 it held
    the moves on seed 0 (greedy 0.42 / 0.20 against 0.41 / 0.19, in-domain / held-out) but not
    on seed 1 (0.05 / 0.05 against 0.15 / 0.16); at 10, seed 1 came nearer (0.11 / 0.10) and
    held-out still differed: check greedy success after it (`experiments.py compare` does). At 10
    the verdict learned on both seeds (0.85, 0.79 held-out) and the twins did not part. Ten times
    the weight only halved the drift (last 10 steps: 0.011 -> 0.005 on seed 0, 0.016 -> 0.010 on
    seed 1): the KL's gradient is zero at the anchor, so it pulls back only after each step has
    moved the weights by about `lr`, which may set the drift more than the weight does (not
    tested). Returns each step's verdict loss and drift; `log`: a progress line every 30 s."""
    # Dropout would make the drift nonzero at the anchor itself (the reference runs without it).
    require(not model.training, "the verdict warm-up needs model.eval(): dropout off")
    anchor = None
    if anchor_coef > 0:
        anchor = copy.deepcopy(model).eval().requires_grad_(False)
        anchor.zero_grad(set_to_none=True)  # a copy would keep the last warm-up step's gradients
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    losses, drifts = [], []
    started = shown = time.time()
    for _ in range(steps):
        prompts, actions, labels, kept = [], [], [], []
        for env in (envs[k] for k in rng.integers(len(envs), size=states)):
            prompt, good = random_state(env, tokenizer, rng, fmt, history)
            for action in toy_env.ACTIONS:  # every move: the verdict must tell them apart
                prompts.append(prompt)
                actions.append(action_ids_for(tokenizer, action, fmt))
                labels.append(int(action in good))
            # The first good move, not a drawn one: the same states with and without the anchor.
            kept.append((prompt, action_ids_for(tokenizer, good[0], fmt)))
        pad = tokenizer.pad_token_id
        loss = classification_loss(model, prompts, actions, torch.tensor(labels), verdict, pad)
        drift = torch.zeros((), device=loss.device)
        if anchor is not None:
            drift = policy_drift(model, anchor, [p for p, _ in kept], [a for _, a in kept], pad)
        total = loss + anchor_coef * drift
        if not torch.isfinite(total):
            raise NonFiniteError(f"the verdict's warm-up loss is {total.item()}")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        drifts.append(drift.item())
        if log and time.time() - shown > 30:
            shown = time.time()
            took = shown - started
            log(
                f"verdict warm-up: step {len(losses)}/{steps}, loss {losses[-1]:.3f}, "
                f"drift {drifts[-1]:.4f} ({took:.0f}s)"
            )
    return losses, drifts


def policy_drift(
    model, anchor, prompts: list[list[int]], actions: list[list[int]], pad_id: int
) -> torch.Tensor:
    """How far the model's next-token distributions moved from the anchor's (a frozen copy) where
    the policy writes an action, per action token, over the whole vocabulary (so the move format
    is held too, not only the four moves' odds):

        D = mean over action tokens (i, k) of KL( p_anchor(. | h_ik) || p_model(. | h_ik) ),
        h_ik = (prompt_i, a_i1 .. a_i(k-1)), the ids before action token k

    Zero when the model is the anchor; gradients reach the model only."""
    k = max(len(a) for a in actions)
    sequences = [p + a for p, a in zip(prompts, actions)]
    with torch.no_grad():
        held, *_ = forward_batch(anchor, sequences, pad_id, keep=k + 1)
        held_logp = torch.log_softmax(held.logits[:, -(k + 1) : -1].float(), dim=-1)  # (N, K, V)
    out, *_ = forward_batch(model, sequences, pad_id, keep=k + 1)
    logp = torch.log_softmax(out.logits[:, -(k + 1) : -1].float(), dim=-1)  # (N, K, V)
    kl = (held_logp.exp() * (held_logp - logp)).sum(dim=-1)  # (N, K)
    lengths = torch.tensor([len(a) for a in actions], device=kl.device)  # (N,)
    on_action = torch.arange(k, device=kl.device)[None, :] >= k - lengths[:, None]  # (N, K)
    return kl[on_action].mean()


VERDICT_STREAM = 1  # the verdict's random stream: np.random.default_rng([seed, VERDICT_STREAM])


def warm_start(model, tokenizer, s: Settings, log=print) -> dict:
    """The supervised warm-up, done to `model` in place. Returns its weights and time, and the
    state of the numpy rng that RL goes on from: everything before RL (the lab shares it between
    the arms of one seed)."""
    rng = np.random.default_rng(s.seed)  # tasks, warm-up states, minibatch order
    t = time.time()
    pool, _ = task_sets(s.train_tasks, s.eval_tasks, s.data_seed)
    fmt, _ = toy_formats(tokenizer, s.chat)
    losses = sft_warmup(
        model, tokenizer, pool, s.sft_steps, s.sft_lr, s.sft_batch, rng, fmt, s.history, log
    )
    if losses:
        took = time.time() - t
        log(f"warm-up: {s.sft_steps} steps, nll {losses[0]:.3f} -> {losses[-1]:.3f} ({took:.1f}s)")
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return {"policy": weights, "rng": rng.bit_generator.state, "sft_s": time.time() - t}


# ---- Evaluation: greedy success, the verdict's accuracy, the coupling probe --------------------
@torch.no_grad()
def greedy_episodes(model, tokenizer, layouts: list[str], s: Settings, sample=None):
    """One greedy episode per layout: (moves, rewards (B,), envs). A `sample` that resamples (the
    lab's self-check) draws at --temperature from a generator seeded with --seed."""
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    device = next(model.parameters()).device
    fmt, _ = toy_formats(tokenizer, s.chat)
    moves, rewards = rollout(
        model,
        tokenizer,
        [[env] for env in envs],  # groups of one
        exact_format_parser(tokenizer, toy_env.ACTIONS, fmt),
        max_action_tokens=s.max_action_tokens,
        # Greedy takes the argmax whatever the temperature; the lab's resampling uses it.
        temperature=s.temperature if sample else 1.0,
        fmt=fmt,
        greedy=True,
        generator=torch.Generator(device=device).manual_seed(s.seed),
        history=s.history,
        sample=sample,
    )
    return moves, rewards.view(-1), envs


@torch.no_grad()
def classification_bacc(
    model,
    tokenizer,
    prompts: list[list[int]],
    good_moves: list[tuple[str, ...]],
    fmt: PromptFormat,
    verdict: VerdictFormat,
) -> float:
    """Balanced accuracy of the actor's verdict against the oracle. States are given as prompts
    (ids) and, for each, the moves the oracle calls good there; the verdict judges all 4 moves."""
    asked = [p for p in prompts for _ in toy_env.ACTIONS]
    actions = [action_ids_for(tokenizer, a, fmt) for _ in prompts for a in toy_env.ACTIONS]
    labels = torch.tensor([int(a in good) for good in good_moves for a in toy_env.ACTIONS])
    pad = tokenizer.pad_token_id
    predicted = verdict_is_good(model, asked, actions, verdict, pad).long().cpu()  # (S*4,)
    return balanced_accuracy(predicted, labels)


def measure(model, tokenizer, s: Settings, it: int, probes=(), log=print) -> dict:
    """Greedy success on both evaluation sets, the verdict's balanced accuracy against the oracle
    at start states, the coupling probe, then each of `probes`; logs one line.

    A probe is probe(model, tokenizer, it, played) -> dict of columns, where played[split] holds
    that split's greedy (moves, rewards, envs)."""
    t = time.time()
    row, played = {}, {}
    fmt, verdict = toy_formats(tokenizer, s.chat)
    eval_sets = task_sets(s.train_tasks, s.eval_tasks, s.data_seed)[1]
    for split, layouts in eval_sets.items():
        played[split] = greedy_episodes(model, tokenizer, layouts, s)  # (moves, rewards, envs)
        row[f"eval_{split}_success"] = played[split][1].mean().item()
        if time.time() - t > 30:  # a slow model: show that the evaluation is alive
            log(f"measure @ iter {it}: {split} success {row[f'eval_{split}_success']:.4f} ...")
    row["eval_s"] = time.time() - t
    for split, layouts in eval_sets.items():  # the verdict at start states: all 4 moves each
        envs = [toy_env.GridWorld.from_string(x) for x in layouts[: s.probe_states]]
        prompts = no_history_prompts(tokenizer, [env.observation() for env in envs], fmt)
        good_moves = [env.good_actions() for env in envs]
        row[f"cls_bacc_{split}"] = classification_bacc(
            model, tokenizer, prompts, good_moves, fmt, verdict
        )
    pairs = []  # (obs_good, obs_flawed, move): grids one cell apart; the move is good in the first,
    # a bump into the wall that cell holds in the second (toy_env.coupled_pairs)
    for good, flawed, action in toy_env.coupled_pairs("train", s.probe_pairs, s.data_seed):
        good_obs = toy_env.GridWorld.from_string(good).observation()
        flawed_obs = toy_env.GridWorld.from_string(flawed).observation()
        pairs.append((good_obs, flawed_obs, action))
    row.update(coupling_probe(model, tokenizer, pairs, fmt))
    for probe in probes:
        row.update(probe(model, tokenizer, it, played))
    row["probe_s"] = time.time() - t - row["eval_s"]
    shown = " | ".join(f"{k} {v:.4f}" for k, v in row.items() if not k.endswith("_s"))
    log(f"measure @ iter {it}: {shown}")
    return row


# ---- The training loop: warm-up, then GRPO iterations with their bookkeeping -----------------
def log_line(row: dict, iters: int) -> str:
    """The fixed-format line printed for each iteration; a value that does not exist (NaN) is
    '-', and an update that trained nothing (every advantage 0, no classification) says so."""

    def show(key: str, spec: str) -> str:
        return "-" if math.isnan(row[key]) else format(row[key], spec)

    parts = [
        f"it {row['iter']:3d}/{iters}",
        f"succ {row['success']:.2f}",
        f"valid {row['valid_frac']:.2f}",
        f"good {show('good_frac', '.2f')}",
        f"mixed {row['mixed_groups']:.2f}",
        f"lr {row['lr']:.1e}",
        "loss - (no signal)" if math.isnan(row["loss"]) else f"loss {row['loss']:+.4f}",
        f"clip {show('clip_frac', '.2f')}",
        f"A flawed {show('adv_flawed_mean', '+.2f')} good {show('adv_good_mean', '+.2f')}"
        f" (flawed A>0 {show('flawed_pos_adv_frac', '.2f')})",
    ]
    if not math.isnan(row["cls_loss"]):
        parts.append(f"cls {row['cls_loss']:.3f}")
    parts.append(f"roll {row['rollout_s']:.2f}s upd {row['update_s']:.2f}s")
    return " | ".join(parts)


def render_episode(moves: list[Move], rewards: torch.Tensor, env, it: int) -> str:
    """The first episode of an iteration, drawn: its grid and its moves (+ good, - flawed)."""
    marks = {True: "+", False: "-"}  # the oracle's label, where the env gives one
    first = [m for m in moves if m.episode == 0]
    steps = [f"{m.text!r}{marks.get(m.info.get('good'), '')}" for m in first]
    outcome = "reached the goal" if rewards[0, 0] > 0 else "failed"
    return (
        f"-- a sampled episode at iter {it} (+ good, - flawed) --\n"
        f"{env.to_string()}\n  moves: {' '.join(steps)}  -> {outcome}"
    )


TIMES = ("rollout_s", "update_s", "eval_s", "probe_s")  # seconds, summed over the run
RANK_SEED_STRIDE = 1_000_003  # torchrun: rank r samples from a generator seeded seed + r * this


def train(
    model,
    tokenizer,
    s: Settings,
    out_dir: str,
    log=print,
    start: dict | None = None,
    probes=(),
    credit=None,
    labeller=None,
) -> dict:
    """The warm-up (or `start`, a warm_start of these settings), then `s.iters` GRPO iterations,
    each a line of out_dir/metrics.jsonl. Trains `model` in place; returns the run's summary.

    Extension points, for the lab: `probes` add columns to every evaluation (see measure);
    credit(rewards (B, G), moves) -> advantages (N,) replaces move_advantages (GiGPO does);
    labeller(moves, advantages, tokenizer) -> (prompts, actions, labels) replaces the advantage
    labels of the classification loss (the oracle's labels do)."""
    begin = time.time()
    device = next(model.parameters()).device
    # Dropout off for the whole run (as TRL does): the policy that samples, whose log-probs are
    # recorded, must be the very function the loss scores. Gradients flow in eval mode all the same.
    model.eval()
    pool, eval_sets = task_sets(s.train_tasks, s.eval_tasks, s.data_seed)
    fmt, verdict = toy_formats(tokenizer, s.chat)
    num_params = sum(p.numel() for p in model.parameters())
    log(
        f"policy: {s.model or 'tiny ' + s.tiny_arch}, {num_params:,} parameters, on {device}; "
        f"{len(pool)} train layouts; greedy evaluation on "
        f"{len(eval_sets['train'])} in-domain and {len(eval_sets['held_out'])} held-out layouts"
    )
    start = start or warm_start(model, tokenizer, s, log)  # its weights: a copy, on the CPU
    model.load_state_dict(start["policy"])
    same_weights_everywhere(model)  # torchrun: rank 0's warm start on every rank
    rng = np.random.default_rng()
    rng.bit_generator.state = start["rng"]  # as the warm-up left it: same runs either way
    rank, world = rank_and_world()
    # Rollout sampling; torchrun: each rank samples its own episodes (rank 0: as one process).
    generator = torch.Generator(device=device).manual_seed(s.seed + RANK_SEED_STRIDE * rank)
    # The verdict draws from a stream of its own, leaving the layouts' and minibatches' draws as
    # they are without it (until the arms' policies, and so their shuffles, differ).
    verdict_rng = np.random.default_rng([s.seed, VERDICT_STREAM])
    verdict_s = 0.0
    if s.cls_warmup_steps:
        t = time.time()
        losses, drifts = verdict_warmup(
            model,
            tokenizer,
            pool,
            s.cls_warmup_steps,
            s.cls_lr,
            s.cls_warmup_states,
            verdict_rng,
            fmt,
            verdict,
            s.history,
            s.cls_anchor,
            log,
        )
        verdict_s = time.time() - t
        last = float(np.mean(losses[-10:]))
        log(
            f"verdict warm-up: {len(losses)} steps, loss {losses[0]:.3f} -> {last:.3f}, drift "
            f"{float(np.mean(drifts[-10:])):.4f} (means of the last 10) ({verdict_s:.1f}s)"
        )
    ref_model = copy.deepcopy(model) if s.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr)
    measured = {0: on_rank_zero(lambda: measure(model, tokenizer, s, 0, probes, log))}
    rows = []
    written = os.path.join(out_dir, "metrics.jsonl") if rank == 0 else os.devnull  # rank 0's
    with open(written, "w", buffering=1) as metrics_file:
        for it in range(1, s.iters + 1):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(it, s.lr, s.lr_warmup_iters, s.iters)
            row, moves, rewards, groups = grpo_iteration(
                model,
                tokenizer,
                pool,
                optimizer,
                rng,
                generator,
                s,
                fmt,
                verdict,
                ref_model,
                credit,
                labeller,
                verdict_rng,
            )
            row = {"iter": it, **row}
            if it % s.eval_every == 0 or it == s.iters:
                measured[it] = on_rank_zero(lambda: measure(model, tokenizer, s, it, probes, log))
                row.update(measured[it])
            rows.append(row)
            without_nan = {k: None if v != v else v for k, v in row.items()}  # NaN -> null
            metrics_file.write(json.dumps(without_nan) + "\n")
            log(log_line(row, s.iters))
            if s.render_every and it % s.render_every == 0:
                log(render_episode(moves, rewards, groups[0][0], it))
    if weights_differ_between_ranks(model):
        raise RuntimeError("the ranks hold different weights at the end: a step was not shared")
    if world > 1:
        log(f"torchrun: the {world} ranks hold the same weights at the end (checksums compared)")
    last = measured[max(measured)]
    lemma = {  # Lemma 3.1's columns, (iters,) each
        key: np.array([r[key] for r in rows], dtype=float)
        for key in ("adv_flawed_mean", "adv_abs_mean", "flawed_pos_adv_frac")
    }
    no_signal = [r["mixed_groups"] == 0 for r in rows]  # iterations where every group tied
    rollout_s = sum(r["rollout_s"] for r in rows)
    return {  # summary.json, beside the settings
        "eval_train_success": last["eval_train_success"],
        "eval_held_out_success": last["eval_held_out_success"],
        "start": measured[0],
        "end": last,
        "over_run": {  # Lemma 3.1 over every iteration, under the advantage actually used
            key: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan  # NaN: no oracle
            for key, v in lemma.items()
        },
        "no_signal_iters_frac": float(np.mean(no_signal)) if rows else math.nan,
        "decisions_per_second": sum(r["moves"] for r in rows) / max(rollout_s, 1e-9),
        "sft_s": round(start["sft_s"], 2),
        "cls_warmup_s": round(verdict_s, 2),
        **{key: round(sum(r.get(key, 0.0) for r in [measured[0], *rows]), 2) for key in TIMES},
        "wall_seconds": round(time.time() - begin, 2),
        "torch_threads": torch.get_num_threads(),
    }


def run(s: Settings, out_dir: str, log=print, **extensions) -> dict:
    """One training run: the policy is loaded (a --model too short is refused before anything is
    written), then settings.json, metrics.jsonl as it goes, policy/ and summary.json.
    `extensions` go to train (start, probes, credit, labeller)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" and "Writing model shards" bars
    device = resolve_device(s.device)
    if torchrun_ranks() > 1:
        device = start_ranks(device)  # torchrun: join the other ranks
    writes = rank_and_world()[0] == 0  # torchrun: rank 0 alone writes the run's files
    if s.model.endswith(".gguf"):  # torchrun: converted once, by rank 0, before any rank loads
        on_rank_zero(lambda: gguf_to_folder(s.model, s.model_cache, log))
    model, tokenizer = load_policy(s, device, log)
    if writes:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "settings.json"), "w") as f:
            json.dump(dataclasses.asdict(s), f, indent=1)
    with warnings.catch_warnings():  # each log line says these itself: "no signal", "valid"
        warnings.filterwarnings("ignore", message="every advantage is 0|no move of this rollout")
        summary = train(model, tokenizer, s, out_dir, log, **extensions)
    if writes:
        model.save_pretrained(os.path.join(out_dir, "policy"))
        tokenizer.save_pretrained(os.path.join(out_dir, "policy"))
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump({**summary, "settings": dataclasses.asdict(s)}, f, indent=1)
    start, end = summary["start"], summary["end"]
    signal = 1 - summary["no_signal_iters_frac"]
    log(
        f"done in {summary['wall_seconds']:.0f}s. Greedy success from the start of RL to its end: "
        f"in-domain {start['eval_train_success']:.2f} -> {end['eval_train_success']:.2f}, "
        f"held-out {start['eval_held_out_success']:.2f} -> {end['eval_held_out_success']:.2f}; "
        f"{signal:.0%} of iterations had a mixed group (signal). Outputs in {out_dir}/"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):  # a run sent to a file shows each line as it ends
        sys.stdout.reconfigure(line_buffering=True)
    s = parse_settings(argv)
    ranks = torchrun_ranks()
    if ranks_error(s, ranks):  # before any work, on every rank: torchrun stops them all
        print(f"grpo_agentic.py: error: {ranks_error(s, ranks)}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", 0)) if ranks > 1 else 0
    log = print if rank == 0 else lambda *_: None  # torchrun: rank 0 alone logs
    log("settings: " + json.dumps(dataclasses.asdict(s)))
    out_dir = s.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-seed{s.seed}")
    try:
        run(s, out_dir, log)
    except NonFiniteError as e:
        print(
            f"grpo_agentic.py: stopped: {e}. metrics.jsonl holds every finished iteration; "
            "no policy was saved. Try a smaller --lr.",
            file=sys.stderr,
        )
        return 1
    except (OSError, ValueError) as e:  # e.g. a --model that transformers cannot load
        print(f"grpo_agentic.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        if rank_and_world()[1] > 1:
            torch.distributed.destroy_process_group()
    return 0


def torchrun_ranks() -> int:
    """How many processes torchrun started for this run (WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", 1))


def ranks_error(s: Settings, ranks: int) -> str:
    """What torchrun's number of ranks cannot do with these settings, in one line ('' = all
    right): each rank plays whole groups, the same number of them."""
    if ranks == 1:
        return ""
    if s.tasks_per_iter % ranks:
        return (
            f"--tasks-per-iter {s.tasks_per_iter} layouts cannot be shared evenly by "
            f"{ranks} ranks (--nproc_per_node): choose a multiple of {ranks}"
        )
    if s.cls_coef > 0 or s.cls_warmup_steps > 0:
        return (
            "--cls-coef and --cls-warmup-steps under torchrun are not built (the verdict's "
            "balanced loss would need its class counts summed over the ranks, its warm-up its "
            "states shared): run GCD in one process"
        )
    if not s.out_dir:
        return "under torchrun, name the run's directory (--out-dir): every rank must agree on it"
    return ""


# ================================ APPENDIX: what runs it, not what it teaches ================


# ---- Checks: each copied function calls one at its door, so a mistake is loud where it enters --
class NonFiniteError(RuntimeError):
    """A loss or the logits became NaN/inf: stop rather than train on garbage."""


def require(condition, message: str) -> None:
    """A mistake in what a function was handed: one ValueError that says what to do."""
    if not condition:
        raise ValueError(message)


def as_tensor(values) -> torch.Tensor:
    """A tensor as it is; a list or a numpy array as float32 (numpy's float64 would carry on)."""
    if torch.is_tensor(values):
        return values.detach()  # rewards are data: no gradient reaches the advantages
    return torch.tensor(np.asarray(values), dtype=torch.float32)


def warn_unless_float32(model) -> None:
    weights = model.parameters() if isinstance(model, torch.nn.Module) else []
    dtypes = {p.dtype for p in weights if p.requires_grad} - {torch.float32}
    if dtypes:
        warnings.warn(
            f"the model's weights are {dtypes.pop()}, not float32: in bf16/fp16 small AdamW steps "
            "round away and sampler and scorer disagree; load it with dtype=torch.float32",
            stacklevel=3,
        )


def check_sampler(model, tokenizer, temperature: float, generator) -> None:
    device = next(model.parameters()).device
    require(tokenizer.eos_token_id is not None, "the tokenizer has no end-of-text: set eos_token")
    require(temperature > 0, f"temperature must be > 0, got {temperature}; greedy takes argmax")
    require(
        generator is None or isinstance(generator, torch.Generator),
        "generator: a torch.Generator (the numpy rng orders grpo_update's minibatches)",
    )
    require(
        generator is None or generator.device.type == device.type,
        f"the generator is on {generator and generator.device}, the model on {device}: "
        "make it with torch.Generator(device=...)",
    )
    if model.training:
        warnings.warn("the model samples in train mode: dropout adds noise; call model.eval()")


def check_rollout(model, tokenizer, groups, parse, fmt, max_action_tokens: int) -> None:
    require(tokenizer.eos_token_id is not None, "the tokenizer has no end-of-text: set eos_token")
    require(
        len(groups) and all(isinstance(g, (list, tuple)) and g for g in groups),
        "groups must be B lists of G environments, a task's G episodes: "
        "[[make_env(task) for _ in range(G)] for task in tasks]",
    )
    require(
        len({len(g) for g in groups}) == 1,
        f"every group needs the same G episodes, got sizes {sorted({len(g) for g in groups})}",
    )
    envs = [env for group in groups for env in group]
    require(len({id(e) for e in envs}) == len(envs), "one environment twice: make one per episode")
    needed = getattr(parse, "tokens_needed", 0)
    require(
        max_action_tokens >= needed,
        f"max_action_tokens {max_action_tokens} is shorter than the action format ({needed} "
        "tokens with end-of-text): no move could be well-formed",
    )
    require(
        getattr(parse, "fmt", fmt) == fmt,
        "the parser reads moves of another prompt format than the rollout's (chat or plain): "
        "build both from one fmt, exact_format_parser(tokenizer, actions, fmt)",
    )
    warn_unless_float32(model)


def warn_after_rollout(moves: list[Move], live: list[int], max_turns: int) -> None:
    if live:
        warnings.warn(
            f"{len(live)} episodes were still running after max_turns={max_turns}: cut off, "
            "their rewards summed so far (does the env ever return done?)",
            stacklevel=3,
        )
    if moves and all(m.action is None for m in moves):
        warnings.warn(
            "no move of this rollout parsed: every move is off-format, so no episode can succeed "
            "(a parser built for another prompt format? an untrained model? the action budget?)",
            stacklevel=3,
        )


def check_credit(rewards: torch.Tensor, episodes: list[int]) -> None:
    require(bool(torch.isfinite(rewards).all()), "rewards must be finite numbers: see the env's")
    require(
        rewards.dim() != 2 or rewards.shape[1] >= 2,
        f"rewards {tuple(rewards.shape)}: groups of one episode have no baseline (A = 0 for "
        "every move, forever): play G >= 2 episodes of each task",
    )
    require(
        set(map(int, episodes)) == set(range(rewards.numel())),
        f"episode ids must be 0..{rewards.numel() - 1}, each with a move: pass the rewards and "
        "moves of one rollout call (Move.episode)",
    )


def check_loss(logp, old_logp, advantages, ref_logp, kl_coef: float) -> None:
    # Constants, or the ratio is 1 through the graph and the surrogate's gradient about 0.
    require(
        not old_logp.requires_grad and (ref_logp is None or not ref_logp.requires_grad),
        "old_logp and ref_logp: compute them under torch.no_grad() or .detach()",
    )
    require(
        old_logp.shape == logp.shape and advantages.shape == logp.shape[:1],
        f"old_logp {tuple(old_logp.shape)} must be logp's (N, K) = {tuple(logp.shape)} "
        f"and advantages {tuple(advantages.shape)} must be (N,): one advantage per move",
    )
    # Without ref_logp the KL would read 0.0: "no drift".
    require(kl_coef == 0 or ref_logp is not None, "kl_coef > 0 needs ref_logp (reference policy)")


def check_update(model, actions, old_logps, advantages, optimizer, ref_model, kl_coef) -> None:
    require((kl_coef > 0) == (ref_model is not None), "kl_coef > 0 and a ref_model go together")
    require(ref_model is not model, "ref_model is the policy itself: copy.deepcopy(model).eval()")
    if ref_model is not None and ref_model.training:
        warnings.warn("ref_model is in train mode: dropout adds noise to the KL; call .eval()")
    require(
        [len(lp) for lp in old_logps] == [len(a) for a in actions],
        "old_logps must hold one log-prob per action id of each move, as sampled",
    )
    require(
        torch.is_tensor(advantages) and advantages.shape == (len(actions),),
        "advantages: one per move, (N,); see move_advantages",
    )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    require(
        all(id(p) in held for p in model.parameters() if p.requires_grad),
        "the optimizer does not hold the model's trainable parameters",
    )
    warn_unless_float32(model)


def check_labels(labels: torch.Tensor, name: str = "labels") -> None:
    # The loss would be NaN (0 / 0) without a pair.
    require(len(labels), f"no {name}: skip the classification when there are no pairs")
    require(
        bool(((labels == 0) | (labels == 1)).all()),
        f"{name} must be 0 (bad) or 1 (good), got values like {labels.flatten()[:4].tolist()}",
    )


# ---- Padding, positions, and a shared prompt head -------------------------------------------
def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-pad sequences (prompts to sample from; prompt + action to score): ids, attention mask
    and position ids, each (N, T). Positions count real tokens only, so the padding is invisible
    to the model, and every sequence ends at the right edge."""
    width = max(len(x) for x in seqs)
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in seqs], device=device)  # (N, P)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, P)
    return ids, mask, positions


def model_inputs(model, seqs: list[list[int]], pad_id: int, more_tokens: int = 0):
    """left_pad on the model's device, after the checks a model of one's own can fail: a pad id
    and every id inside its vocabulary (padding is masked, so end-of-text serves), and positions
    for the longest sequence plus `more_tokens` (a rotary model would read past them silently)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    require(
        pad_id is not None and (vocab is None or 0 <= pad_id < vocab),
        f"pad id {pad_id} is not a token of the model: pad with end-of-text",
    )
    held = getattr(config, "max_position_embeddings", None)
    require(all(seqs), "an empty sequence: every prompt needs ids (an empty observation?)")
    top = max(max(x) for x in seqs)  # an id past the embedding table: an IndexError deep inside
    require(vocab is None or top < vocab, f"id {top} is past the model's {vocab}: resize it")
    longest = max(len(x) for x in seqs) + more_tokens
    require(
        held is None or longest <= held,
        f"a prompt and its action need {longest} positions, the model holds {held}: "
        "shorten the history or the action budget",
    )
    return left_pad(seqs, pad_id, next(model.parameters()).device)


SHARED_HEAD_MIN = 32  # ids: a shorter common head runs with each row (the built-in model's: 0)


def common_head(seqs: list[list[int]], keep: int) -> int:
    """How many leading ids all `seqs` share, leaving each at least `keep` ids of its own.

    >>> common_head([[5, 6, 7, 8], [5, 6, 9]], keep=1)
    2
    """
    most = min(len(x) for x in seqs) - keep
    shared = 0
    while shared < most and all(x[shared] == seqs[0][shared] for x in seqs):
        shared += 1
    return shared


def forward_batch(
    model, seqs: list[list[int]], pad_id: int, keep: int, more_tokens: int = 0, use_cache=False
):
    """The model on left-padded `seqs`, the logits of each row's last `keep` positions:
    (out, ids, mask, positions), ids the ids run last, mask and positions (N, all positions).

    Where every sequence starts with the same SHARED_HEAD_MIN or more ids (a chat's system
    turn), that head runs once, batch 1, and its keys and values serve every row: repeated N
    times, so every row's gradient flows back into the head's computation (exact, not detached).
    The rows then run from where the head ends: padding after the head, positions counting on."""
    head = common_head(seqs, keep) if len(seqs) > 1 else 0
    if head < SHARED_HEAD_MIN:  # today's one forward
        ids, mask, positions = model_inputs(model, seqs, pad_id, more_tokens)  # (N, T) each
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=use_cache,  # the sampler's cache; the scorer's would only hold memory
            logits_to_keep=keep,
        )
        return out, ids, mask, positions
    rests = [x[head:] for x in seqs]
    ids, rest_mask, rest_positions = model_inputs(model, rests, pad_id, head + more_tokens)
    first = torch.tensor([seqs[0][:head]], device=ids.device)  # (1, head)
    cache = getattr(model(input_ids=first, use_cache=True), "cache", None)  # (1, ..., head, ...)
    require(cache is not None, "the model returned no key/value cache: set ga.SHARED_HEAD_MIN high")
    cache.batch_repeat_interleave(len(seqs))  # (N, ..., head, ...): a copy; gradients add up
    mask = torch.cat([rest_mask.new_ones(len(seqs), head), rest_mask], dim=1)  # (N, head + R)
    positions = rest_positions + head  # (N, R)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=keep,
    )
    return out, ids, mask, positions


def encode_observations(tokenizer, observations: list[str]) -> list[list[int]]:
    """Each observation's ids, no special tokens: encoded once, then only ever concatenated."""
    if not observations:  # a tokenizer fails on an empty batch
        return []
    return tokenizer(observations, add_special_tokens=False)["input_ids"]


# ---- Data parallel: torchrun --nproc_per_node N runs this file N times, one rank each ---------
# In one process every function here is the identity (or nothing): the single-process run is the
# same code. Under torchrun rank 0 draws the B layouts for all, each rank plays its share of the
# groups (a group never crosses ranks, so advantages stay local), and every update step sums the
# ranks' gradients, each rank's loss divided by the token count of every rank (ranks_sum).
DIST_TIMEOUT_MINUTES = 30  # a rank that waits longer than this for the others stops with an error


def rank_and_world() -> tuple[int, int]:
    """(rank, number of ranks): (0, 1) in one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where tensors sent between ranks live: the GPU for nccl, the CPU for gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ranks_sum(x):
    """x summed over every rank: a number (returned as a number) or a tensor (returned on the
    tensor's device). In one process: x itself."""
    if rank_and_world()[1] == 1:
        return x
    total = torch.as_tensor(x, dtype=torch.float64).to(collective_device()).clone()
    torch.distributed.all_reduce(total)
    if isinstance(x, torch.Tensor):
        return total.to(x.device, x.dtype)
    return type(x)(total.item())


def sum_gradients(model) -> None:
    """Every parameter's gradient summed over the ranks, in place (a rank with nothing to
    differentiate sends zeros), so that every rank takes the very same step."""
    if rank_and_world()[1] == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    # One message, in one fixed order: a message per parameter pays the latency each time.
    flat = torch.cat([g.flatten() for g in grads]).to(collective_device())
    torch.distributed.all_reduce(flat)
    for p, summed in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = summed.view_as(p).to(p.device)


def gathered(value) -> list:
    """[value of rank 0, value of rank 1, ...]: any picklable value (moves, rewards), for the log.
    In one process: [value]."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    values = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def same_weights_everywhere(model, source: int = 0) -> None:
    """Every rank takes rank `source`'s weights (after the warm-up: GPU kernels need not be
    bit-for-bit alike on every rank)."""
    if rank_and_world()[1] == 1:
        return
    for tensor in model.state_dict().values():
        on_wire = tensor.to(collective_device())
        torch.distributed.broadcast(on_wire, source)
        tensor.copy_(on_wire)


def weights_differ_between_ranks(model) -> bool:
    """Does any rank hold other weights than rank 0? A checksum per rank, compared."""
    if rank_and_world()[1] == 1:
        return False
    with torch.no_grad():  # each parameter's sum and sum of squares, in float64
        checksum = [
            (p.double().sum().item(), p.double().square().sum().item()) for p in model.parameters()
        ]
    sums = gathered(checksum)
    return any(x != sums[0] for x in sums)


def everyones(moves: list, rewards: torch.Tensor, advantages: torch.Tensor):
    """Every rank's moves, rewards (B, G) and advantages (N,), for the log (rank 0's first).
    In one process: these themselves."""
    if rank_and_world()[1] == 1:
        return moves, rewards, advantages
    shares = gathered((moves, rewards.cpu(), advantages.cpu()))
    every_move = [m for share, _, _ in shares for m in share]
    return every_move, torch.cat([r for _, r, _ in shares]), torch.cat([a for _, _, a in shares])


def update_stats_over_ranks(stats: dict) -> dict:
    """grpo_update's statistics of the whole step: each rank reports its part of each token mean
    (divided by every rank's tokens), so the parts add up (a rank with nothing in a step adds
    nothing); moves add up; the first ratio's deviation is the largest of any rank. Exact when
    every rank has moves in every step. In one process: these themselves."""
    if rank_and_world()[1] == 1:
        return stats
    shares = gathered(stats)
    summed = {}
    for key, value in stats.items():
        values = [share[key] for share in shares]
        if all(math.isnan(v) for v in values):
            summed[key] = math.nan
        elif key == "ratio_dev_first":
            summed[key] = max(v for v in values if not math.isnan(v))
        else:
            summed[key] = sum(v for v in values if not math.isnan(v))
    return summed


def on_rank_zero(compute):
    """compute() on rank 0 alone while the other ranks wait (evaluation, probes); every rank gets
    its result. In one process: compute()."""
    rank, world = rank_and_world()
    if world == 1:
        return compute()
    result = [compute() if rank == 0 else None]
    torch.distributed.broadcast_object_list(result, src=0)
    return result[0]


def start_ranks(device: torch.device) -> torch.device:
    """Join torchrun's process group (gloo on the CPU, nccl on CUDA, one GPU per rank) and return
    this rank's device."""
    import datetime

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=DIST_TIMEOUT_MINUTES)
    torch.distributed.init_process_group(backend, timeout=timeout)
    return device


# ---- Prompt formats: plain text, and the pieces of a chat template ---------------------------
def prompt_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text: Llama's <s>, nothing for GPT-2's.
    Read off a word encoded with and without them, so that a token it adds *after* a text (an
    end-of-text some tokenizers append) never lands in front of every prompt."""
    plain = tokenizer("A", add_special_tokens=False)["input_ids"]
    marked = tokenizer("A", add_special_tokens=True)["input_ids"]
    starts = [k for k in range(len(marked)) if marked[k : k + len(plain)] == plain]
    return marked[: starts[0]] if starts else []


def plain_format(tokenizer, move_lead: str = " ") -> PromptFormat:
    """Bare text: the tokenizer's start tokens, the observation (ending, say, in 'action:'), the
    move after a space, then the next observation."""
    return PromptFormat(prompt_prefix(tokenizer), [], [], [], move_lead)


def chat_pieces(tokenizer, system: str) -> tuple[str, str, str]:
    """(head, after_observation, after_move): the chat template's texts around the turns, cut out
    of one render of [system, user: O1, assistant: M1, user: O2] and the generation prompt.
    For ChatML (SmolLM2, Qwen2.5):

        head              '<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n'
        after_observation '<|im_end|>\\n<|im_start|>assistant\\n'   (the generation prompt)
        after_move        '\\n<|im_start|>user\\n'   (the move's own ids end in '<|im_end|>')

    The sampler stops at end-of-text, so the template's end-of-turn must be the tokenizer's
    eos_token. A template that renders turns some other way (a system prompt it rewrites per
    turn, a reasoning block) is refused."""
    require(
        getattr(tokenizer, "chat_template", None),
        "this tokenizer has no chat template: use plain prompts (chat off) or set one",
    )
    require(
        isinstance(system, str) and system.strip(),
        "a chat prompt needs the environment's system text (the task in words), e.g. "
        "toy_env.CHAT_SYSTEM for the gridworld",
    )
    o1, m1, o2 = "OBSERVATION_ONE", "MOVE_ONE", "OBSERVATION_TWO"  # placeholders

    def render(messages: list[tuple[str, str]]) -> str:
        conversation = [{"role": role, "content": text} for role, text in messages]
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )

    two_turns = render([("system", system), ("user", o1), ("assistant", m1), ("user", o2)])
    head, _, rest = two_turns.partition(o1)
    after_observation, _, rest = rest.partition(m1)
    after_move, _, tail = rest.partition(o2)
    end = tokenizer.eos_token
    one_turn = render([("system", system), ("user", o1)])
    require(
        tail == after_observation and one_turn == head + o1 + tail,
        "this chat template does not render turns as fixed pieces around them",
    )
    require(
        after_move.startswith(end),
        f"the chat template ends an assistant turn with {after_move[:12]!r}, not with the "
        f"tokenizer's end-of-text {end!r}: set tokenizer.eos_token to its end-of-turn token",
    )
    return head, after_observation, after_move[len(end) :]


def chat_format(tokenizer, system: str) -> PromptFormat:
    """The tokenizer's chat template as a PromptFormat, `system` (the environment's rules) as the
    system turn: [system] + [user: observation, assistant: move] per past turn + [user: now].
    The texts are encoded without special tokens added: a start token the template writes is not
    doubled."""
    head, after_observation, after_move = chat_pieces(tokenizer, system)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    turn_end = [tokenizer.eos_token_id]
    return PromptFormat(ids(head), ids(after_observation), ids(after_move), turn_end, "")


def chat_verdict(tokenizer, system: str) -> VerdictFormat:
    """The verdict in a chat: asked as the next user turn, answered 'bad' or 'good'."""
    _, after_observation, after_move = chat_pieces(tokenizer, system)
    query = after_move + CHAT_VERDICT_QUESTION + after_observation
    return verdict_format(tokenizer, query, CHAT_VERDICTS, [tokenizer.eos_token_id])


def verdict_format(tokenizer, query: str, words: tuple[str, str], turn_end: list[int]):
    """A VerdictFormat from texts, refused if the tokenizer cannot write both verdict words."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    verdict = VerdictFormat(ids(query), [ids(w) for w in words], turn_end)
    require(
        verdict.words[BAD] != verdict.words[GOOD]
        and tokenizer.unk_token_id not in sum(verdict.words, []),
        "the tokenizer cannot write the verdict words: add them to its vocabulary",
    )
    return verdict


# ---- The built-in tiny model and its word tokenizer --------------------------------------------
def build_word_tokenizer():
    """A word-level tokenizer over the environment's words: one token per cell, newline, move."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", *toy_env.VOCABULARY, "verdict:", "good", "bad"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),  # spaces separate words
            pre_tokenizers.Split("\n", behavior="isolated"),  # a newline is a word of its own
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def build_tiny_model(tokenizer, layers: int, dim: int, positions: int, arch: str):
    """A small causal LM from a config (random init). At the defaults, 3 layers x 96 wide:
    0.34 M parameters for GPT-2 (with 64 learned positions), 0.33 M for Llama.

    arch 'gpt2': learned absolute positions, LayerNorm, a GELU MLP 4x wide. 'llama': rotary
    positions, RMSNorm, a SwiGLU MLP 8/3 x wide (the same parameter count), as Llama and Qwen are.
    `positions`: the longest sequence it must read (GPT-2's positions are learned, and a longer
    input fails with an index error); never fewer than 64, so that every run that needs fewer draws
    the same initial weights (GPT-2's position table is drawn from the same random stream).
    `arch` has no default: a default could differ from the run's (--tiny-arch llama)."""
    require(arch in ("gpt2", "llama"), f"arch must be 'gpt2' or 'llama', got {arch!r}")
    special = dict(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM  # imported when needed: seconds

        config = LlamaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=max(64, positions),
            hidden_size=dim,
            intermediate_size=8 * dim // 3,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            attention_dropout=0.0,
            initializer_range=0.1,  # as for GPT-2 below
            tie_word_embeddings=True,  # as GPT-2 does
            **special,
        )
        return LlamaForCausalLM(config)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(64, positions),
        n_embd=dim,
        n_layer=layers,
        n_head=4,
        activation_function="gelu",
        resid_pdrop=0.0,  # dropout is off during RL anyway
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.1,  # GPT-2's 0.02 leaves a tiny model on a long plateau here
        **special,
    )
    return GPT2LMHeadModel(config)


# ---- Loading a policy: the tiny model, or a pretrained causal LM (a .gguf too) ----------------
def positions_needed(
    tokenizer, layouts: list[str], max_action_tokens: int, history: int, chat: bool = False
) -> int:
    """The longest sequence a run on `layouts` reads: its longest prompt (the history's turns of
    the longest observation and action, then the longest observation), a whole action (generated,
    or in the action format the probes score), the verdict query and the longest verdict word.
    A prompt holds at most (longest budget - 1) turns: a larger history adds nothing."""
    fmt, verdict = toy_formats(tokenizer, chat)
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    observations = [env.observation(pos) for env in envs for pos in env.free_cells()]
    longest_observation = max(len(ids) for ids in encode_observations(tokenizer, observations))
    probed = max(len(action_ids_for(tokenizer, a, fmt)) for a in toy_env.ACTIONS)  # probes score
    longest_action = max(max_action_tokens + len(fmt.turn_end), probed)
    turns = min(history, max(env.max_steps for env in envs) - 1)
    framed = longest_observation + len(fmt.after_observation)  # an observation in its frame
    turn = framed + longest_action + len(fmt.after_move)
    longest_prompt = len(fmt.prefix) + turns * turn + framed
    longest_word = max(len(ids) for ids in verdict.words)
    return longest_prompt + longest_action + len(verdict.query) + longest_word


def gguf_to_folder(path: str, cache: str, log=print) -> str:
    """The float32 folder of the model in a .gguf file, made on first use in `cache` and reused
    (found by the file's name: a file of the same name is taken for the same model). transformers
    dequantises a GGUF on loading but will not save a model so loaded; its weights are copied into
    a plain model of the same config, which saves and loads as any other."""
    folder = os.path.join(cache, os.path.basename(path).removesuffix(".gguf") + "-float32")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import importlib.util

    require(
        all(importlib.util.find_spec(name) for name in ("gguf", "accelerate")),
        f"--model {path}: reading .gguf needs two packages: pip install gguf accelerate",
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {path} to float32 in {folder}/ (once; a minute for 135 M parameters)")
    t = time.time()
    directory, name = os.path.split(os.path.abspath(os.path.expanduser(path)))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    config.__dict__.pop("quantization_config", None)  # the weights are plain float32 from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    partial = f"{folder}.partial-{os.getpid()}"
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        os.replace(partial, folder)  # whole or absent, should the conversion be stopped
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"converted in {time.time() - t:.0f}s")
    return folder


def load_policy(s: Settings, device: torch.device, log=print):
    """(model, tokenizer): the tiny built-in model (seeded with --seed), or the causal LM named by
    --model (a .gguf file is converted first), refused in one line (ValueError) if it reads fewer
    positions than this run needs."""
    pool, eval_sets = task_sets(s.train_tasks, s.eval_tasks, s.data_seed)
    layouts = pool + eval_sets["held_out"]
    if not s.model:
        tokenizer = build_word_tokenizer()
        positions = positions_needed(tokenizer, layouts, s.max_action_tokens, s.history)
        torch.manual_seed(s.seed)
        model = build_tiny_model(tokenizer, s.tiny_layers, s.tiny_dim, positions, s.tiny_arch)
        return model.to(device), tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = gguf_to_folder(s.model, s.model_cache, log) if s.model.endswith(".gguf") else s.model
    tokenizer = AutoTokenizer.from_pretrained(name)
    require(
        tokenizer.eos_token_id is not None,
        f"--model {s.model}: its tokenizer has no end-of-text token",
    )
    if tokenizer.pad_token_id is None:  # harmless: padding is always known from lengths and masks
        tokenizer.pad_token = tokenizer.eos_token
    positions = positions_needed(tokenizer, layouts, s.max_action_tokens, s.history, s.chat)
    most = getattr(AutoConfig.from_pretrained(name), "max_position_embeddings", None)
    require(  # checked before the weights are loaded
        most is None or most >= positions,
        f"--model {s.model} reads at most {most} positions; a prompt of --history "
        f"{s.history}, an action of --max-action-tokens {s.max_action_tokens} and the "
        f"verdict need {positions}",
    )
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model.to(device), tokenizer


if __name__ == "__main__":
    sys.exit(main())
