"""Agentic GRPO on a text gridworld, in one file -- a teaching reference for arXiv 2509.23870.

    pip install -r requirements.txt && python grpo_agentic.py      # ~80 s on 2 CPU cores
    python grpo_agentic.py --help                                  # every setting, with its meaning
    python grpo_agentic.py --eval-only --model runs/<run>/policy   # greedy success of a saved policy
    python grpo_agentic.py --model path/to/any/causal-lm           # any `transformers` causal LM

A tiny GPT-2 (built from a config: nothing is downloaded) is warm-started on oracle moves, then
trained with GRPO: for B layouts it plays G episodes each; every turn the policy reads the grid as
text and *writes* its move; the reward is 1 if the goal is reached within the budget, else 0. The
advantage of an episode is its reward standardised within its group of G, and every move of the
episode is pushed up or down by it (outcome-based credit, as in the paper).

Shapes:  B tasks (layouts) per iteration, G episodes per task (the group), N moves in a batch,
         P prompt tokens, K generated action tokens, T = prompt + action tokens, V vocabulary.

Where this deviates from DeepSeekMath GRPO / the paper, and why:
 1. Each move is its own sample: the prompt is the *current* grid only (no history). The gridworld
    is Markov, and short prompts keep a CPU run to minutes. Prompt tokens are never trained.
 2. The loss averages over all action tokens of a minibatch (token-level, as in DAPO), not per
    sequence; moves from zero-advantage groups are left out of the update (no KL: they carry no
    gradient), which also makes late iterations cheap.
 3. A is divided by the group's *population* std (ddof=0); KL to the starting policy is off by
    default (--kl-coef), as in DAPO / Dr. GRPO practice. Two epochs over each iteration's rollouts,
    so the PPO clip is active; the RL learning rate warms up linearly over the first iterations.
 4. RL trains on a fixed set of 64 train layouts (the "seen tasks"); held-out layouts are unseen
    and denser in walls (the analogue of the paper's out-of-domain tasks).
 5. GCD (the paper's classification): after the move, the query " verdict:" and the actor's own LM
    head scores " good" vs " bad"; labels are the sign of the move's advantage (or the oracle, as an
    ablation). The paper's exact prompt, weight and label source were not available to us.
 6. The model is tiny and the environment a toy; the paper uses LLM agents on ALFWorld/ScienceWorld.
"""
from __future__ import annotations

import argparse
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
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import toy_env

