"""Agentic GRPO on a text gridworld, in one file: a teaching reference for arXiv 2509.23870.

    pip install -r requirements.txt && python grpo_agentic.py      # about 2 minutes on 2 CPU cores
    python grpo_agentic.py --help                                  # every setting, with its meaning
    python grpo_agentic.py --model runs/<run>/policy --iters 0 --sft-steps 0   # evaluate a saved policy

A tiny GPT-2 (built from a config: nothing is downloaded) is warm-started on oracle moves, then trained with
GRPO: for B layouts it plays G episodes each; every turn the policy reads the grid as text and *writes* its
move; the reward is 1 if the goal is reached within the budget, else 0. Every move inherits its episode's
advantage, the reward standardised within its group of G (GiGPO's step-level credit can be added). The actor
can also judge its own moves (the paper's classification objective, GCD) and use that verdict at evaluation
(a self-check); probes measure the paper's claims as training goes: flawed moves' credit, squeezing, coupling.

Sections follow the data: settings -> model -> rollout -> advantages and loss -> classification loss
-> update -> diagnostics -> training loop -> experiment and command line; `CORE:` marks the parts
worth copying. Deviations from DeepSeekMath GRPO and from the paper, and why: README.md.

Shapes:  B tasks (layouts) per iteration, G episodes per task (the group), N moves in a batch,
         P prompt tokens, K generated action tokens, T = prompt + action tokens, V vocabulary.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers import HfArgumentParser

import toy_env

# ---- Settings: the one source of truth. The command line and --help are derived from this dataclass. ----
def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an unavailable or unknown device is a ValueError."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    kind, _, index = name.partition(":")
    if name == "auto":
        return torch.device(next(k for k, ok in available.items() if ok))
    if kind not in available or not (index == "" or index.isdigit()) or not available[kind]:
        raise ValueError(f"--device {name!r} is not supported or not available here; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)

def arg(default, help: str):
    return field(default=default, metadata={"help": help})

@dataclass
class Settings:
    seed: int = arg(0, "random seed (init, task sampling, rollouts, minibatch order)")
    iters: int = arg(150, "GRPO iterations (each: rollouts of B x G episodes, then one update); 0 with --sft-steps 0 = evaluate --model")
    train_tasks: int = arg(256, "size of the fixed set of train-split layouts that RL (and the warm-up) sees")
    data_seed: int = arg(0, "seed of the train and held-out layout sets (fixed across training seeds)")
    tasks_per_iter: int = arg(16, "B: distinct train layouts per iteration")
    group_size: int = arg(8, "G: episodes per layout; the advantage baseline is this group's mean")
    step_credit_coef: float = arg(0.0, "w in A = A_episode + w * A_step: GiGPO's step-level credit (0 = plain GRPO; GiGPO uses 1)")
    gamma: float = arg(0.95, "discount of the step return R = gamma^(moves after this one) * episode reward (GiGPO)")
    scale_by_std: bool = arg(True, "divide advantages by the group's std (--no-scale-by-std: Dr. GRPO's r - mean)")
    lr: float = arg(5e-4, "peak AdamW learning rate of the GRPO phase")
    lr_warmup_iters: int = arg(10, "iterations of linear learning-rate warm-up to --lr; then linear decay towards 0")
    clip_eps: float = arg(0.2, "PPO clip range epsilon on the token probability ratio")
    kl_coef: float = arg(0.0, "weight of the k3 KL penalty to the policy at the start of RL (0 = off)")
    epochs: int = arg(1, "passes over each iteration's rollouts (PPO epochs; 1 as in TRL and verl); the clip matters from the 2nd step on")
    minibatch_moves: int = arg(96, "target moves per gradient step; each epoch splits a fresh shuffle into near-equal parts")
    temperature: float = arg(1.0, "sampling temperature during rollouts (1.0 = sample the policy itself)")
    max_action_tokens: int = arg(4, "generation budget for one action, end-of-text token included")
    sft_steps: int = arg(150, "supervised warm-up steps on oracle moves before RL (0 = none)")
    sft_lr: float = arg(1e-3, "AdamW learning rate of the warm-up")
    sft_batch: int = arg(128, "(state, oracle move) pairs per warm-up step")
    eval_every: int = arg(50, "greedy evaluation and probes every this many iterations (and at the end)")
    eval_tasks: int = arg(256, "held-out layouts in the greedy evaluation (in-domain: the first this many train layouts)")
    render_every: int = arg(50, "print one sampled episode as text every this many iterations (0 = never)")
    cls_coef: float = arg(0.0, "weight of the actor's own good/bad classification loss (GCD); 0 = plain GRPO")
    cls_labels: str = arg("advantage", "'advantage': sign of each A != 0 move's advantage; 'oracle': every move at every visited state")
    self_check: int = arg(0, "evaluation also with a self-check: a move the actor's own verdict calls bad is resampled, up to K times")
    cls_samples: int = arg(128, "at most this many labelled (state, move) pairs per iteration, drawn at random")
    probe_pairs: int = arg(16, "coupled (good, flawed) state pairs in the gradient-coupling probe")
    probe_states: int = arg(128, "start states per eval set (its first layouts) where p_flawed and cls_bacc are read")
    model: str = arg("", "path or hub name of a causal LM for AutoModelForCausalLM ('' = tiny GPT-2 from config)")
    tiny_layers: int = arg(3, "layers of the built-in tiny GPT-2")
    tiny_dim: int = arg(96, "width of the built-in tiny GPT-2 (a multiple of its 4 heads)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    out_dir: str = arg("", "where settings.json, metrics.jsonl, summary.json and policy/ go ('' = runs/<time>-seed<seed>)")
    overwrite: bool = arg(False, "allow writing into an --out-dir that already holds a run")
    compare: bool = arg(False, "train GRPO, GRPO+cls (advantage / oracle labels) and GiGPO for each of --seeds (resumes)")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "seeds of --compare"})
    workers: int = arg(2, "--compare: runs at once, each in its own process with its share of the CPU threads")
    plot: bool = arg(False, "plot a --compare --out-dir over training (needs matplotlib)")
    def __post_init__(self):
        """Value checks. The first bad setting raises one ValueError that names its flag."""
        def need(ok: bool, name: str, rule: str):
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)!r}")
        for name in ("epochs", "train_tasks", "tasks_per_iter", "minibatch_moves", "max_action_tokens", "sft_batch",
                     "eval_every", "eval_tasks", "probe_pairs", "probe_states", "workers", "cls_samples", "tiny_layers", "tiny_dim"):
            need(getattr(self, name) >= 1, name, ">= 1")
        for name in ("iters", "sft_steps", "lr_warmup_iters", "render_every", "kl_coef", "clip_eps", "cls_coef", "data_seed",
                     "step_credit_coef", "gamma", "self_check"):
            need(getattr(self, name) >= 0, name, ">= 0")
        for name in ("lr", "sft_lr", "temperature"):
            need(getattr(self, name) > 0 and math.isfinite(getattr(self, name)), name, "a positive number")
        need(self.group_size >= 2, "group_size", ">= 2 (a group of one has no baseline)")
        need(self.tiny_dim % 4 == 0, "tiny_dim", "a multiple of 4 (the number of heads)")
        need(self.cls_labels in ("advantage", "oracle"), "cls_labels", "'advantage' or 'oracle'")
        need(self.train_tasks >= self.tasks_per_iter, "train_tasks", f">= --tasks-per-iter ({self.tasks_per_iter})")
        need(len(self.seeds) > 0 and all(x >= 0 for x in self.seeds), "seeds", "one or more integers >= 0")
        need(not self.plot or bool(self.out_dir), "plot", "used with --out-dir (the directory of a --compare run)")
        resolve_device(self.device)

def parse_settings(argv: list[str] | None = None) -> Settings:
    """The command line, built from Settings by transformers' HfArgumentParser; any error is one line, exit code 2."""
    parser = HfArgumentParser(Settings, prog="grpo_agentic.py", description=__doc__.split("\n")[0])
    parser.error = lambda message: parser.exit(2, f"grpo_agentic.py: error: {message} (see --help)\n")
    try:
        (s,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as e:  # from Settings.__post_init__, or arguments argparse did not use
        parser.error(str(e))
    looks_like_path = s.model.startswith((".", "/", "~")) or s.model.count("/") > 1  # not a hub id "org/name"
    if s.model and looks_like_path and not os.path.exists(os.path.expanduser(s.model)):
        parser.error(f"--model {s.model}: no such file or directory")
    holds_run = any(os.path.exists(os.path.join(s.out_dir, f)) for f in ("metrics.jsonl", "compare.md"))
    if s.out_dir and holds_run and not (s.plot or s.overwrite):
        parser.error(f"--out-dir {s.out_dir} already holds a run; choose another directory or pass --overwrite")
    return s

class NonFiniteError(RuntimeError):
    """A loss or the logits became NaN/inf: stop rather than train on garbage."""

# ---- Model & tokenizer -----------------------------------------------------------------------------
VERDICT_QUERY = " verdict:"   # appended after a move; the LM head then scores " good" vs " bad" (GCD)
VERDICTS = ("good", "bad")

def build_word_tokenizer():
    """A word-level tokenizer over the environment's words: one token per cell, newline, move."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["[PAD]", "[UNK]", "[EOS]", *toy_env.VOCABULARY, VERDICT_QUERY.strip(), *VERDICTS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),  # spaces separate
                                                  pre_tokenizers.Split("\n", behavior="isolated")])  # words; newlines are words
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")

def build_tiny_model(tokenizer, s: Settings):
    """A small GPT-2 from a config (random init). 3 layers x 96 wide is ~0.34 M parameters."""
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=s.tiny_dim, n_layer=s.tiny_layers, n_head=4,
        activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout is off in RL anyway
        initializer_range=0.1,  # GPT-2's 0.02 leaves a tiny model on a long plateau here
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

def load_policy(s: Settings, device: torch.device):
    """(model, tokenizer): the tiny built-in model, or any causal LM named by --model."""
    torch.manual_seed(s.seed)
    if not s.model:
        tokenizer = build_word_tokenizer()
        return build_tiny_model(tokenizer, s).to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(s.model)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {s.model}: its tokenizer has no end-of-text token to end an action")
    if tokenizer.pad_token_id is None:  # harmless: which positions are padding always comes from lengths/masks
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(s.model, dtype=torch.float32).to(device), tokenizer

def action_ids_for(tokenizer, action: str) -> list[int]:
    """The one action format: ' left' + end-of-text, as ids. A rollout takes exactly these ids as a
    move, so every probe that scores this sequence scores what the policy really does."""
    return tokenizer(" " + action, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

# ---- Rollout: all live episodes step together, one batched forward per generated token. ------------
def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation: ids, attention mask and position ids, each (N, P).
    Positions count real tokens only, so the padding is invisible to the model."""
    width = max(len(x) for x in seqs)
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in seqs], device=device)        # (N, P)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], device=device)  # (N, P)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