# ------------------------------------------------------------------------------------------------
# Settings: the one source of truth. The command line and --help are derived from this dataclass.
# ------------------------------------------------------------------------------------------------


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    seed: int = arg(0, "random seed (layouts, init, sampling); same seed on CPU = same metrics.jsonl")
    iters: int = arg(250, "GRPO iterations (each: rollouts of B x G episodes, then one update)")
    train_tasks: int = arg(64, "size of the fixed set of train-split layouts that RL (and the warm-up) sees")
    data_seed: int = arg(0, "seed of the train and held-out layout sets (fixed across training seeds)")
    tasks_per_iter: int = arg(16, "B: distinct train layouts per iteration")
    group_size: int = arg(8, "G: episodes per layout; the advantage baseline is this group's mean")
    lr: float = arg(5e-4, "AdamW learning rate of the GRPO phase")
    lr_warmup_iters: int = arg(10, "iterations over which the GRPO learning rate rises linearly to --lr (then decays to 0)")
    clip_eps: float = arg(0.2, "PPO clip range epsilon on the token probability ratio")
    kl_coef: float = arg(0.0, "weight of the KL penalty to the policy at the start of RL (0 = off)")
    epochs: int = arg(2, "passes over each iteration's rollouts (PPO epochs); the clip matters from the 2nd step on")
    minibatch_moves: int = arg(256, "moves per gradient step inside one iteration's update")
    temperature: float = arg(1.0, "sampling temperature during rollouts (1.0 = sample the policy itself)")
    max_action_tokens: int = arg(4, "generation budget for one action, end-of-text token included")
    sft_steps: int = arg(60, "supervised warm-up steps on oracle moves before RL (0 = none)")
    sft_lr: float = arg(1e-3, "AdamW learning rate of the warm-up")
    sft_batch: int = arg(128, "(state, oracle move) pairs per warm-up step")
    eval_every: int = arg(25, "greedy evaluation every this many iterations (and at the end)")
    eval_tasks: int = arg(64, "layouts per split in the fixed greedy evaluation sets")
    render_every: int = arg(50, "print one sampled episode as text every this many iterations (0 = never)")
    cls_coef: float = arg(0.0, "weight of the actor's own good/bad classification loss (GCD); 0 = plain GRPO")
    cls_labels: str = arg("advantage", "classification labels: 'advantage' (sign of the move's GRPO advantage) or 'oracle'")
    probe_pairs: int = arg(16, "coupled (good, flawed) state pairs in the gradient-coupling probe")
    probe_step: float = arg(1e-5, "SGD step size of the probe's one-step coupling measurement")
    skip_probes: bool = arg(False, "skip the diagnostics probes (p_flawed, coupling): to measure what they cost")
    model: str = arg("", "path or name of a causal LM for AutoModelForCausalLM ('' = tiny GPT-2 from config)")
    tiny_layers: int = arg(3, "layers of the built-in tiny GPT-2")
    tiny_dim: int = arg(96, "width of the built-in tiny GPT-2")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    out_dir: str = arg("", "where metrics.jsonl, summary.json and policy/ go ('' = runs/<time>-seed<seed>)")
    overwrite: bool = arg(False, "allow writing into an --out-dir that already holds a run")
    eval_only: bool = arg(False, "only evaluate --model greedily on both splits and print a few episodes")
    compare: bool = arg(False, "train GRPO, GRPO+cls (advantage labels), GRPO+cls (oracle labels) for each of --seeds")
    seeds: str = arg("0 1 2", "seeds for --compare, separated by spaces")
    plot: bool = arg(False, "plot held-out success and coupling_cos of a --compare --out-dir (needs matplotlib)")


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Build the CLI from Settings; any invalid value stops here with one line and exit code 2."""

    class OneLineParser(argparse.ArgumentParser):
        def error(self, message):
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    parser = OneLineParser(prog="grpo_agentic.py", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument(flag, type=kind, default=f.default, help=f"{f.metadata['help']} (default: {f.default!r})")
    s = Settings(**vars(parser.parse_args(argv)))
    problem = invalid_settings(s)
    if problem:
        parser.error(problem)
    return s


def invalid_settings(s: Settings) -> str | None:
    """A message for the first invalid setting, or None."""
    positive = ["iters", "probe_pairs", "epochs", "train_tasks", "tasks_per_iter", "minibatch_moves", "max_action_tokens", "sft_batch",
                "eval_every", "eval_tasks", "tiny_layers", "tiny_dim"]
    for name in positive:
        if getattr(s, name) < 1 and not (name == "iters" and s.eval_only):
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}"
    for name in ["sft_steps", "lr_warmup_iters", "render_every", "kl_coef", "clip_eps"]:
        if getattr(s, name) < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}"
    for name in ["lr", "sft_lr", "temperature", "probe_step"]:
        if not (getattr(s, name) > 0 and math.isfinite(getattr(s, name))):
            return f"--{name.replace('_', '-')} must be a positive number, got {getattr(s, name)}"
    if s.cls_labels not in ("advantage", "oracle"):
        return f"--cls-labels must be 'advantage' or 'oracle', got {s.cls_labels!r}"
    if not all(x.lstrip("-").isdigit() for x in s.seeds.split()) or not s.seeds.split():
        return f"--seeds must be integers separated by spaces, got {s.seeds!r}"
    if s.plot and not s.out_dir:
        return "--plot needs --out-dir (the directory of a --compare run)"
    if s.group_size < 2:
        return f"--group-size must be >= 2 (a group of one has no baseline), got {s.group_size}"
    if s.tiny_dim % 4:
        return f"--tiny-dim must be a multiple of 4 (the number of heads), got {s.tiny_dim}"
    try:
        resolve_device(s.device)
    except ValueError as e:
        return str(e)
    looks_like_path = s.model.startswith((".", "/", "~")) or s.model.count("/") > 1  # not a hub id "org/name"
    if s.model and looks_like_path and not os.path.exists(os.path.expanduser(s.model)):
        return f"--model {s.model}: no such file or directory"
    if s.eval_only and not s.model:
        return "--eval-only needs --model (a saved policy directory)"
    out = s.out_dir or ""
    done = any(os.path.exists(os.path.join(out, f)) for f in ("metrics.jsonl", "compare.md"))
    if out and not (s.eval_only or s.plot) and done and not s.overwrite:
        return f"--out-dir {out} already holds a run; choose another directory or pass --overwrite"
    return None


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an unavailable or unknown device is a ValueError."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next(kind for kind in ("cuda", "mps", "cpu") if available[kind]))
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in available:
        raise ValueError(f"--device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if not available[device.type]:
        raise ValueError(f"--device {name}: {device.type.upper()} is not available on this machine")
    return device


class NonFiniteError(RuntimeError):
    """A loss or the logits became NaN/inf: stop rather than train on garbage."""


# ------------------------------------------------------------------------------------------------
# Model & tokenizer
# ------------------------------------------------------------------------------------------------


def build_word_tokenizer():
    """A word-level tokenizer over the environment's vocabulary: one token per cell, newline, move."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", *toy_env.VOCABULARY, VERDICT_QUERY.strip(), *VERDICTS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),  # spaces separate words...
        pre_tokenizers.Split("\n", behavior="isolated"),                 # ...newlines are words
    ])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def build_tiny_model(tokenizer, s: Settings):
    """A small GPT-2 from a config (random init). 3 layers x 96 wide is ~0.34 M parameters."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=s.tiny_dim, n_layer=s.tiny_layers,
                        n_head=4, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        initializer_range=0.1,  # GPT-2's 0.02 leaves a tiny model on a long plateau here
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config)


def load_policy(s: Settings, device: torch.device):
    """(model, tokenizer): the tiny built-in model, or any causal LM named by --model."""
    torch.manual_seed(s.seed)
    if not s.model:
        tokenizer = build_word_tokenizer()
        model = build_tiny_model(tokenizer, s)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(s.model)
        model = AutoModelForCausalLM.from_pretrained(s.model, dtype=torch.float32)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"--model {s.model}: its tokenizer has no end-of-text token to end an action")
        if tokenizer.pad_token_id is None:  # harmless: padding is always given by the attention mask
            tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


# ------------------------------------------------------------------------------------------------
# Rollout: all live episodes step together, one batched forward per generated token.
# ------------------------------------------------------------------------------------------------


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
    """Sample one action per prompt. Returns (token ids per action, their log-probs, decoded texts).

    Our own loop rather than `model.generate`, so the tokens come from exactly softmax(logits / T):
    no top-k/top-p/repetition processors from a model's generation_config sneak in, and the
    log-probs the loss later recomputes belong to the distribution we really sampled from.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    ids, mask, positions = left_pad(prompts, tokenizer.pad_token_id, device)  # each (N, P)
    n = len(prompts)
    actions, logps = [[] for _ in range(n)], [[] for _ in range(n)]
    finished = torch.zeros(n, dtype=torch.bool, device=device)        # (N,)
    past = None
    for _ in range(max_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True)
        logits = out.logits[:, -1, :].float() / temperature             # (N, V)
        if not torch.isfinite(logits).all():
            raise NonFiniteError("the policy's logits are not finite")
        logprobs = torch.log_softmax(logits, dim=-1)                    # (N, V)
        if greedy:
            token = logprobs.argmax(dim=-1)                             # (N,)
        else:
            token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)  # (N,)
        token_logp = logprobs.gather(1, token[:, None]).squeeze(1)      # (N,)
        tokens, token_logps = token.tolist(), token_logp.tolist()
        for i in (~finished).nonzero().flatten().tolist():
            actions[i].append(tokens[i])
            logps[i].append(token_logps[i])
        finished |= token == eos
        if finished.all():
            break
        past = out.past_key_values
        ids, positions = token[:, None], positions[:, -1:] + 1          # (N, 1)
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
    texts = tokenizer.batch_decode(actions, skip_special_tokens=True)
    return actions, logps, texts