@torch.no_grad()
def generate_actions(model, tokenizer, prompts: list[list[int]], max_tokens: int, temperature: float,
                     greedy: bool, generator: torch.Generator | None):
    """Sample one action per prompt. Returns (token ids per action, their log-probs, decoded texts). Our own
    loop rather than `model.generate`, so the tokens come from exactly softmax(logits / T): no top-k/top-p/
    repetition processors from a generation_config sneak in, and the log-probs are those the loss scores."""
    device = next(model.parameters()).device
    ids, mask, positions = left_pad(prompts, tokenizer.pad_token_id, device)  # each (N, P)
    n, cache = len(prompts), None
    actions, logps = [[] for _ in range(n)], [[] for _ in range(n)]
    finished = torch.zeros(n, dtype=torch.bool, device=device)        # (N,)
    for _ in range(max_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        logits = out.logits[:, -1, :].float() / temperature             # (N, V)
        if not torch.isfinite(logits).all():
            raise NonFiniteError("the policy's logits are not finite")
        logprobs = torch.log_softmax(logits, dim=-1)                    # (N, V)
        token = (logprobs.argmax(dim=-1) if greedy                      # (N,)
                 else torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1))
        tokens, token_logps = token.tolist(), logprobs.gather(1, token[:, None]).squeeze(1).tolist()  # N and N
        for i in (~finished).nonzero().flatten().tolist():
            actions[i].append(tokens[i])
            logps[i].append(token_logps[i])
        finished |= token == tokenizer.eos_token_id
        if finished.all():
            break
        cache = out.cache
        ids, positions = token[:, None], positions[:, -1:] + 1          # (N, 1)
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
    texts = tokenizer.batch_decode(actions, skip_special_tokens=True)
    return actions, logps, texts

@dataclass
class Move:
    """One decision: what the policy read, what it wrote (token ids, as sampled), what it meant."""
    episode: int                # index into the rollout's B*G episodes (group = episode // G)
    prompt_ids: list[int]
    action_ids: list[int]       # as sampled; end-of-text included when it was generated
    sample_logps: list[float]   # log pi(token) recorded while sampling, one per action id
    text: str                   # decoded, for logs
    action: str | None          # the move these ids spell in the one action format; None = off-format
    good: bool                  # oracle label: diagnostics and the oracle-label ablation only, never the reward
    good_moves: tuple = ()      # every move the oracle calls good at this state (same use)

def encode_prompts(tokenizer, observations: list[str]) -> list[list[int]]:
    return tokenizer(observations, add_special_tokens=True)["input_ids"]