@dataclass
class Move:
    """One decision: what the policy read, what it wrote (token ids, as sampled), what it meant."""
    episode: int            # index into the rollout's B*G episodes (group = episode // G)
    prompt_ids: list[int]
    action_ids: list[int]
    sample_logps: list[float]
    text: str
    valid: bool
    good: bool              # oracle label, for diagnostics only: never used by the RL update


def encode_prompts(tokenizer, observations: list[str]) -> list[list[int]]:
    return tokenizer(observations, add_special_tokens=True)["input_ids"]


def rollout(model, tokenizer, layouts: list[str], group_size: int, s: Settings, greedy: bool = False,
            generator: torch.Generator | None = None):
    """Play `group_size` episodes on each layout, all at once. Returns (moves, rewards (B, G), envs)."""
    envs = [toy_env.GridWorld.from_string(lay) for lay in layouts for _ in range(group_size)]
    observations = [env.reset() for env in envs]
    moves: list[Move] = []
    live = list(range(len(envs)))
    while live:
        prompt_ids = encode_prompts(tokenizer, [observations[i] for i in live])
        action_ids, logps, texts = generate_actions(model, tokenizer, prompt_ids, s.max_action_tokens,
                                                    s.temperature, greedy, generator)
        for i, p, a, lp, text in zip(live, prompt_ids, action_ids, logps, texts):
            observations[i], _, _, info = envs[i].step(text)
            moves.append(Move(i, p, a, lp, text, info["valid"], info["good"]))
        live = [i for i in live if not envs[i].done]
    rewards = torch.tensor([float(env.pos == env.goal) for env in envs]).view(len(layouts), group_size)  # (B, G)
    return moves, rewards, envs


def render_episode(moves: list[Move], env: toy_env.GridWorld, episode: int) -> str:
    """One episode as text: the start grid, then each move marked good (+) or flawed (-)."""
    steps = [f"{m.text!r}{'+' if m.good else '-'}" for m in moves if m.episode == episode]
    outcome = "reached the goal" if env.pos == env.goal else "failed"
    return f"{env.to_string()}\n  moves: {' '.join(steps)}  -> {outcome} in {len(steps)} steps"


# ------------------------------------------------------------------------------------------------
# CORE: GRPO advantages and loss
# ------------------------------------------------------------------------------------------------


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


def build_batch(moves: list[Move], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+action sequences: ids, attention mask and action mask, each (N, T).

    The action mask is 1 exactly on generated tokens (the sampled ids, never re-tokenised text);
    prompt tokens and padding are 0, so they are never trained. Padding is known from the
    attention mask, never guessed from token ids (pad may equal eos in real tokenizers).
    """
    width = max(len(m.prompt_ids) + len(m.action_ids) for m in moves)
    ids = torch.full((len(moves), width), pad_id, dtype=torch.long)       # (N, T)
    attention = torch.zeros(len(moves), width, dtype=torch.long)         # (N, T)
    action = torch.zeros(len(moves), width, dtype=torch.float)           # (N, T)
    for i, m in enumerate(moves):
        p, a = len(m.prompt_ids), len(m.action_ids)
        ids[i, : p + a] = torch.tensor(m.prompt_ids + m.action_ids)
        attention[i, : p + a] = 1
        action[i, p: p + a] = 1.0
    return ids.to(device), attention.to(device), action.to(device)


def token_logprobs(model, ids: torch.Tensor, attention: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for every position, (N, T); position 0 (nothing to condition on) is 0.

    pi = softmax(logits / temperature): the loss must score the distribution the rollout sampled from.
    """
    logits = model(input_ids=ids, attention_mask=attention).logits.float() / temperature  # (N, T, V)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)                        # (N, T-1, V) predicts t=1..T-1
    picked = logp.gather(2, ids[:, 1:, None]).squeeze(2)                    # (N, T-1)
    return F.pad(picked, (1, 0))                                            # (N, T)


def sequence_logprobs(model, moves: list[Move], pad_id: int, temperature: float = 1.0) -> torch.Tensor:
    """log pi(action_ids | prompt_ids) of each move: the sum over its action tokens, (N,)."""
    ids, attention, mask = build_batch(moves, pad_id, next(model.parameters()).device)     # (N, T) each
    return (token_logprobs(model, ids, attention, temperature) * mask).sum(dim=1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, action_mask: torch.Tensor,
              clip_eps: float, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0):
    """PPO-clipped surrogate over action tokens, token-level average. All tensors (N, T) but advantages (N,).

        ratio_t = exp(logp_t - old_logp_t)
        L = -(1 / num_action_tokens) * sum_t mask_t * min(ratio_t * A, clip(ratio_t, 1-eps, 1+eps) * A)
            + kl_coef * (1 / num_action_tokens) * sum_t mask_t * (exp(d_t) - d_t - 1),  d_t = ref_logp_t - logp_t

    The KL term is the k3 estimator of KL(pi || pi_ref) (Schulman, 2020). Normaliser: every action
    token of the minibatch weighs the same, however the tokens split into moves and episodes.
    """
    num_action_tokens = action_mask.sum().clamp(min=1.0)
    ratio = torch.exp(logp - old_logp)                                          # (N, T)
    adv = advantages[:, None]                                                   # (N, 1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (N, T)
    loss = -(surrogate * action_mask).sum() / num_action_tokens
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp - logp
        kl = ((torch.exp(d) - d - 1) * action_mask).sum() / num_action_tokens
        loss = loss + kl_coef * kl
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, {"clip_frac": float((clipped * action_mask).sum() / num_action_tokens), "kl": float(kl)}


# ------------------------------------------------------------------------------------------------
# CORE: the actor classifies its own moves (the paper's GCD, section 4 of PAPER.md)
# ------------------------------------------------------------------------------------------------
VERDICT_QUERY = " verdict:"   # appended after the action; the LM head then scores " good" vs " bad"
VERDICTS = ("good", "bad")


def classification_labels(moves: list[Move], advantages: torch.Tensor, source: str) -> torch.Tensor:
    """Per-move label, (N,): 1 = good, 0 = bad, -1 = no label.

    'advantage': the sign of the move's GRPO advantage -- no oracle needed; A = 0 carries no label.
    'oracle':    the environment's oracle label (an upper-bound ablation only a toy allows).
    """
    if source == "oracle":
        return torch.tensor([int(m.good) for m in moves])
    return torch.where(advantages > 0, 1, torch.where(advantages < 0, 0, -1))


def verdict_logits(model, tokenizer, moves: list[Move]) -> torch.Tensor:
    """(N, 2) scores [log p(" good" | s, a, query), log p(" bad" | s, a, query)] from the actor's own LM head.

    Each verdict may span several tokens: its score is the sum of their log-probs. No new parameters.
    """
    query = tokenizer(VERDICT_QUERY, add_special_tokens=False)["input_ids"]
    scores = []
    for word in VERDICTS:
        verdict = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        seqs = [Move(0, m.prompt_ids + m.action_ids + query, verdict, [], "", True, True) for m in moves]
        scores.append(sequence_logprobs(model, seqs, tokenizer.pad_token_id))      # (N,)
    return torch.stack(scores, dim=1)                                                # (N, 2)


def classification_loss(model, tokenizer, moves: list[Move], labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 2-way verdict, mean over labelled moves: -log softmax(logits)[label]."""
    keep = (labels >= 0).nonzero().flatten().tolist()
    if not keep:
        return torch.zeros((), device=next(model.parameters()).device)
    logits = verdict_logits(model, tokenizer, [moves[i] for i in keep])             # (n, 2)
    target = 1 - labels[keep].to(logits.device)                                     # index 0 = "good"
    return F.cross_entropy(logits, target)


# ------------------------------------------------------------------------------------------------
# Diagnostics: the paper's three claims, measured (oracle labels are used here, never in the update)
# ------------------------------------------------------------------------------------------------


def flawed_step_stats(moves: list[Move], move_adv: torch.Tensor) -> dict:
    """Lemma 3.1 in the wild: the advantage outcome-based GRPO gives to good vs flawed moves."""
    flawed = torch.tensor([not m.good for m in moves])                  # (N,)
    nan = float("nan")
    return {"flawed_frac": float(flawed.float().mean()),
            "adv_flawed_mean": float(move_adv[flawed].mean()) if flawed.any() else nan,
            "adv_good_mean": float(move_adv[~flawed].mean()) if (~flawed).any() else nan,
            "flawed_pos_adv_frac": float((move_adv[flawed] > 0).float().mean()) if flawed.any() else nan}


def squeezing_step(probs: torch.Tensor, action: int, advantage: float, lr: float) -> torch.Tensor:
    """One exact policy-gradient step on the logits z of a softmax policy pi = softmax(z), (K,) -> (K,):

        z' = z + lr * A * d log pi(action) / dz = z + lr * A * (onehot(action) - pi)

    With A < 0 every other logit rises by lr*|A|*pi_j: the most likely action gains most (the
    "squeezing effect", Ren & Sutherland 2024), even when it is itself a bad one.

    >>> squeezing_step(torch.tensor([0.3, 0.5, 0.2]), action=0, advantage=-1.0, lr=0.5)  # bad, bad, good
    tensor([0.1968, 0.5975, 0.2057])

    Bad action 1 rises 0.50 -> 0.60, yet bad mass falls 0.80 -> 0.79 and the good action gains.
    """
    z = torch.log(probs) + lr * advantage * (F.one_hot(torch.tensor(action), len(probs)).float() - probs)
    return torch.softmax(z, dim=0)


def action_logprobs(model, tokenizer, observations: list[str], actions: list[str], temperature: float = 1.0):
    """log pi(action | observation) of whole actions (all their tokens and the end-of-text), (N,)."""
    prompts = encode_prompts(tokenizer, observations)
    moves = [Move(0, p, action_ids_for(tokenizer, a), [], a, True, True) for p, a in zip(prompts, actions)]
    return sequence_logprobs(model, moves, tokenizer.pad_token_id, temperature)


@torch.no_grad()
def flawed_mass(model, tokenizer, probe: list[tuple[str, list[str]]]) -> dict:
    """Theorem 3.2 check on fixed probe states (observation, good actions):
    p_flawed = mean_s (1 - sum_{a good} pi(a|s))   -- all mass not on a good move, invalid text included
    p_flawed_max = mean_s max_{a flawed} pi(a|s)    -- the single most likely flawed move"""
    obs = [o for o, _ in probe for _ in toy_env.ACTIONS]
    p = action_logprobs(model, tokenizer, obs, list(toy_env.ACTIONS) * len(probe)).exp().view(len(probe), -1)  # (S, 4)
    good = torch.tensor([[a in g for a in toy_env.ACTIONS] for _, g in probe], device=p.device)            # (S, 4)
    return {"p_flawed": float((1 - (p * good).sum(1)).mean()),
            "p_flawed_max": float(p.masked_fill(good, 0).max(1).values.mean())}


@torch.no_grad()
def classification_accuracy(model, tokenizer, probe: list[tuple[str, list[str]]]) -> float:
    """cls_acc: share of (state, action) on probe states whose verdict matches the oracle, all 4 actions."""
    prompts = encode_prompts(tokenizer, [o for o, _ in probe])
    moves = [Move(0, p, action_ids_for(tokenizer, a), [], a, True, a in good)
             for p, (_, good) in zip(prompts, probe) for a in toy_env.ACTIONS]
    predicted_good = verdict_logits(model, tokenizer, moves).argmax(dim=1) == 0
    return float((predicted_good.cpu() == torch.tensor([m.good for m in moves])).float().mean())


def coupling_probe(model, tokenizer, pairs: list[tuple[str, str, str]], step_size: float) -> dict:
    """Gradient coupling between near-identical states, mean over (s_good, s_flawed, a) pairs:

    coupling_cos  = cos(g_good, g_flawed),  g_x = grad_theta log pi(a | s_x)  (whole action, all params)
    coupling_step = log pi'(a|s_flawed) - log pi(a|s_flawed) after theta' = theta + step_size * g_good
    coupling_pred = step_size * <g_good, g_flawed>   (the first-order prediction of coupling_step)
    hidden_cos    = cos(h_good, h_flawed), last-layer hidden state where the action is predicted

    Uses torch.autograd.grad (never .grad) and restores every weight, so the model, its gradients and
    the optimiser state are exactly as before.
    """
    was_training = model.training
    model.eval()  # no dropout noise in the probe
    params = [p for p in model.parameters() if p.requires_grad]
    out = {"coupling_cos": [], "coupling_step": [], "coupling_pred": [], "hidden_cos": []}
    for good_layout, flawed_layout, action in pairs:
        obs = [toy_env.GridWorld.from_string(x).observation() for x in (good_layout, flawed_layout)]
        grads, logps = [], []
        for o in obs:
            logp = action_logprobs(model, tokenizer, [o], [action])[0]
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(logp, params)]))
            logps.append(float(logp))
        (g_good, g_flawed), before = grads, logps[1]
        out["coupling_cos"].append(float(F.cosine_similarity(g_good, g_flawed, dim=0)))
        out["coupling_pred"].append(step_size * float(g_good @ g_flawed))
        with torch.no_grad():
            theta = parameters_to_vector(params)                                     # a copy, (num_params,)
            vector_to_parameters(theta + step_size * g_good, params)                 # one SGD step up on s_good
            after = float(action_logprobs(model, tokenizer, [obs[1]], [action])[0])
            vector_to_parameters(theta, params)                                      # exactly as before
            ids, mask, positions = left_pad(encode_prompts(tokenizer, obs), tokenizer.pad_token_id, g_good.device)
            hidden = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           output_hidden_states=True).hidden_states[-1][:, -1]          # (2, d)
        out["coupling_step"].append(after - before)
        out["hidden_cos"].append(float(F.cosine_similarity(hidden[0], hidden[1], dim=0)))
    model.train(was_training)
    return {k: float(np.mean(v)) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# Training: warm-up, GRPO iterations, evaluation
# ------------------------------------------------------------------------------------------------


def action_ids_for(tokenizer, action: str) -> list[int]:
    """Target ids of an action as the policy should write it: ' up' + end-of-text."""
    return tokenizer(" " + action, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def sft_warmup(model, tokenizer, layouts: list[str], s: Settings, rng: np.random.Generator) -> list[float]:
    """Supervised warm-up: maximise log pi(oracle move | random state), action tokens only."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.sft_lr)
    device = next(model.parameters()).device
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    losses = []
    for _ in range(s.sft_steps):
        batch = []
        for k in rng.integers(len(layouts), size=s.sft_batch):
            env = envs[k]
            cells = env.free_cells()
            pos = cells[rng.integers(len(cells))]
            good = env.good_actions(pos)
            prompt = encode_prompts(tokenizer, [env.observation(pos)])[0]
            batch.append(Move(0, prompt, action_ids_for(tokenizer, good[rng.integers(len(good))]), [], "", True, True))
        ids, attention, action_mask = build_batch(batch, tokenizer.pad_token_id, device)
        nll = -(token_logprobs(model, ids, attention) * action_mask).sum() / action_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        nll.backward()
        optimizer.step()
        losses.append(nll.item())
    return losses


@torch.no_grad()
def evaluate(model, tokenizer, layouts: list[str], s: Settings) -> dict:
    """Greedy success and valid-move rate, one episode per layout."""
    model.eval()
    moves, rewards, envs = rollout(model, tokenizer, layouts, 1, s, greedy=True)
    model.train()
    return {"success": float(rewards.mean()), "valid_frac": float(np.mean([m.valid for m in moves])),
            "moves": moves, "envs": envs}


def grpo_update(model, tokenizer, moves: list[Move], advantages: torch.Tensor, optimizer, s: Settings, ref_model=None):
    """`s.epochs` passes of clipped-surrogate steps over the moves (advantage per move, (N,))."""
    device = next(model.parameters()).device
    labels = classification_labels(moves, advantages, s.cls_labels)                          # (N,)
    # A = 0 => no policy gradient: such moves stay only for the KL term. Both label sources thus
    # classify the same moves, and the oracle arm costs no more than the advantage arm.
    keep = [i for i in range(len(moves)) if advantages[i] != 0 or s.kl_coef > 0]
    stats = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "cls_loss": float("nan"), "update_moves": len(keep)}
    minibatches = [keep[i: i + s.minibatch_moves] for i in range(0, len(keep), s.minibatch_moves)]
    batches = []
    for idx in minibatches:  # old log-probs: the policy that sampled, before any step of this epoch
        ids, attention, action_mask = build_batch([moves[i] for i in idx], tokenizer.pad_token_id, device)
        with torch.no_grad():
            old = token_logprobs(model, ids, attention, s.temperature)
            ref = token_logprobs(ref_model, ids, attention, s.temperature) if ref_model is not None else None
        batches.append((idx, ids, attention, action_mask, old, ref, advantages[idx].to(device)))
    cls_losses = []
    for idx, ids, attention, action_mask, old, ref, adv in batches * s.epochs:
        logp = token_logprobs(model, ids, attention, s.temperature)
        loss, info = grpo_loss(logp, old, adv, action_mask, s.clip_eps, ref, s.kl_coef)
        if s.cls_coef > 0:
            cls_loss = classification_loss(model, tokenizer, [moves[i] for i in idx], labels[idx])
            loss = loss + s.cls_coef * cls_loss
            cls_losses.append(cls_loss.item())
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the GRPO loss is {float(loss)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        for k in ("clip_frac", "kl"):
            stats[k] += info[k] / (len(batches) * s.epochs)
        stats["loss"] += loss.item() / (len(batches) * s.epochs)
    if cls_losses:
        stats["cls_loss"] = float(np.mean(cls_losses))
    return stats


def task_sets(s: Settings) -> tuple[list[str], dict[str, list[str]]]:
    """The fixed training tasks, and the evaluation sets: the first `eval_tasks` of the training
    tasks (seen in training, as in the paper's in-domain split) and unseen held-out layouts."""
    pool = toy_env.sample_layouts("train", s.train_tasks, seed=s.data_seed)
    return pool, {"train": pool[: s.eval_tasks], "held_out": toy_env.sample_layouts("held_out", s.eval_tasks, seed=s.data_seed)}


def train(s: Settings, out_dir: str, log=print) -> dict:
    """Warm-up, then `s.iters` GRPO iterations; writes metrics.jsonl and returns the summary."""
    from tqdm.auto import tqdm

    start = time.time()
    device = resolve_device(s.device)
    model, tokenizer = load_policy(s, device)
    rng = np.random.default_rng(s.seed)
    generator = torch.Generator(device=device).manual_seed(s.seed)
    pool, eval_sets = task_sets(s)
    log(f"policy: {'tiny GPT-2' if not s.model else s.model}, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, on {device}; {len(pool)} train layouts, eval on {s.eval_tasks} per split")

    t0 = time.time()
    sft_losses = sft_warmup(model, tokenizer, pool, s, rng) if s.sft_steps else []
    sft_seconds = time.time() - t0
    if sft_losses:
        log(f"warm-up: {s.sft_steps} steps, nll {sft_losses[0]:.3f} -> {sft_losses[-1]:.3f} ({sft_seconds:.1f}s)")
    ref_model = copy.deepcopy(model).eval() if s.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr)
    timing = {"sft_s": sft_seconds, "rollout_s": 0.0, "update_s": 0.0, "eval_s": 0.0}
    evals, decisions = {}, 0

    def run_eval(it):
        t = time.time()
        for split, layouts in eval_sets.items():
            evals[split] = evaluate(model, tokenizer, layouts, s)
        timing["eval_s"] += time.time() - t
        log(f"eval @ iter {it}: greedy success train {evals['train']['success']:.2f} | "
            f"held-out {evals['held_out']['success']:.2f}")

    def start_states(layouts):  # (observation, good moves) at each layout's start
        return [(env.observation(), env.good_actions()) for env in map(toy_env.GridWorld.from_string, layouts)]

    probe_states, held_out_probe = start_states(pool), start_states(eval_sets["held_out"])
    pairs = toy_env.coupled_pairs("train", s.probe_pairs, seed=s.data_seed)

    def probes():
        return {**flawed_mass(model, tokenizer, probe_states), **coupling_probe(model, tokenizer, pairs, s.probe_step),
                "cls_acc": classification_accuracy(model, tokenizer, held_out_probe)}

    t = time.time()  # the probes run with each evaluation: they cost more than an iteration
    coupling = {0: {} if s.skip_probes else probes()}
    timing["probe_s"] = time.time() - t
    log(f"probe @ iter 0: " + " | ".join(f"{k} {v:+.4f}" for k, v in coupling[0].items()))
    run_eval(0)
    metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "w")  # one line per iteration, flushed
    bar = tqdm(range(1, s.iters + 1), desc="GRPO", unit="it", dynamic_ncols=True, disable=None)
    for it in bar:
        batch_layouts = [pool[k] for k in rng.integers(len(pool), size=s.tasks_per_iter)]
        t = time.time()
        moves, rewards, envs = rollout(model, tokenizer, batch_layouts, s.group_size, s, generator=generator)
        roll_s = time.time() - t
        advantages = grpo_advantages(rewards).flatten()                  # (B*G,) one per episode
        move_adv = advantages[[m.episode for m in moves]]                 # (N,) each move inherits it
        t = time.time()
        # Linear warm-up of the RL learning rate (Adam's first steps have size ~lr in every coordinate
        # whatever the gradient's size: a noisy policy gradient would undo the warm-up), then linear
        # decay to 0 so that the final policy settles instead of oscillating around the optimum.
        for group in optimizer.param_groups:
            group["lr"] = s.lr * min(1.0, it / max(1, s.lr_warmup_iters)) * (s.iters - it + 1) / s.iters
        stats = grpo_update(model, tokenizer, moves, move_adv, optimizer, s, ref_model)
        upd_s = time.time() - t
        timing["rollout_s"] += roll_s
        timing["update_s"] += upd_s
        decisions += len(moves)
        t = time.time()
        diagnostics = flawed_step_stats(moves, move_adv)
        if (it % s.eval_every == 0 or it == s.iters) and not s.skip_probes:
            coupling[it] = probes()
            diagnostics.update(coupling[it])
            bar.write(f"probe @ iter {it}: " + " | ".join(f"{k} {v:+.4f}" for k, v in coupling[it].items()))
        timing["probe_s"] += time.time() - t
        row = {"iter": it, "success": float(rewards.mean()), "valid_frac": float(np.mean([m.valid for m in moves])),
               "good_frac": float(np.mean([m.good for m in moves])), "moves": len(moves),
               "mixed_groups": float((rewards.std(dim=1) > 0).float().mean()),
               "adv_abs_mean": float(move_adv.abs().mean()), **stats, **diagnostics,
               "rollout_s": round(roll_s, 3), "update_s": round(upd_s, 3)}
        if it % s.eval_every == 0 or it == s.iters:
            run_eval(it)
            row.update(eval_train_success=evals["train"]["success"], eval_held_out_success=evals["held_out"]["success"])
        metrics_file.write(json.dumps({k: None if v != v else v for k, v in row.items()}) + "\n")  # NaN -> null
        metrics_file.flush()
        bar.write(f"it {it:3d} | succ {row['success']:.2f} | valid {row['valid_frac']:.2f} | good {row['good_frac']:.2f} | "
                  f"mixed {row['mixed_groups']:.2f} | |A| {row['adv_abs_mean']:.2f} | loss {row['loss']:+.4f} | "
                  f"clip {row['clip_frac']:.2f} | A flawed {row['adv_flawed_mean']:+.2f} good {row['adv_good_mean']:+.2f} "
                  f"(flawed A>0 {row['flawed_pos_adv_frac']:.2f}) | " + (f"cls {row['cls_loss']:.3f} | " if s.cls_coef else "")
                  + f"roll {roll_s:.2f}s upd {upd_s:.2f}s")
        if s.render_every and it % s.render_every == 0:
            bar.write(f"-- a sampled episode at iter {it} --\n" + render_episode(moves, envs[0], 0))
    metrics_file.close()
    return {"eval_train_success": evals["train"]["success"], "eval_held_out_success": evals["held_out"]["success"],
            "coupling_start": coupling[0], "coupling_end": coupling[max(coupling)],
            "eval_train_valid_frac": evals["train"]["valid_frac"], "eval_held_out_valid_frac": evals["held_out"]["valid_frac"],
            "decisions_per_second": decisions / max(timing["rollout_s"], 1e-9), **{k: round(v, 2) for k, v in timing.items()},
            "wall_seconds": round(time.time() - start, 2), "model": model, "tokenizer": tokenizer}