def rollout(model, tokenizer, layouts: list[str], group_size: int, s: Settings, greedy: bool = False,
            generator: torch.Generator | None = None, judge=None, tries: int = 0):
    """Play `group_size` episodes on each layout, all at once. Returns (moves, rewards (B, G), envs).
    Only ids that spell ' move' + end-of-text exactly are a move; anything else (say 'left \\n \\n', which the
    lenient environment would parse) is off-format and moves nothing. Self-check: with a `judge(prompts,
    actions) -> [ok, ...]`, a rejected move is resampled (temperature sampling) up to `tries` times; the last stands."""
    formats = {tuple(action_ids_for(tokenizer, a)): a for a in toy_env.ACTIONS}
    envs = [toy_env.GridWorld.from_string(lay) for lay in layouts for _ in range(group_size)]
    observations = [env.reset() for env in envs]
    moves, live = [], list(range(len(envs)))       # live: episodes still running
    while live:
        prompt_ids = encode_prompts(tokenizer, [observations[i] for i in live])
        action_ids, logps, texts = generate_actions(model, tokenizer, prompt_ids, s.max_action_tokens,
                                                    s.temperature, greedy, generator)
        pending = list(range(len(prompt_ids))) if judge else []     # moves the judge has not accepted yet
        for _ in range(tries if pending else 0):
            verdicts = judge([prompt_ids[k] for k in pending], [action_ids[k] for k in pending])
            pending = [k for k, ok in zip(pending, verdicts) if not ok]   # an accepted move is never judged again
            if not pending:
                break
            redo = generate_actions(model, tokenizer, [prompt_ids[k] for k in pending], s.max_action_tokens,
                                    s.temperature, False, generator)
            for k, a, lp, text in zip(pending, *redo):
                action_ids[k], logps[k], texts[k] = a, lp, text
        for i, p, a, lp, text in zip(live, prompt_ids, action_ids, logps, texts):
            action, good_moves = formats.get(tuple(a)), tuple(envs[i].good_actions())
            observations[i], _, _, info = envs[i].step(action)
            moves.append(Move(i, p, a, lp, text, action, info["good"], good_moves))
        live = [i for i in live if not envs[i].done]
    rewards = torch.tensor([float(env.pos == env.goal) for env in envs]).view(len(layouts), group_size)  # (B, G)
    return moves, rewards, envs

def render_episode(moves: list[Move], env: toy_env.GridWorld, episode: int) -> str:
    """One episode as text: the start grid, then each move marked good (+) or flawed (-)."""
    steps = [f"{m.text!r}{'+' if m.good else '-'}" for m in moves if m.episode == episode]
    return f"{env.to_string()}\n  moves: {' '.join(steps)}  -> {'reached the goal' if env.pos == env.goal else 'failed'}"

# ---- CORE: GRPO advantages and loss ----------------------------------------------------------------
def grpo_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantage, (num_groups, G) -> (num_groups, G).

        A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps),   std with ddof=0 (population std)
        A_ij =  r_ij - mean_j r_ij                          if not scale_by_std (Dr. GRPO)

    A group whose rewards are all equal carries no signal and gets exactly 0 (never NaN).

    >>> grpo_advantages(torch.tensor([[1., 0., 0., 1.], [1., 1., 1., 1.]]))
    tensor([[ 1.0000, -1.0000, -1.0000,  1.0000],
            [ 0.0000,  0.0000,  0.0000,  0.0000]])
    """
    mean = rewards.mean(dim=1, keepdim=True)                            # (num_groups, 1)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)              # (num_groups, 1)
    advantages = (rewards - mean) / (std + eps) if scale_by_std else rewards - mean  # (num_groups, G)
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)    # (num_groups, 1)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)

def step_returns(episodes: list[int], episode_rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return from each move on, (N,), for moves listed in the order they were played and
    an outcome reward that arrives after an episode's last move:  R_i = gamma^(moves after i) * r_episode(i).

    >>> step_returns([0, 1, 0, 0], torch.tensor([1.0, 0.0]), gamma=0.5)   # episode 0: three moves, success
    tensor([0.2500, 0.0000, 0.5000, 1.0000])
    """
    after = [episodes[i + 1:].count(e) for i, e in enumerate(episodes)]     # moves of the same episode still to come
    return episode_rewards[episodes] * gamma ** torch.tensor(after, dtype=torch.float)

def gigpo_step_advantages(anchors: list, returns: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GiGPO's step-level advantage (Feng et al., 2025, arXiv 2505.10978), (N,) -> (N,). Moves with the
    same anchor -- the same task and the same observation, in any of that task's G episodes -- form a
    step group, and each move's step return is compared within it, exactly as grpo_advantages does:

        A_step_i = (R_i - mean_{j in group(i)} R_j) / (std_{j in group(i)} R_j + eps)

    A group of one, or of equal returns, gets 0. Two visits of one state, R = 1.0 (straight on) and
    0.81 (two moves more to the goal), and a state visited once:
    >>> gigpo_step_advantages([("t", "s"), ("t", "s"), ("t", "u")], torch.tensor([1.0, 0.81, 0.9]))
    tensor([ 1.0000, -1.0000,  0.0000])
    """
    groups: dict = {}
    for i, key in enumerate(anchors):
        groups.setdefault(key, []).append(i)
    step_adv = torch.zeros_like(returns)
    for members in groups.values():
        step_adv[members] = grpo_advantages(returns[members][None], scale_by_std, eps)[0]
    return step_adv

def build_batch(prompts: list[list[int]], actions: list[list[int]], pad_id: int, device):
    """Right-padded prompt+action sequences: ids, attention mask and action mask, each (N, T). The action mask
    is 1 exactly on the action ids (as sampled, never re-tokenised text); prompt tokens and padding are 0, never
    trained. Padding is known from the lengths, never guessed from ids: pad may equal end-of-text."""
    width = max(len(p) + len(a) for p, a in zip(prompts, actions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)    # (N, T)
    attention = torch.zeros(len(prompts), width, dtype=torch.long)       # (N, T)
    action_mask = torch.zeros(len(prompts), width)                       # (N, T)
    for i, (p, a) in enumerate(zip(prompts, actions)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        attention[i, : len(p) + len(a)] = 1
        action_mask[i, len(p): len(p) + len(a)] = 1.0
    return ids.to(device), attention.to(device), action_mask.to(device)

def token_logprobs(model, ids: torch.Tensor, attention: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for every position, (N, T); position 0 (nothing to condition on) is 0.
    pi = softmax(logits / temperature): the loss must score the distribution the rollout sampled from."""
    logits = model(input_ids=ids, attention_mask=attention).logits.float() / temperature  # (N, T, V)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)                        # (N, T-1, V) predicts t=1..T-1
    picked = logp.gather(2, ids[:, 1:, None]).squeeze(2)                    # (N, T-1)
    return F.pad(picked, (1, 0))                                            # (N, T)

def sequence_logprobs(model, prompts: list[list[int]], actions: list[list[int]], pad_id: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """log pi(action | prompt) of each pair: the sum over the action's tokens, (N,)."""
    ids, attention, action_mask = build_batch(prompts, actions, pad_id, next(model.parameters()).device)
    return (token_logprobs(model, ids, attention, temperature) * action_mask).sum(dim=1)

def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, action_mask: torch.Tensor,
              clip_eps: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0):
    """PPO-clipped surrogate over action tokens, token-level average. All tensors (N, T) but advantages (N,).

        ratio_t = exp(logp_t - old_logp_t)
        L = -(1 / num_action_tokens) * sum_t mask_t * min(ratio_t * A, clip(ratio_t, 1-eps, 1+eps) * A)
            + kl_coef * (1 / num_action_tokens) * sum_t mask_t * (exp(d_t) - d_t - 1),  d_t = ref_logp_t - logp_t
    The KL term is the k3 estimator of KL(pi || pi_ref) (Schulman, 2020). Normaliser: every action
    token of the minibatch weighs the same, however the tokens split into moves and episodes.
    Returns (loss, info); info["ratio_dev"] = max_t |ratio_t - 1|, 0 when sampler and scorer agree.
    """
    num_action_tokens = action_mask.sum().clamp(min=1.0)
    ratio = torch.exp(logp - old_logp)                                          # (N, T)
    adv = advantages[:, None]                                                   # (N, 1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (N, T)
    loss = -(surrogate * action_mask).sum() / num_action_tokens
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp                                                     # (N, T)
        kl = ((torch.exp(d) - d - 1) * action_mask).sum() / num_action_tokens
        loss = loss + kl_coef * kl
    dev = ((ratio.detach() - 1).abs() * action_mask)                            # (N, T)
    return loss, {"clip_frac": float(((dev > clip_eps).float()).sum() / num_action_tokens),
                  "kl": kl.item(), "ratio_dev": float(dev.max())}

# ---- CORE: the actor classifies its own moves (the paper's "generative classification disentanglement") ----
def classification_set(moves: list[Move], advantages: torch.Tensor, source: str, tokenizer):
    """What the actor learns to judge: (prompts, actions, labels (n,)), label 1 = good, 0 = flawed.
    'advantage': each move with A != 0, labelled by the sign of A -- what a real agent has; noisy,
                 since a flawed move in a lucky episode gets A > 0 (Lemma 3.1's other face).
    'oracle':    all 4 moves (in the action format) at every distinct visited state, labelled by the
                 oracle -- the upper bound only a toy allows."""
    if source == "advantage":
        keep = (advantages != 0).nonzero().flatten().tolist()
        return [moves[i].prompt_ids for i in keep], [moves[i].action_ids for i in keep], (advantages[keep] > 0).long()
    states = {tuple(m.prompt_ids): m.good_moves for m in moves}                 # distinct visited states
    pairs = [(state, a) for state in states for a in toy_env.ACTIONS]
    return ([list(p) for p, _ in pairs], [action_ids_for(tokenizer, a) for _, a in pairs],
            torch.tensor([int(a in states[p]) for p, a in pairs], dtype=torch.long))

def verdict_logits(model, tokenizer, prompts: list[list[int]], actions: list[list[int]]) -> torch.Tensor:
    """(N, 2) scores [log p(" good" | s, a, query), log p(" bad" | s, a, query)] from the actor's own LM head.
    No new parameters. A verdict of several tokens scores the sum of their log-probs; when each is
    one token, both are read at the same position: one forward instead of two."""
    query = tokenizer(VERDICT_QUERY, add_special_tokens=False)["input_ids"]
    asked = [p + a + query for p, a in zip(prompts, actions)]                 # state, move, query
    verdicts = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in VERDICTS]
    if all(len(v) == 1 for v in verdicts):
        ids, attention, _ = build_batch(asked, [[]] * len(asked), tokenizer.pad_token_id, next(model.parameters()).device)
        logits = model(input_ids=ids, attention_mask=attention).logits.float()   # (N, T, V)
        last = logits[torch.arange(len(asked)), attention.sum(1) - 1]             # (N, V) after the query
        return torch.log_softmax(last, dim=-1)[:, [v[0] for v in verdicts]]       # (N, 2)
    return torch.stack([sequence_logprobs(model, asked, [v] * len(asked), tokenizer.pad_token_id) for v in verdicts], dim=1)  # (N, 2)

def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 2-way verdict, (N, 2) logits and (N,) labels (1 = good) -> (), each class
    weighing the same whatever its count -- unweighted, a 72 % majority makes "always good" a minimum:

        L = mean over classes c present of ( mean_{i: y_i = c} -log softmax(logits_i)[index of y_i] )
    Verdict index 0 is "good", 1 is "bad". Two good moves at log 2 each and one flawed at log(1 + e^2):
    >>> round(balanced_cross_entropy(torch.tensor([[0., 0.], [0., 0.], [2., 0.]]), torch.tensor([1, 1, 0])).item(), 4)
    1.41
    """
    target = 1 - labels.to(logits.device)                                     # (N,) verdict index
    count = torch.bincount(target, minlength=2).float()                       # (2,)
    return F.cross_entropy(logits, target, weight=torch.where(count > 0, 1 / count.clamp(min=1), 0.0))

def classification_loss(model, tokenizer, prompts: list[list[int]], actions: list[list[int]], labels: torch.Tensor):
    """Balanced cross-entropy of the actor's verdict on (state, move) pairs, labels (n,) with 1 = good."""
    return balanced_cross_entropy(verdict_logits(model, tokenizer, prompts, actions), labels)

# ---- CORE: the update -- clipped surrogate (+ classification, + KL) over shuffled minibatches ------
def minibatches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A fresh shuffle of range(n) cut into round(n / size) near-equal minibatches (sizes differ by at
    most 1), so that no tiny remainder gets a full optimiser step of its own.

    >>> [len(b) for b in minibatches(600, 256, np.random.default_rng(0))]
    [300, 300]
    """
    return np.array_split(rng.permutation(n), max(1, round(n / size)))

def learning_rate(it: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate of RL iteration `it` (1-based): linear warm-up to `peak`, reached at iteration
    `warmup`, then linear decay that would reach 0 one iteration after the last:

        lr(it) = peak * min(1, it / warmup, (total + 1 - it) / max(1, total + 1 - warmup))
    Warm-up because Adam's first steps have size ~lr in every coordinate whatever the gradient's size
    (a noisy policy gradient would undo the warm-start); decay so that the final policy settles.

    >>> [round(learning_rate(it, 1.0, warmup=2, total=6), 3) for it in range(1, 7)]
    [0.5, 1.0, 0.8, 0.6, 0.4, 0.2]
    """
    return peak * min(1.0, it / warmup if warmup else 1.0, (total + 1 - it) / max(1, total + 1 - warmup))