def eval_only(s: Settings) -> int:
    device = resolve_device(s.device)
    model, tokenizer = load_policy(s, device)
    for split in ("train", "held_out"):
        layouts = task_sets(s)[1][split]
        result = evaluate(model, tokenizer, layouts, s)
        print(f"{split}: greedy success {result['success']:.3f}, valid moves {result['valid_frac']:.3f} "
              f"({len(layouts)} layouts)")
        for k in range(2):
            print(render_episode(result["moves"], result["envs"][k], k))
    return 0


def run(s: Settings, out_dir: str) -> dict:
    """One training run: settings.json first, then metrics.jsonl as it goes, then policy/ and summary.json."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "settings.json"), "w") as f:
        json.dump(dataclasses.asdict(s), f, indent=1)
    summary = train(s, out_dir)
    model, tokenizer = summary.pop("model"), summary.pop("tokenizer")
    model.save_pretrained(os.path.join(out_dir, "policy"))
    tokenizer.save_pretrained(os.path.join(out_dir, "policy"))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({**summary, "settings": dataclasses.asdict(s)}, f, indent=1)
    print(f"done in {summary['wall_seconds']:.0f}s: greedy success train {summary['eval_train_success']:.2f}, "
          f"held-out {summary['eval_held_out_success']:.2f}; {summary['decisions_per_second']:.0f} decisions/s in "
          f"rollouts; outputs in {out_dir}/")
    return summary


# ------------------------------------------------------------------------------------------------
# The side-by-side experiment: GRPO vs GRPO + classification (advantage / oracle labels)
# ------------------------------------------------------------------------------------------------
TABLE_COLUMNS = {"train success": "eval_train_success", "held-out success": "eval_held_out_success",
                 "coupling_cos": "coupling_cos", "hidden_cos": "hidden_cos", "p_flawed": "p_flawed", "cls_acc": "cls_acc"}


def compare(s: Settings, out_dir: str) -> str:
    """Train the three arms for every seed with the same budget; return a markdown table (mean +- std)."""
    coef = s.cls_coef if s.cls_coef > 0 else 0.5
    arms = {"grpo": (0.0, "advantage"), "grpo+cls-advantage": (coef, "advantage"), "grpo+cls-oracle": (coef, "oracle")}
    rows = [f"| arm (--cls-coef {coef} for +cls) | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for arm, (cls_coef, labels) in arms.items():
        results = []
        for seed in map(int, s.seeds.split()):
            arm_settings = dataclasses.replace(s, seed=seed, cls_coef=cls_coef, cls_labels=labels, compare=False)
            summary = run(arm_settings, os.path.join(out_dir, f"{arm}-seed{seed}"))
            results.append({**summary["coupling_end"], **summary})
        cells = [f"{np.mean([r[k] for r in results]):.3f} ± {np.std([r[k] for r in results]):.3f}" for k in TABLE_COLUMNS.values()]
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    table = "\n".join(rows) + f"\n\n{len(s.seeds.split())} seeds ({s.seeds}); std over seeds (ddof=0); end of training.\n"
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(table)
    return table


def plot(out_dir: str) -> str:
    """compare.png: held-out greedy success and coupling_cos over training, mean over seeds per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    runs = sorted(d for d in os.listdir(out_dir) if os.path.exists(os.path.join(out_dir, d, "metrics.jsonl")))
    for arm in sorted({d.rsplit("-seed", 1)[0] for d in runs}):
        curves = []
        for d in (d for d in runs if d.rsplit("-seed", 1)[0] == arm):
            with open(os.path.join(out_dir, d, "metrics.jsonl")) as f:
                curves.append([json.loads(line) for line in f if "coupling_cos" in line])
        for ax, key in zip(axes, ("eval_held_out_success", "coupling_cos")):
            steps = [r["iter"] for r in curves[0]]
            ax.plot(steps, np.mean([[r[key] for r in c] for c in curves], axis=0), marker="o", label=f"{arm} ({len(curves)} seeds)")
            ax.set_xlabel("GRPO iteration"), ax.set_title(key), ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "compare.png")
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    s = parse_settings(argv)
    print("settings: " + json.dumps(dataclasses.asdict(s)))
    out_dir = s.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + ("-compare" if s.compare else f"-seed{s.seed}"))
    try:
        if s.eval_only:
            return eval_only(s)
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