def grpo_update(model, tokenizer, moves: list[Move], advantages: torch.Tensor, optimizer, s: Settings,
                rng: np.random.Generator, ref_model=None) -> dict:
    """`s.epochs` shuffled passes of clipped-surrogate steps over the moves that carry signal (A != 0); all-equal
    groups (A = 0) are left out whatever --kl-coef is, so KL adds a term and changes nothing else. Old log-probs:
    those recorded while sampling (same model, dropout off), so the first ratio is 1 up to float error
    (`ratio_dev_first`). With --cls-coef > 0 each step also takes its share of the classification set."""
    device = next(model.parameters()).device
    signal = (advantages != 0).nonzero().flatten().tolist()
    cls_prompts, cls_actions, cls_labels = (classification_set(moves, advantages, s.cls_labels, tokenizer) if s.cls_coef > 0
                                            else ([], [], torch.zeros(0, dtype=torch.long)))
    cls_pick = rng.permutation(len(cls_prompts))[: s.cls_samples]                  # at most cls_samples, at random
    steps = []
    for _ in range(s.epochs if signal or len(cls_pick) else 0):
        parts = minibatches(len(signal), s.minibatch_moves, rng)                  # RL moves; [empty] without signal
        for part, cls_part in zip(parts, np.array_split(rng.permutation(cls_pick), len(parts))):
            loss, pg_loss, info = torch.zeros((), device=device), math.nan, {"clip_frac": math.nan, "kl": math.nan}
            if len(part):
                idx = [signal[k] for k in part]
                batch = [moves[i] for i in idx]
                ids, attention, action_mask = build_batch([m.prompt_ids for m in batch], [m.action_ids for m in batch],
                                                           tokenizer.pad_token_id, device)  # (n, T) each
                old = torch.zeros_like(action_mask)                                       # (n, T)
                old[action_mask == 1] = torch.tensor([lp for m in batch for lp in m.sample_logps], device=device)
                logp = token_logprobs(model, ids, attention, s.temperature)               # (n, T)
                with torch.no_grad():
                    ref = token_logprobs(ref_model, ids, attention, s.temperature) if ref_model is not None else None
                loss, info = grpo_loss(logp, old, advantages[idx].to(device), action_mask, s.clip_eps, ref, s.kl_coef)
                pg_loss = loss.item()
            cls_loss = classification_loss(model, tokenizer, [cls_prompts[k] for k in cls_part],
                                           [cls_actions[k] for k in cls_part], cls_labels[cls_part]) if len(cls_part) else None
            loss = loss + s.cls_coef * cls_loss if cls_loss is not None else loss
            if not torch.isfinite(loss):
                raise NonFiniteError(f"the GRPO loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            steps.append({"loss": loss.item(), "pg_loss": pg_loss, **info, "cls_loss": cls_loss.item() if cls_loss is not None else math.nan})
    mean = {k: float(np.nanmean([x[k] for x in steps])) if any(x[k] == x[k] for x in steps) else math.nan
            for k in ("loss", "pg_loss", "clip_frac", "kl", "cls_loss")}
    first = next((x["ratio_dev"] for x in steps if "ratio_dev" in x), math.nan)
    return {**mean, "update_moves": len(signal), "cls_pairs": len(cls_pick), "ratio_dev_first": first}

# ---- Diagnostics: the paper's claims, measured with the oracle's labels (read here, never trained on) ----
def flawed_step_stats(moves: list[Move], move_adv: torch.Tensor) -> dict:
    """Lemma 3.1 in the wild: the advantage outcome-based GRPO gives to good vs flawed moves."""
    flawed = torch.tensor([not m.good for m in moves])                  # (N,); a mean over no moves is NaN (null in the log)
    return {"flawed_frac": flawed.float().mean().item(), "adv_flawed_mean": move_adv[flawed].mean().item(),
            "adv_good_mean": move_adv[~flawed].mean().item(), "flawed_pos_adv_frac": (move_adv[flawed] > 0).float().mean().item()}

def squeezing_step(probs: torch.Tensor, action: int, advantage: float, lr: float) -> torch.Tensor:
    """One exact policy-gradient step on the logits z of a softmax policy pi = softmax(z), (K,) -> (K,):

        z' = z + lr * A * d log pi(action) / dz = z + lr * A * (onehot(action) - pi)

    With A < 0 every other logit rises by lr*|A|*pi_j: the most likely action gains most (the
    "squeezing effect", Ren & Sutherland 2024), even when it is itself a bad one.

    >>> squeezing_step(torch.tensor([0.3, 0.5, 0.2]), action=0, advantage=-1.0, lr=0.5)  # bad, bad, good
    tensor([0.1968, 0.5975, 0.2057])

    Pushing bad action 0 down raises the other bad action, 1, from 0.50 to 0.60 (it is the most
    likely); yet bad mass falls 0.80 -> 0.79 and good action 2 gains 0.20 -> 0.21.
    """
    z = torch.log(probs) + lr * advantage * (F.one_hot(torch.tensor(action), len(probs)).float() - probs)
    return torch.softmax(z, dim=0)

def action_logprobs(model, tokenizer, observations: list[str], actions: list[str]) -> torch.Tensor:
    """log pi(action | observation) of whole actions in the one action format, (N,)."""
    return sequence_logprobs(model, encode_prompts(tokenizer, observations),
                             [action_ids_for(tokenizer, a) for a in actions], tokenizer.pad_token_id)

@torch.no_grad()
def flawed_mass(model, tokenizer, probe: list[tuple[str, list[str]]]) -> dict:
    """Theorem 3.2 check on fixed probe states (observation, good actions):
    p_flawed = mean_s (1 - sum_{a good} pi(a|s))   -- all mass not on a good move, off-format text included
    p_flawed_max = mean_s max_{a flawed} pi(a|s)    -- the single most likely flawed move"""
    obs = [o for o, _ in probe for _ in toy_env.ACTIONS]
    p = action_logprobs(model, tokenizer, obs, list(toy_env.ACTIONS) * len(probe)).exp().view(len(probe), -1)  # (S, 4)
    good = torch.tensor([[a in g for a in toy_env.ACTIONS] for _, g in probe], device=p.device)            # (S, 4)
    return {"p_flawed": float((1 - (p * good).sum(1)).mean()),
            "p_flawed_max": float(p.masked_fill(good, 0).max(1).values.mean())}

def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present of the recall, (TPR + TNR) / 2: "always good" scores 0.5, whatever
    the share of good moves (plain accuracy would score that share).

    >>> balanced_accuracy(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 1, 0, 0]))
    0.75
    """
    return float(np.mean([(predicted[labels == c] == c).float().mean().item() for c in labels.unique()]))

@torch.no_grad()
def classification_bacc(model, tokenizer, probe: list[tuple[str, list[str]]]) -> float:
    """Balanced accuracy of the actor's verdict against the oracle on all 4 moves at probe states."""
    prompts = [p for p in encode_prompts(tokenizer, [o for o, _ in probe]) for _ in toy_env.ACTIONS]
    actions = [action_ids_for(tokenizer, a) for _ in probe for a in toy_env.ACTIONS]
    is_good = torch.tensor([int(a in good) for _, good in probe for a in toy_env.ACTIONS])
    return balanced_accuracy((verdict_logits(model, tokenizer, prompts, actions).argmax(dim=1) == 0).long().cpu(), is_good)

def coupling_probe(model, tokenizer, pairs: list[tuple[str, str, str]]) -> dict:
    """Gradient coupling between near-identical states over (s_good, s_flawed, a) pairs (means), where
    g_x = grad_theta log pi(a | s_x) (the whole action's log-prob, all parameters):

    coupling_cos   = cos(g_good, g_flawed)
    coupling_ratio = <g_good, g_flawed> / <g_good, g_good>. A small step theta += eta * g_good raises
                     log pi(a|s_good) by eta*|g_good|^2 and log pi(a|s_flawed) by eta*<g_good, g_flawed>
                     (first order): the ratio is the share of the intended gain that leaks to the flawed
                     twin (1 = all of it), free of step size and gradient scale. The median over pairs:
                     where the good move is near-certain, |g_good| ~ 0 and one pair's ratio explodes.
    hidden_cos     = cos(h_good, h_flawed), last-layer hidden states where the move is predicted; _move: at
                     the move's last token (the verdict query follows it); _centred: after subtracting the
                     probe's mean state, a component every grid shares
    Uses torch.autograd.grad (never .grad) and changes no weight: model, gradients and optimiser are as before."""
    was_training = model.training
    model.eval()  # no dropout noise in the probe
    params = [p for p in model.parameters() if p.requires_grad]
    out, states, moves = {"coupling_cos": [], "coupling_ratio": []}, [], []
    for good_layout, flawed_layout, action in pairs:
        obs = [toy_env.GridWorld.from_string(x).observation() for x in (good_layout, flawed_layout)]
        logps = action_logprobs(model, tokenizer, obs, [action, action])                    # (2,)
        g_good, g_flawed = (torch.cat([g.flatten() for g in torch.autograd.grad(logps[k], params, retain_graph=k == 0)])
                            for k in (0, 1))                                                # (num_params,) each
        out["coupling_cos"].append(F.cosine_similarity(g_good, g_flawed, dim=0).item())
        out["coupling_ratio"].append((g_good @ g_flawed).item() / (g_good @ g_good).item())
        with torch.no_grad():
            prompts = encode_prompts(tokenizer, obs)
            ids, attention, _ = build_batch(prompts, [action_ids_for(tokenizer, action)] * 2, tokenizer.pad_token_id,
                                            logps.device)                                    # (2, T) each
            hidden = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]  # (2, T, d)
        states.append(hidden[[0, 1], [len(p) - 1 for p in prompts]])                        # (2, d) where a is predicted
        moves.append(hidden[[0, 1], attention.sum(1) - 1])                                  # (2, d) a's last token
    model.train(was_training)
    states, moves = torch.stack(states), torch.stack(moves)                                 # (pairs, 2, d) each
    return {"coupling_cos": float(np.mean(out["coupling_cos"])), "coupling_ratio": float(np.median(out["coupling_ratio"])),
            **{key: F.cosine_similarity(h[:, 0], h[:, 1], dim=1).mean().item()
               for key, h in (("hidden_cos", states), ("hidden_cos_move", moves), ("hidden_cos_centred", states - states.mean(dim=(0, 1))))}}

# ---- Training loop: warm-up, then GRPO iterations (rollout -> advantages -> update -> log) ---------
def sft_warmup(model, tokenizer, layouts: list[str], s: Settings, rng: np.random.Generator) -> list[float]:
    """Supervised warm-up: maximise log pi(oracle move | random state), action tokens only."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.sft_lr)
    envs, losses = [toy_env.GridWorld.from_string(x) for x in layouts], []
    for _ in range(s.sft_steps):
        observations, targets = [], []
        for env in (envs[k] for k in rng.integers(len(envs), size=s.sft_batch)):
            pos = env.free_cells()[rng.integers(len(env.free_cells()))]          # a random state
            good = env.good_actions(pos)
            observations.append(env.observation(pos))
            targets.append(action_ids_for(tokenizer, good[rng.integers(len(good))]))  # a random good move
        ids, attention, action_mask = build_batch(encode_prompts(tokenizer, observations), targets, tokenizer.pad_token_id,
                                                  next(model.parameters()).device)  # (n, T) each
        nll = -(token_logprobs(model, ids, attention) * action_mask).sum() / action_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        nll.backward()
        optimizer.step()
        losses.append(nll.item())
    return losses

@torch.no_grad()
def evaluate(model, tokenizer, layouts: list[str], s: Settings, self_check: int = 0) -> float:
    """Greedy success rate, one episode per layout; restores the mode (train/eval) it found. With
    self_check = K, a move the actor's own verdict calls bad is resampled up to K times (seeded)."""
    was_training = model.training
    model.eval()
    judge = lambda prompts, actions: (verdict_logits(model, tokenizer, prompts, actions).argmax(1) == 0).tolist()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(s.seed)
    _, rewards, _ = rollout(model, tokenizer, layouts, 1, s, greedy=True, generator=generator, judge=judge, tries=self_check)
    model.train(was_training)
    return rewards.mean().item()

def task_sets(s: Settings) -> tuple[list[str], dict[str, list[str]]]:
    """The fixed train tasks; eval sets: the first `eval_tasks` of them (in-domain) and unseen held-out layouts."""
    pool = toy_env.sample_layouts("train", s.train_tasks, seed=s.data_seed)
    return pool, {"train": pool[: s.eval_tasks], "held_out": toy_env.sample_layouts("held_out", s.eval_tasks, seed=s.data_seed)}

def measure(model, tokenizer, eval_sets: dict, s: Settings, log, it: int) -> dict:
    """Greedy success on both evaluation sets, then the probes; logs one line."""
    t = time.time()
    row = {f"eval_{split}_success": evaluate(model, tokenizer, layouts, s) for split, layouts in eval_sets.items()}
    if s.self_check and it == s.iters:                                            # at the end: costly, and final
        row["eval_held_out_success_self_check"] = evaluate(model, tokenizer, eval_sets["held_out"], s, s.self_check)
    row["eval_s"] = time.time() - t
    start_states = {split: [(env.observation(), env.good_actions()) for env in map(toy_env.GridWorld.from_string, layouts[: s.probe_states])]
                    for split, layouts in eval_sets.items()}                      # (observation, good moves)
    row.update(flawed_mass(model, tokenizer, start_states["train"]),
               **coupling_probe(model, tokenizer, toy_env.coupled_pairs("train", s.probe_pairs, s.data_seed)),
               cls_bacc_train=classification_bacc(model, tokenizer, start_states["train"]),
               cls_bacc_held_out=classification_bacc(model, tokenizer, start_states["held_out"]))
    row["probe_s"] = time.time() - t - row["eval_s"]
    log(f"measure @ iter {it}: " + " | ".join(f"{k} {v:.4f}" for k, v in row.items() if not k.endswith("_s")))
    return row

def rollout_stats(moves: list[Move], rewards: torch.Tensor, move_adv: torch.Tensor) -> dict:
    """What one iteration's rollouts look like, for the log (oracle labels: diagnostics only)."""
    return {"success": rewards.mean().item(), "moves": len(moves), "valid_frac": np.mean([m.action is not None for m in moves]),
            "off_format_frac": np.mean([m.action is None and toy_env.parse_action(m.text) is not None for m in moves]),
            "good_frac": np.mean([m.good for m in moves]), "mixed_groups": (rewards.std(dim=1) > 0).float().mean().item(),
            "adv_abs_mean": move_adv.abs().mean().item(), **flawed_step_stats(moves, move_adv),
            "cls_label_noise": np.mean([(a > 0) != m.good for m, a in zip(moves, move_adv.tolist()) if a != 0] or [math.nan])}

def log_line(row: dict, s: Settings) -> str:
    """The fixed-format line printed for each iteration."""
    return (f"it {row['iter']:3d}/{s.iters} | succ {row['success']:.2f} | valid {row['valid_frac']:.2f} | good {row['good_frac']:.2f} | "
            f"mixed {row['mixed_groups']:.2f} | lr {row['lr']:.1e} | loss {row['loss']:+.4f} | clip {row['clip_frac']:.2f} | A flawed "
            f"{row['adv_flawed_mean']:+.2f} good {row['adv_good_mean']:+.2f} (flawed A>0 {row['flawed_pos_adv_frac']:.2f}) | "
            + (f"cls {row['cls_loss']:.3f} | " if s.cls_coef else "") + f"roll {row['rollout_s']:.2f}s upd {row['update_s']:.2f}s")

def warm_start(model, tokenizer, s: Settings, log=print) -> dict:
    """The supervised warm-up, done to `model` in place. Returns its weights and time, and the state of the
    numpy rng that RL goes on from: everything before RL, which --compare's arms of one seed share."""
    rng, t = np.random.default_rng(s.seed), time.time()         # tasks, warm-up states, minibatch order
    sft_losses = sft_warmup(model, tokenizer, task_sets(s)[0], s, rng)
    if sft_losses:
        log(f"warm-up: {s.sft_steps} steps, nll {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f} ({time.time() - t:.1f}s)")
    return {"policy": model.state_dict(), "rng": rng.bit_generator.state, "sft_s": time.time() - t}

def train(s: Settings, out_dir: str, log=print, start: dict | None = None):
    """Warm-up (or `start`, a warm_start of these settings), `s.iters` GRPO iterations -> metrics.jsonl; (model, tokenizer, summary)."""
    begin, device = time.time(), resolve_device(s.device)
    model, tokenizer = load_policy(s, device)
    # Dropout off for the whole run (as TRL does): the policy that samples, whose log-probs are
    # recorded, must be the very function the loss scores. Gradients flow in eval mode all the same.
    model.eval()
    pool, eval_sets = task_sets(s)
    log(f"policy: {s.model or 'tiny GPT-2'}, {sum(p.numel() for p in model.parameters()):,} parameters, on {device}; "
        f"{len(pool)} train layouts, eval on {s.eval_tasks} per split")
    start = start or warm_start(model, tokenizer, s, log)
    model.load_state_dict(start["policy"])                     # a copy onto itself unless `start` was given
    rng = np.random.default_rng()
    rng.bit_generator.state = start["rng"]                      # as the warm-up left it: same runs either way
    generator = torch.Generator(device=device).manual_seed(s.seed)  # rollout sampling
    ref_model = copy.deepcopy(model) if s.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr)
    measured, rows = {0: measure(model, tokenizer, eval_sets, s, log, 0)}, []
    with open(os.path.join(out_dir, "metrics.jsonl"), "w", buffering=1) as metrics_file:  # line-buffered: on disk at once
        for it in range(1, s.iters + 1):
            t0 = time.time()
            picked = rng.choice(len(pool), size=s.tasks_per_iter, replace=False)                      # (B,)
            moves, rewards, envs = rollout(model, tokenizer, [pool[k] for k in picked], s.group_size, s, generator=generator)
            t1 = time.time()
            advantages = grpo_advantages(rewards, s.scale_by_std).flatten()   # (B*G,) one per episode
            move_adv = advantages[[m.episode for m in moves]]                  # (N,) each move inherits it
            if s.step_credit_coef:                                             # GiGPO: + w * step-level credit
                returns = step_returns([m.episode for m in moves], rewards.flatten(), s.gamma)       # (N,)
                anchors = [(m.episode // s.group_size, tuple(m.prompt_ids)) for m in moves]          # (task, state)
                move_adv = move_adv + s.step_credit_coef * gigpo_step_advantages(anchors, returns, s.scale_by_std)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(it, s.lr, s.lr_warmup_iters, s.iters)
            stats = grpo_update(model, tokenizer, moves, move_adv, optimizer, s, rng, ref_model)
            row = {"iter": it, **rollout_stats(moves, rewards, move_adv), "lr": optimizer.param_groups[0]["lr"], **stats,
                   "rollout_s": round(t1 - t0, 3), "update_s": round(time.time() - t1, 3)}
            if it % s.eval_every == 0 or it == s.iters:
                measured[it] = measure(model, tokenizer, eval_sets, s, log, it)
                row.update(measured[it])
            rows.append(row)
            metrics_file.write(json.dumps({k: None if v != v else v for k, v in row.items()}) + "\n")  # NaN -> null
            log(log_line(row, s))
            if s.render_every and it % s.render_every == 0:
                log(f"-- a sampled episode at iter {it} --\n" + render_episode(moves, envs[0], 0))
    last = measured[max(measured)]
    timing = {"sft_s": start["sft_s"], **{k: sum(r.get(k, 0.0) for r in [measured[0], *rows]) for k in
                                  ("rollout_s", "update_s", "eval_s", "probe_s")}}
    summary = {"eval_train_success": last["eval_train_success"], "eval_held_out_success": last["eval_held_out_success"],
               "start": measured[0], "end": last, "no_signal_iters_frac": float(np.mean([r["mixed_groups"] == 0 for r in rows])) if rows else float("nan"),
               "decisions_per_second": sum(r["moves"] for r in rows) / max(timing["rollout_s"], 1e-9),
               **{k: round(v, 2) for k, v in timing.items()}, "wall_seconds": round(time.time() - begin, 2),
               "torch_threads": torch.get_num_threads(),   # over all iterations, under the advantage actually used:
               "over_run": {k: float(np.nanmean([r[k] for r in rows])) if rows else math.nan for k in ("adv_flawed_mean", "flawed_pos_adv_frac")}}
    return model, tokenizer, summary

def run(s: Settings, out_dir: str, log=print, start: dict | None = None) -> dict:
    """One training run: settings.json first, then metrics.jsonl as it goes, then policy/ and summary.json."""
    from transformers.utils import logging as hf_logging
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "settings.json"), "w") as f:
        json.dump(dataclasses.asdict(s), f, indent=1)
    model, tokenizer, summary = train(s, out_dir, log, start)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar
    model.save_pretrained(os.path.join(out_dir, "policy"))
    tokenizer.save_pretrained(os.path.join(out_dir, "policy"))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({**summary, "settings": dataclasses.asdict(s)}, f, indent=1)
    log(f"done in {summary['wall_seconds']:.0f}s: greedy success train {summary['eval_train_success']:.2f}, held-out "
        f"{summary['eval_held_out_success']:.2f}; {summary['no_signal_iters_frac']:.0%} of iterations had no mixed group; "
        f"{summary['decisions_per_second']:.0f} decisions/s in rollouts; outputs in {out_dir}/")
    return summary

# ---- Experiment and command line: compare arms over seeds, plot, main() ----------------------------
ARMS = {"grpo": ("advantage", False, False), "grpo+cls-advantage": ("advantage", True, False),   # (cls_labels, GCD?,
        "grpo+cls-oracle": ("oracle", True, False), "gigpo": ("advantage", False, True)}           #  step credit?)
COLUMNS = ("adv_flawed_mean", "flawed_pos_adv_frac", "cls_bacc_train", "cls_bacc_held_out", "hidden_cos", "hidden_cos_move",
           "hidden_cos_centred", "coupling_cos", "coupling_ratio", "p_flawed", "eval_train_success", "eval_held_out_success",
           "eval_held_out_success_self_check")   # credit, then the chain link by link, then the self-check

def paired_interval(diffs: list[float]) -> str:
    """mean [95 % t-interval] of per-seed paired differences (Student t, n - 1 degrees of freedom)."""
    d, t_975 = np.asarray(diffs), {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
    half = t_975.get(len(d) - 1, 1.96) * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"

def compare_job(job: tuple[Settings, str, str]) -> dict:
    """One (arm, seed) run of --compare, in a worker process with its share of the CPU threads, from the
    seed's warm start (made by the first of its arms to start). A finished run is read back, not repeated."""
    s, run_dir, warm_path = job
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // s.workers))
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return json.load(open(os.path.join(run_dir, "summary.json")))
    if not os.path.exists(warm_path):
        model, tokenizer = load_policy(s, resolve_device(s.device))
        torch.save(warm_start(model.eval(), tokenizer, s, log=lambda line: None), f"{warm_path}.{os.getpid()}")
        os.replace(f"{warm_path}.{os.getpid()}", warm_path)   # whole or absent, even if stopped or made twice at once
    return run(s, run_dir, lambda line: None, torch.load(warm_path))

def compare(s: Settings, out_dir: str) -> str:
    """Train every arm on every seed with the same budget, `s.workers` runs at a time, a seed's arms from one warm
    start; write compare.md: each arm's mean over seeds, and each other arm's paired difference to GRPO."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    coef, w, tries = s.cls_coef or 0.5, s.step_credit_coef or 1.0, s.self_check or 3
    keys, end = [(arm, seed) for arm in ARMS for seed in s.seeds], {}      # arm by arm: a seed's warm start is ready
    jobs = [(dataclasses.replace(s, seed=seed, cls_labels=ARMS[arm][0], cls_coef=coef * ARMS[arm][1], step_credit_coef=w * ARMS[arm][2],
                                 self_check=tries, compare=False, render_every=0), os.path.join(out_dir, f"{arm}-seed{seed}"),
             os.path.join(out_dir, f"warm-start-seed{seed}.pt")) for arm, seed in keys]   # the arms differ only after it
    os.makedirs(out_dir, exist_ok=True)
    with ProcessPoolExecutor(s.workers, mp_context=get_context("spawn")) as pool:   # spawn: no forked torch threads
        for (arm, seed), summary in zip(keys, pool.map(compare_job, jobs)):
            end[arm, seed] = {**summary["end"], **summary["over_run"]}
            print(f"{arm} seed {seed}: " + ", ".join(f"{k} {end[arm, seed][k]:.3f}" for k in COLUMNS), flush=True)
    lines = [f"| arm (+cls: --cls-coef {coef}; gigpo: --step-credit-coef {w}; self-check K = {tries}) | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {arm} | " + " | ".join(f"{np.mean([end[arm, x][k] for x in s.seeds]):.3f}" for k in COLUMNS) + " |" for arm in ARMS]
    lines += [f"| {arm} - grpo | " + " | ".join(paired_interval([end[arm, x][k] - end["grpo", x][k] for x in s.seeds])
                                               for k in COLUMNS) + " |" for arm in list(ARMS)[1:]]
    table = "\n".join(lines) + (f"\n\nSeeds {' '.join(map(str, s.seeds))}; means over seeds at the end of training; "
                                "differences paired by seed, mean [95 % t-interval].\n")
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(table)
    return table

def plot(out_dir: str) -> str:
    """compare.png: the chain over training (iteration 0: after the warm-up), mean over seeds per arm."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib, which is not a run-time dependency: pip install matplotlib") from None
    keys = ("cls_bacc_held_out", "hidden_cos_centred", "coupling_cos", "eval_held_out_success")
    fig, axes = plt.subplots(1, len(keys), figsize=(17, 3.8))
    runs = sorted(d for d in os.listdir(out_dir) if os.path.exists(os.path.join(out_dir, d, "summary.json")))  # finished
    for arm in sorted({d.rsplit("-seed", 1)[0] for d in runs}):
        curves = [[{"iter": 0, **json.load(open(os.path.join(out_dir, d, "summary.json")))["start"]}]
                  + [json.loads(line) for line in open(os.path.join(out_dir, d, "metrics.jsonl")) if "coupling_cos" in line]
                  for d in runs if d.rsplit("-seed", 1)[0] == arm]                # measured iterations only
        for ax, key in zip(axes, keys):
            ax.plot([r["iter"] for r in curves[0]], np.mean([[r[key] for r in c] for c in curves], axis=0),
                    marker="o", label=f"{arm} ({len(curves)} seeds)")
            ax.set_xlabel("GRPO iteration"), ax.set_title(key), ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8), fig.tight_layout(), fig.savefig(os.path.join(out_dir, "compare.png"), dpi=110)
    return os.path.join(out_dir, "compare.png")

def main(argv: list[str] | None = None) -> int:
    s = parse_settings(argv)
    print("settings: " + json.dumps(dataclasses.asdict(s)))
    out_dir = s.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + ("-compare" if s.compare else f"-seed{s.seed}"))
    try:
        if s.plot:
            print(f"wrote {plot(out_dir)}")
        elif s.compare:
            print(compare(s, out_dir))
        else:
            run(s, out_dir)
    except NonFiniteError as e:
        print(f"grpo_agentic.py: stopped: {e}. metrics.jsonl holds every finished iteration; "
              "no policy was saved. Try a smaller --lr.", file=sys.stderr)
        return 1
    except (OSError, ValueError, ImportError) as e:  # e.g. a --model that transformers cannot load
        print(f"grpo_agentic.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
