"""Agentic GRPO on a text gridworld, in one file: a teaching reference for arXiv 2509.23870.

    pip install -r requirements.txt && python grpo_agentic.py    # about 2 minutes on 2 CPU cores
    python grpo_agentic.py --help                                # every setting, with its meaning
    python grpo_agentic.py --model runs/<run>/policy --iters 0 --sft-steps 0   # evaluate a policy

A tiny Llama (built from a config: nothing is downloaded; `--tiny-arch gpt2` for a GPT-2) is
warm-started on oracle moves, then trained with GRPO: for B layouts it plays G episodes each; every
turn the policy reads the grid as text (with `--history H`, also its last H turns) and *writes* its
move; the reward is 1 if the goal is reached within the budget, else 0. Every move inherits its
episode's advantage, the reward standardised within its group of G (GiGPO's step-level credit can be
added). The actor can also judge its own moves (the paper's classification objective, GCD) and use
that verdict at evaluation (a self-check); probes measure the paper's claims as training goes:
flawed moves' credit, squeezing, coupling, and how episodes fail.

Sections follow the data: settings -> model and prompts -> rollout -> advantages and loss
-> classification -> update -> diagnostics -> training loop -> command line. `CORE` marks the
sections worth copying:
their functions take a model, a tokenizer, ids, tensors and plain numbers, never `Settings`. The
comparison of arms over seeds lives in experiments.py. Deviations from DeepSeekMath GRPO and from
the paper, and why: README.md.

Shapes:  B tasks (layouts) per iteration, G episodes per task (the group), N moves in a batch,
         P prompt tokens, K generated action tokens, T = prompt + action tokens, V vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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

# ---- Settings: the one source of truth; the command line and --help are derived from it -------


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


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    seed: int = arg(0, "random seed (init, task sampling, rollouts, minibatch order)")
    iters: int = arg(
        150,
        "GRPO iterations (each: rollouts of B x G episodes, then one update); "
        "0 with --sft-steps 0 evaluates --model",
    )
    train_tasks: int = arg(256, "size of the fixed set of train layouts that RL and warm-up see")
    data_seed: int = arg(0, "seed of the train and held-out layout sets")
    tasks_per_iter: int = arg(16, "B: distinct train layouts per iteration")
    group_size: int = arg(8, "G: episodes per layout; the advantage baseline is this group's mean")
    step_credit_coef: float = arg(
        0.0, "w in A = A_episode + w * A_step: GiGPO's step credit (0 = plain GRPO; GiGPO uses 1)"
    )
    gamma: float = arg(0.95, "discount of the step return gamma^(moves after it) * reward (GiGPO)")
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
    history: int = arg(
        0,
        "H: turns of history in each prompt, each the observation seen and the action ids written "
        "(0 = the current observation only)",
    )
    sft_steps: int = arg(150, "supervised warm-up steps on oracle moves before RL (0 = none)")
    sft_lr: float = arg(1e-3, "AdamW learning rate of the warm-up")
    sft_batch: int = arg(128, "(state, oracle move) pairs per warm-up step")
    eval_every: int = arg(
        50, "greedy evaluation and probes every this many iterations and at the end"
    )
    eval_tasks: int = arg(
        256, "held-out layouts of the evaluation (in-domain: the first this many train layouts)"
    )
    render_every: int = arg(50, "print one sampled episode every this many iterations (0 = never)")
    cls_coef: float = arg(0.0, "weight of the actor's good/bad classification loss (GCD; 0 = off)")
    cls_labels: str = arg(
        "advantage",
        "'advantage': the sign of each A != 0 move's advantage; "
        "'oracle': every move at every visited state",
    )
    cls_samples: int = arg(128, "at most this many labelled (state, move) pairs per iteration")
    self_check: int = arg(
        0,
        "K > 0: at the end of training, also evaluate the held-out layouts with a self-check: "
        "a move the actor's own verdict calls bad is resampled, up to K times",
    )
    probe_pairs: int = arg(16, "coupled (good, flawed) state pairs in the gradient-coupling probe")
    probe_states: int = arg(128, "start states per eval set where p_flawed and cls_bacc are read")
    model: str = arg("", "path or hub name of a causal LM ('' = the tiny model from a config)")
    tiny_arch: str = arg(
        "llama", "the built-in tiny model: 'llama' (rotary, RMSNorm) or 'gpt2' (learned positions)"
    )
    tiny_layers: int = arg(3, "layers of the built-in tiny model")
    tiny_dim: int = arg(96, "width of the built-in tiny model (a multiple of its 4 heads)")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    out_dir: str = arg("", "where the run's files go ('' = runs/<time>-seed<seed>)")
    overwrite: bool = arg(False, "allow writing into an --out-dir that already holds a run")

    def __post_init__(self):
        """Value checks. The first bad setting raises one ValueError that names its flag."""

        def need(ok: bool, name: str, rule: str):
            if not ok:
                flag = name.replace("_", "-")
                raise ValueError(f"--{flag} must be {rule}, got {getattr(self, name)!r}")

        at_least_one = (
            "epochs",
            "train_tasks",
            "tasks_per_iter",
            "minibatch_moves",
            "max_action_tokens",
            "sft_batch",
            "eval_every",
            "eval_tasks",
            "probe_pairs",
            "probe_states",
            "cls_samples",
            "tiny_layers",
            "tiny_dim",
        )
        for name in at_least_one:
            need(getattr(self, name) >= 1, name, ">= 1")
        non_negative = (
            "iters",
            "sft_steps",
            "lr_warmup_iters",
            "render_every",
            "kl_coef",
            "clip_eps",
            "cls_coef",
            "data_seed",
            "step_credit_coef",
            "gamma",
            "self_check",
            "history",
        )
        for name in non_negative:
            need(getattr(self, name) >= 0, name, ">= 0")
        for name in ("lr", "sft_lr", "temperature"):
            value = getattr(self, name)
            need(value > 0 and math.isfinite(value), name, "a positive number")
        need(self.group_size >= 2, "group_size", ">= 2 (a group of one has no baseline)")
        need(self.tiny_dim % 4 == 0, "tiny_dim", "a multiple of 4 (the number of heads)")
        need(self.cls_labels in ("advantage", "oracle"), "cls_labels", "'advantage' or 'oracle'")
        need(self.tiny_arch in ("gpt2", "llama"), "tiny_arch", "'gpt2' or 'llama'")
        need(
            self.train_tasks >= self.tasks_per_iter,
            "train_tasks",
            f">= --tasks-per-iter ({self.tasks_per_iter})",
        )
        resolve_device(self.device)


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
    looks_like_path = s.model.startswith((".", "/", "~")) or s.model.count("/") > 1  # not "org/x"
    if s.model and looks_like_path and not os.path.exists(os.path.expanduser(s.model)):
        parser.error(f"--model {s.model}: no such file or directory")
    holds_run = os.path.exists(os.path.join(s.out_dir, "metrics.jsonl"))
    if s.out_dir and holds_run and not s.overwrite:
        parser.error(
            f"--out-dir {s.out_dir} already holds a run; "
            "choose another directory or pass --overwrite"
        )
    return s


class NonFiniteError(RuntimeError):
    """A loss or the logits became NaN/inf: stop rather than train on garbage."""


# ---- Model, tokenizer, prompts ----------------------------------------------------------------
# The verdict (GCD): after a move the text " verdict:" is appended, and the actor's own LM head
# scores the verdict words. Listed by label, so that verdict column c is label c everywhere.
VERDICT_QUERY = " verdict:"
VERDICTS = (" bad", " good")
BAD, GOOD = 0, 1


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


TINY_NAMES = {"gpt2": "tiny GPT-2", "llama": "tiny Llama"}


def build_tiny_model(tokenizer, layers: int, dim: int, positions: int, arch: str = "gpt2"):
    """A small causal LM from a config (random init), 3 layers x 96 wide: 0.34 M parameters for
    GPT-2 (with 64 learned positions), 0.33 M for Llama.

    arch 'gpt2': learned absolute positions, LayerNorm, a GELU MLP 4x wide. 'llama': rotary
    positions, RMSNorm, a SwiGLU MLP 8/3 x wide (the same parameter count), as Llama and Qwen are.
    `positions`: the longest sequence it must read (GPT-2's positions are learned, and a longer
    input fails with an index error); never fewer than 64, so the default run's init is stable."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    special = dict(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
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


def load_tokenizer(model_name: str):
    """The word-level tokenizer of the tiny model, or the tokenizer of --model."""
    if not model_name:
        return build_word_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {model_name}: its tokenizer has no end-of-text token")
    if tokenizer.pad_token_id is None:  # harmless: padding is always known from lengths and masks
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(s: Settings, tokenizer, positions: int, device: torch.device):
    """The tiny built-in model, or any causal LM named by --model, checked to hold `positions`."""
    torch.manual_seed(s.seed)
    if not s.model:
        model = build_tiny_model(tokenizer, s.tiny_layers, s.tiny_dim, positions, s.tiny_arch)
        return model.to(device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(s.model, dtype=torch.float32)
    check_positions(s, model.config, positions)
    return model.to(device)


def check_positions(s: Settings, config, positions: int) -> None:
    """A ValueError in one line if --model's config reads fewer than `positions` positions."""
    most = getattr(config, "max_position_embeddings", None)
    if most is not None and most < positions:
        raise ValueError(
            f"--model {s.model} reads at most {most} positions; a prompt of --history "
            f"{s.history}, an action of --max-action-tokens {s.max_action_tokens} and the "
            f"verdict need {positions}"
        )


def action_ids_for(tokenizer, action: str) -> list[int]:
    """The one action format: ' left' + end-of-text, as ids. A rollout takes exactly these ids as a
    move, so every probe that scores this sequence scores what the policy really does."""
    ids = tokenizer(" " + action, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def prompt_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text: Llama's <s>, nothing for GPT-2's."""
    return tokenizer("", add_special_tokens=True)["input_ids"]


def encode_observations(tokenizer, observations: list[str]) -> list[list[int]]:
    """Each observation's ids, no special tokens: encoded once, then only ever concatenated."""
    if not observations:  # a tokenizer fails on an empty batch
        return []
    return tokenizer(observations, add_special_tokens=False)["input_ids"]


def encode_prompts(tokenizer, observations: list[str]) -> list[list[int]]:
    """Prompts with an empty history: the prefix, then the observation."""
    prefix = prompt_prefix(tokenizer)
    return [prefix + ids for ids in encode_observations(tokenizer, observations)]


def history_prompt(
    prefix: list[int], turns: list[tuple], observation_ids: list[int], history: int
) -> list[int]:
    """The prompt of one move, as ids: the last `history` turns of the episode, then what the agent
    sees now. `turns` holds (observation ids, action ids as sampled) pairs, oldest first:

        prompt = prefix + obs_{t-H} + act_{t-H} + ... + obs_{t-1} + act_{t-1} + obs_t

    Token-in/token-out: the actions are the ids the policy wrote, never decoded text encoded again
    (which can give other ids: ' le' + 'ft' decodes to ' left', one token when encoded again).

    >>> history_prompt([9], [([1, 2], [5, 0]), ([1, 3], [6, 0])], [1, 4], history=1)
    [9, 1, 3, 6, 0, 1, 4]
    """
    ids = list(prefix)
    for seen, written in turns[max(0, len(turns) - history) :] if history else []:
        ids += seen + written
    return ids + observation_ids


def positions_needed(
    tokenizer, observations: list[str], max_action_tokens: int, history_turns: int = 0
) -> int:
    """The longest sequence a run reads: its longest prompt (`history_turns` turns of the longest
    observation and action, then the longest observation), a whole action (generated, or in the
    action format the probes score), the verdict query and the longest verdict word."""
    longest_observation = max(len(ids) for ids in encode_observations(tokenizer, observations))
    probed = max(len(action_ids_for(tokenizer, a)) for a in toy_env.ACTIONS)  # probes score these
    longest_action = max(max_action_tokens, probed)
    turn = longest_observation + longest_action
    longest_prompt = len(prompt_prefix(tokenizer)) + history_turns * turn + longest_observation
    query = tokenizer(VERDICT_QUERY, add_special_tokens=False)["input_ids"]
    verdict = max(len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in VERDICTS)
    return longest_prompt + longest_action + len(query) + verdict


# ---- CORE: rollout -- all live episodes step together, one batched forward per token ----------
def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-pad prompts for generation: ids, attention mask and position ids, each (N, P).
    Positions count real tokens only, so the padding is invisible to the model."""
    width = max(len(x) for x in seqs)
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in seqs], device=device)  # (N, P)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in seqs], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (N, P)
    return ids, mask, positions


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
    """Sample one action per prompt, each up to its end-of-text token or `max_tokens` tokens.
    Returns (token ids per action, their log-probs, decoded texts): lists of N.

    Our own loop rather than `model.generate`, so the tokens come from exactly softmax(logits / T)
    (no top-k/top-p/repetition processors from a generation_config) and the log-probs are the
    ones the loss will score. Tokens, log-probs and flags stay on the device; the host waits once
    per token (may we stop early?) and, after the loop, to copy the results. The first forward
    asks for the last position's logits only: (N, 1, V), not (N, P, V), which matters for a
    150k-token vocabulary."""
    device = next(model.parameters()).device
    n = len(prompts)
    ids, mask, positions = left_pad(prompts, tokenizer.pad_token_id, device)  # each (N, P)
    tokens = torch.zeros(n, max_tokens, dtype=torch.long, device=device)  # (N, K)
    token_logps = torch.zeros(n, max_tokens, device=device)  # (N, K)
    written = torch.zeros(n, max_tokens, dtype=torch.bool, device=device)  # (N, K) part of action
    finished = torch.zeros(n, dtype=torch.bool, device=device)  # (N,) end-of-text written
    broken = torch.zeros((), dtype=torch.bool, device=device)  # a NaN or +inf logit was seen
    cache = None
    for k in range(max_tokens):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].float() / temperature  # (N, V)
        bad = torch.isnan(logits) | torch.isposinf(logits)  # (N, V); -inf is a legal mask
        broken |= bad.any()
        logprobs = torch.log_softmax(logits.masked_fill(bad, 0.0), dim=-1)  # (N, V)
        if greedy:
            token = logprobs.argmax(dim=-1)  # (N,)
        else:
            token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)  # (N,)
        tokens[:, k] = token
        token_logps[:, k] = logprobs.gather(1, token[:, None]).squeeze(1)
        written[:, k] = ~finished
        finished |= token == tokenizer.eos_token_id
        if finished.all():  # the one wait per token: stop as soon as every action is complete
            break
        cache = out.cache
        ids = token[:, None]  # (N, 1)
        positions = positions[:, -1:] + 1  # (N, 1)
        mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=device)], dim=1)
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

    episode: int  # index into the rollout's B*G episodes (its group is episode // G)
    prompt_ids: list[int]  # everything the policy read: history, then the current observation
    action_ids: list[int]  # as sampled; end-of-text included when it was generated
    sample_logps: list[float]  # log pi(token) recorded while sampling, one per action id
    text: str  # decoded, for logs
    action: str | None  # the move these ids spell in the one action format; None = off-format
    good: bool  # oracle label: diagnostics and the oracle-label ablation only, never the reward
    good_moves: tuple = ()  # every move the oracle calls good at this state (same use)
    observation_ids: list[int] = field(default_factory=list)  # the current observation alone
    cell: tuple[int, int] | None = None  # where the agent stood (diagnostics)


def rollout(
    model,
    tokenizer,
    layouts: list[str],
    group_size: int,
    max_action_tokens: int,
    temperature: float,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    judge=None,
    tries: int = 0,
    history: int = 0,
):
    """Play `group_size` episodes on each layout, all at once: (moves, rewards (B, G), envs).

    Each prompt holds the episode's last `history` turns and the current observation
    (history_prompt); an observation is encoded once, and the actions in the history are the ids
    as sampled. Only ids that spell ' move' + end-of-text exactly are a move; anything else (say
    'left \\n \\n', which the lenient environment would parse) is off-format and moves nothing.
    Self-check: with a `judge(prompts, actions) -> [ok, ...]`, a rejected move is resampled
    (temperature sampling) up to `tries` times; the last sample stands."""
    formats = {tuple(action_ids_for(tokenizer, a)): a for a in toy_env.ACTIONS}
    prefix = prompt_prefix(tokenizer)
    envs = [toy_env.GridWorld.from_string(lay) for lay in layouts for _ in range(group_size)]
    seen = encode_observations(tokenizer, [env.reset() for env in envs])  # current observation
    turns = [[] for _ in envs]  # per episode: (observation ids, action ids) of each turn so far
    moves = []
    live = list(range(len(envs)))  # episodes still running
    while live:
        prompt_ids = [history_prompt(prefix, turns[i], seen[i], history) for i in live]
        action_ids, logps, texts = generate_actions(
            model, tokenizer, prompt_ids, max_action_tokens, temperature, greedy, generator
        )
        pending = list(range(len(prompt_ids))) if judge else []  # not yet accepted by the judge
        for _ in range(tries if pending else 0):
            verdicts = judge([prompt_ids[k] for k in pending], [action_ids[k] for k in pending])
            pending = [k for k, ok in zip(pending, verdicts) if not ok]  # accepted: never rejudged
            if not pending:
                break
            redo = generate_actions(
                model,
                tokenizer,
                [prompt_ids[k] for k in pending],
                max_action_tokens,
                temperature,
                False,
                generator,
            )
            for k, a, lp, text in zip(pending, *redo):
                action_ids[k], logps[k], texts[k] = a, lp, text
        observations = {}
        for i, p, a, lp, text in zip(live, prompt_ids, action_ids, logps, texts):
            action = formats.get(tuple(a))
            good_moves = tuple(envs[i].good_actions())
            cell = envs[i].pos
            observations[i], _, _, info = envs[i].step(action)
            moves.append(Move(i, p, a, lp, text, action, info["good"], good_moves, seen[i], cell))
            turns[i].append((seen[i], a))
        live = [i for i in live if not envs[i].done]
        for i, ids in zip(live, encode_observations(tokenizer, [observations[i] for i in live])):
            seen[i] = ids
    success = [float(env.pos == env.goal) for env in envs]
    rewards = torch.tensor(success).view(len(layouts), group_size)  # (B, G)
    return moves, rewards, envs


def render_episode(moves: list[Move], env: toy_env.GridWorld, episode: int) -> str:
    """One episode as text: the start grid, then each move marked good (+) or flawed (-)."""
    steps = [f"{m.text!r}{'+' if m.good else '-'}" for m in moves if m.episode == episode]
    outcome = "reached the goal" if env.pos == env.goal else "failed"
    return f"{env.to_string()}\n  moves: {' '.join(steps)}  -> {outcome}"


# ---- CORE: credit -- one advantage per episode, inherited by every move of it ------------------
def grpo_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6):
    """Group-relative advantage, (num_groups, G) -> (num_groups, G).

        A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps),   std with ddof=0 (population std)
        A_ij =  r_ij - mean_j r_ij                          if not scale_by_std (Dr. GRPO)

    A group whose rewards are all equal carries no signal and gets exactly 0 (never NaN).

    >>> grpo_advantages(torch.tensor([[1., 0., 0., 1.], [1., 1., 1., 1.]]))
    tensor([[ 1.0000, -1.0000, -1.0000,  1.0000],
            [ 0.0000,  0.0000,  0.0000,  0.0000]])
    """
    mean = rewards.mean(dim=1, keepdim=True)  # (num_groups, 1)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)  # (num_groups, 1)
    if scale_by_std:
        advantages = (rewards - mean) / (std + eps)  # (num_groups, G)
    else:
        advantages = rewards - mean
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # (num_groups, 1)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages)


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
        step_adv[members] = grpo_advantages(returns[members][None], scale_by_std, eps)[0]
    return step_adv


def move_advantages(
    rewards: torch.Tensor,
    episodes: list[int],
    anchors: list | None = None,
    step_credit_coef: float = 0.0,
    gamma: float = 0.95,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """The credit of each move, (N,): the step where outcome RL becomes *agentic* RL.

        A_i = A_episode[e(i)] + w * A_step_i

    rewards (B, G) is one outcome per episode; episodes[i] = e(i), the index in B*G of the episode
    move i belongs to. Every move inherits its episode's group-relative advantage (grpo_advantages):
    good and flawed moves of one episode get the same credit, and only the average over many
    episodes tells them apart (the paper's Lemma 3.1). With w = step_credit_coef > 0, GiGPO's
    step credit (gigpo_step_advantages over the step returns, grouped by `anchors`) is added.

    Two groups of two: episode 0 won in two moves, 1 lost in one; 2 and 3 both won (no signal).
    >>> move_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), [0, 1, 0, 2, 3])
    tensor([ 1.0000, -1.0000,  1.0000,  0.0000,  0.0000])
    """
    if step_credit_coef and anchors is None:
        raise ValueError("step credit needs anchors: one (task, observation) key per move")
    episode_adv = grpo_advantages(rewards, scale_by_std).flatten()  # (B*G,)
    move_adv = episode_adv[episodes]  # (N,) each move inherits its episode's
    if step_credit_coef:
        returns = step_returns(episodes, rewards.flatten(), gamma)  # (N,)
        step_adv = gigpo_step_advantages(anchors, returns, scale_by_std)  # (N,)
        move_adv = move_adv + step_credit_coef * step_adv
    return move_adv


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


# ---- CORE: the loss -- a clipped surrogate over the action tokens ------------------------------
def build_batch(prompts: list[list[int]], actions: list[list[int]], pad_id: int, device):
    """Right-padded prompt+action sequences: ids, attention mask and action mask, each (N, T).

    The action mask is 1 exactly on the action ids (as sampled, never re-tokenised text); prompt
    tokens and padding are 0, never trained. Padding is known from the lengths, never guessed
    from ids: pad may equal end-of-text."""
    width = max(len(p) + len(a) for p, a in zip(prompts, actions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (N, T)
    attention = torch.zeros(len(prompts), width, dtype=torch.long)  # (N, T)
    action_mask = torch.zeros(len(prompts), width)  # (N, T)
    for i, (p, a) in enumerate(zip(prompts, actions)):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        attention[i, : len(p) + len(a)] = 1
        action_mask[i, len(p) : len(p) + len(a)] = 1.0
    return ids.to(device), attention.to(device), action_mask.to(device)


def token_logprobs(model, ids: torch.Tensor, attention: torch.Tensor, temperature: float = 1.0):
    """log pi(token_t | tokens_<t) at every position, (N, T); position 0 (no context) is 0.
    pi = softmax(logits / temperature): the loss must score the distribution the rollout sampled.
    Memory: the (N, T, V) logits and their log-softmax, twice that for a 150k-token vocabulary."""
    logits = model(input_ids=ids, attention_mask=attention).logits.float() / temperature  # (N,T,V)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (N, T-1, V) predicts tokens 1..T-1
    picked = logp.gather(2, ids[:, 1:, None]).squeeze(2)  # (N, T-1)
    return F.pad(picked, (1, 0))  # (N, T)


def sequence_logprobs(
    model, prompts: list[list[int]], actions: list[list[int]], pad_id: int, temperature: float = 1.0
) -> torch.Tensor:
    """log pi(action | prompt) of each pair: the sum over the action's tokens, (N,)."""
    device = next(model.parameters()).device
    ids, attention, action_mask = build_batch(prompts, actions, pad_id, device)  # (N, T) each
    return (token_logprobs(model, ids, attention, temperature) * action_mask).sum(dim=1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    clip_eps: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
):
    """PPO-clipped surrogate over the action tokens, token-level average, plus an optional KL.
    logp, old_logp, ref_logp and action_mask are (N, T); advantages (N,). Sums run over the
    action tokens t only (action_mask_t = 1), and n_tok is their count:

        ratio_t = exp(logp_t - old_logp_t)
        L_pg    = -(1 / n_tok) * sum_t min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)
        KL      =  (1 / n_tok) * sum_t (exp(d_t) - d_t - 1),   d_t = ref_logp_t - logp_t
        L       = L_pg + kl_coef * KL

    The KL is Schulman's k3 estimator of KL(pi || pi_ref). Normaliser: every action token of the
    minibatch weighs the same, however the tokens split into moves and episodes. Prompt and padding
    positions are left out before any exp, so an untrained position can never overflow into NaN.
    Returns (L, info): info["pg_loss"] is L_pg alone, info["ratio_dev"] = max_t |ratio_t - 1|
    (0 when the sampler and the scorer agree)."""
    on_action = action_mask.bool()  # (N, T)
    n_tok = on_action.sum().clamp(min=1)
    adv = advantages[:, None].expand_as(logp)[on_action]  # (n_tok,) each token its move's A
    ratio = torch.exp(logp[on_action] - old_logp[on_action])  # (n_tok,)
    surrogate = torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)  # (n_tok,)
    pg_loss = -surrogate.sum() / n_tok
    loss = pg_loss
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None and kl_coef > 0:
        d = ref_logp[on_action] - logp[on_action]  # (n_tok,)
        kl = (torch.exp(d) - d - 1).sum() / n_tok
        loss = pg_loss + kl_coef * kl
    deviation = (ratio.detach() - 1).abs()  # (n_tok,)
    info = {
        "pg_loss": pg_loss.item(),
        "clip_frac": (deviation > clip_eps).float().sum().item() / n_tok.item(),
        "kl": kl.item(),
        "ratio_dev": deviation.max().item() if len(deviation) else 0.0,
    }
    return loss, info


# ---- CORE: the actor classifies its own moves (the paper's GCD) --------------------------------
def advantage_labelled_pairs(
    prompts: list[list[int]], actions: list[list[int]], advantages: torch.Tensor
):
    """What a real agent can label without an oracle: each move with A != 0, labelled by the sign
    of A (1 = good, 0 = bad). Noisy by design: a flawed move in a lucky episode gets A > 0
    (Lemma 3.1's other face). Returns (prompts, actions, labels (n,))."""
    keep = (advantages != 0).nonzero().flatten().tolist()
    labels = (advantages[keep] > 0).long()  # (n,)
    return [prompts[i] for i in keep], [actions[i] for i in keep], labels


def verdict_logits(
    model,
    tokenizer,
    prompts: list[list[int]],
    actions: list[list[int]],
    query: str = VERDICT_QUERY,
    verdicts: tuple[str, ...] = VERDICTS,
) -> torch.Tensor:
    """The actor's own verdict on (state, move) pairs, read from its LM head (no new parameters):

        scores[i, c] = log p(verdicts[c] | prompt_i, action_i, query)      (N, len(verdicts))

    With the defaults, column 0 is " bad" and column 1 " good", so column c is label c. A verdict
    of several tokens scores the sum of their log-probs; when each is one token, all are read at
    the same position: one forward instead of one per verdict."""
    query_ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    asked = [p + a + query_ids for p, a in zip(prompts, actions)]  # state, move, query
    verdict_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in verdicts]
    device = next(model.parameters()).device
    if all(len(v) == 1 for v in verdict_ids):
        no_action = [[]] * len(asked)
        ids, attention, _ = build_batch(asked, no_action, tokenizer.pad_token_id, device)  # (N, T)
        logits = model(input_ids=ids, attention_mask=attention).logits.float()  # (N, T, V)
        last = logits[torch.arange(len(asked)), attention.sum(1) - 1]  # (N, V) after the query
        return torch.log_softmax(last, dim=-1)[:, [v[0] for v in verdict_ids]]  # (N, C)
    scores = [
        sequence_logprobs(model, asked, [v] * len(asked), tokenizer.pad_token_id)  # (N,)
        for v in verdict_ids
    ]
    return torch.stack(scores, dim=1)  # (N, C)


def verdict_is_good(model, tokenizer, prompts: list[list[int]], actions: list[list[int]]):
    """(N,) bool: does the actor's verdict call each move good? A tie counts as good."""
    scores = verdict_logits(model, tokenizer, prompts, actions)  # (N, 2)
    return scores[:, GOOD] >= scores[:, BAD]


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the verdict, (N, 2) scores and (N,) labels (column = label) -> (), each
    class weighing the same whatever its count (unweighted, a 72 % majority of good moves makes
    "always good" a minimum):

        L = mean over the classes c present of ( mean_{i: y_i = c} -log softmax(logits_i)[y_i] )

    Two good moves scored log 2 each, one bad move scored log(1 + e^2):
    >>> logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    >>> round(balanced_cross_entropy(logits, torch.tensor([1, 1, 0])).item(), 4)
    1.41
    """
    target = labels.to(logits.device)  # (N,)
    count = torch.bincount(target, minlength=2).float()  # (2,)
    weight = torch.where(count > 0, 1 / count.clamp(min=1), 0.0)  # (2,)
    return F.cross_entropy(logits, target, weight=weight)


def classification_loss(
    model, tokenizer, prompts: list[list[int]], actions: list[list[int]], labels: torch.Tensor
) -> torch.Tensor:
    """Balanced cross-entropy of the actor's verdict on (state, move) pairs; labels 1 = good."""
    return balanced_cross_entropy(verdict_logits(model, tokenizer, prompts, actions), labels)


# ---- CORE: the update -- clipped surrogate (+ classification, + KL) over shuffled minibatches ---
def minibatches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A fresh shuffle of range(n) cut into round(n / size) near-equal minibatches (sizes differ
    by at most 1), so that no tiny remainder gets a full optimiser step of its own.

    >>> [len(b) for b in minibatches(600, 256, np.random.default_rng(0))]
    [300, 300]
    """
    return np.array_split(rng.permutation(n), max(1, round(n / size)))


def learning_rate(it: int, peak: float, warmup: int, total: int) -> float:
    """Learning rate of RL iteration `it` (1-based): linear warm-up to `peak`, reached at iteration
    `warmup`, then linear decay that would reach 0 one iteration after the last:

        lr(it) = peak * min(1, it / warmup, (total + 1 - it) / max(1, total + 1 - warmup))

    Warm-up because Adam's first steps have size ~lr in every coordinate whatever the gradient's
    size (a noisy policy gradient would undo the warm-start); decay so the final policy settles.

    >>> [round(learning_rate(it, 1.0, warmup=2, total=6), 3) for it in range(1, 7)]
    [0.5, 1.0, 0.8, 0.6, 0.4, 0.2]
    """
    rising = it / warmup if warmup else 1.0
    falling = (total + 1 - it) / max(1, total + 1 - warmup)
    return peak * min(1.0, rising, falling)


def grpo_update(
    model,
    tokenizer,
    prompts: list[list[int]],
    actions: list[list[int]],
    old_logps: list[list[float]],
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    clip_eps: float = 0.2,
    epochs: int = 1,
    minibatch_moves: int = 96,
    temperature: float = 1.0,
    ref_model=None,
    kl_coef: float = 0.0,
    cls_set: tuple | None = None,
    cls_coef: float = 0.0,
) -> dict:
    """One GRPO update over the moves of an iteration; returns statistics for the log.

    Inputs, one entry per move: prompt ids, action ids (as sampled), the log-prob of each action id
    recorded while sampling (the *old* log-probs: same model, dropout off, so the first ratio is 1
    up to float error, logged as ratio_dev_first) and the move's advantage, (N,).

    Only moves with A != 0 enter the loss; the others have no gradient through the surrogate and,
    left in, would only dilute the token average (and take the KL where they carry no signal).
    `epochs` passes, each a fresh shuffle cut into minibatches of about `minibatch_moves` moves:
    one AdamW step per minibatch, gradient norm clipped at 1. With `cls_set` = (prompts, actions,
    labels) and cls_coef > 0, each step also takes its share of the classification pairs:
    L = L_pg + kl_coef * KL + cls_coef * L_cls. `rng` orders the minibatches; `tokenizer` gives
    the pad id and encodes the verdict query. The defaults are those of Settings."""
    device = next(model.parameters()).device
    signal = (advantages != 0).nonzero().flatten().tolist()  # indices of moves with A != 0
    cls_prompts, cls_actions, cls_labels = cls_set or ([], [], torch.zeros(0, dtype=torch.long))
    steps = []
    for _ in range(epochs if signal or len(cls_prompts) else 0):
        parts = minibatches(len(signal), minibatch_moves, rng)  # [empty] when there is no signal
        cls_parts = np.array_split(rng.permutation(len(cls_prompts)), len(parts))
        for part, cls_part in zip(parts, cls_parts):
            loss = torch.zeros((), device=device)
            info = {"pg_loss": math.nan, "clip_frac": math.nan, "kl": math.nan}
            if len(part):
                idx = [signal[k] for k in part]
                ids, attention, action_mask = build_batch(
                    [prompts[i] for i in idx],
                    [actions[i] for i in idx],
                    tokenizer.pad_token_id,
                    device,
                )  # (n, T) each
                old = torch.zeros_like(action_mask)  # (n, T)
                recorded = [lp for i in idx for lp in old_logps[i]]
                old[action_mask == 1] = torch.tensor(recorded, device=device)
                logp = token_logprobs(model, ids, attention, temperature)  # (n, T)
                ref = None
                if ref_model is not None:
                    with torch.no_grad():
                        ref = token_logprobs(ref_model, ids, attention, temperature)  # (n, T)
                move_adv = advantages[idx].to(device)  # (n,)
                loss, info = grpo_loss(logp, old, move_adv, action_mask, clip_eps, ref, kl_coef)
            cls_loss = None
            if len(cls_part):
                cls_loss = classification_loss(
                    model,
                    tokenizer,
                    [cls_prompts[k] for k in cls_part],
                    [cls_actions[k] for k in cls_part],
                    cls_labels[cls_part],
                )
                loss = loss + cls_coef * cls_loss
            if not torch.isfinite(loss):
                raise NonFiniteError(f"the GRPO loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            info["loss"] = loss.item()
            info["cls_loss"] = cls_loss.item() if cls_loss is not None else math.nan
            steps.append(info)
    stats = {}
    for key in ("loss", "pg_loss", "clip_frac", "kl", "cls_loss"):
        values = [x[key] for x in steps if not math.isnan(x[key])]
        stats[key] = float(np.mean(values)) if values else math.nan
    stats["ratio_dev_first"] = next((x["ratio_dev"] for x in steps if "ratio_dev" in x), math.nan)
    stats["update_moves"] = len(signal)
    stats["cls_pairs"] = len(cls_prompts)
    return stats


# ---- Diagnostics: the paper's claims, measured with the oracle's labels (never trained on) ----
def flawed_step_stats(moves: list[Move], move_adv: torch.Tensor) -> dict:
    """Lemma 3.1 in the wild: the advantage outcome-based GRPO gives to good vs flawed moves.
    A mean over no moves is NaN (null in the log)."""
    flawed = torch.tensor([not m.good for m in moves])  # (N,)
    return {
        "flawed_frac": flawed.float().mean().item(),
        "adv_flawed_mean": move_adv[flawed].mean().item(),
        "adv_good_mean": move_adv[~flawed].mean().item(),
        "flawed_pos_adv_frac": (move_adv[flawed] > 0).float().mean().item(),
    }


def squeezing_step(probs: torch.Tensor, action: int, advantage: float, lr: float) -> torch.Tensor:
    """One exact policy-gradient step on the logits z of a softmax policy pi = softmax(z), (K,):

        z' = z + lr * A * d log pi(action) / dz = z + lr * A * (onehot(action) - pi)

    With A < 0 every other logit rises by lr*|A|*pi_j: the most likely action gains most (the
    "squeezing effect", Ren & Sutherland 2024), even when it is itself a bad one.

    >>> squeezing_step(torch.tensor([0.3, 0.5, 0.2]), action=0, advantage=-1.0, lr=0.5)
    tensor([0.1968, 0.5975, 0.2057])

    Actions 0 and 1 are bad, 2 is good. Pushing bad action 0 down raises the other bad action, 1,
    from 0.50 to 0.60 (it is the most likely); yet bad mass falls 0.80 -> 0.79 and good action 2
    gains 0.20 -> 0.21.
    """
    onehot = F.one_hot(torch.tensor(action), len(probs)).float()
    z = torch.log(probs) + lr * advantage * (onehot - probs)
    return torch.softmax(z, dim=0)


def action_logprobs(model, tokenizer, observations: list[str], actions: list[str]) -> torch.Tensor:
    """log pi(action | observation) of whole actions in the one action format, (N,)."""
    prompts = encode_prompts(tokenizer, observations)
    action_ids = [action_ids_for(tokenizer, a) for a in actions]
    return sequence_logprobs(model, prompts, action_ids, tokenizer.pad_token_id)


@torch.no_grad()
def flawed_mass(model, tokenizer, probe: list[tuple[str, list[str]]]) -> dict:
    """Theorem 3.2 checked on fixed probe states (observation, good moves):

    p_flawed     = mean_s (1 - sum_{a good} pi(a|s))   all mass not on a good move, off-format too
    p_flawed_max = mean_s max_{a flawed} pi(a|s)        the single most likely flawed move"""
    observations = [o for o, _ in probe for _ in toy_env.ACTIONS]
    moves = list(toy_env.ACTIONS) * len(probe)
    p = action_logprobs(model, tokenizer, observations, moves).exp().view(len(probe), -1)  # (S, 4)
    good = [[a in g for a in toy_env.ACTIONS] for _, g in probe]
    good = torch.tensor(good, device=p.device)  # (S, 4)
    return {
        "p_flawed": float((1 - (p * good).sum(1)).mean()),
        "p_flawed_max": float(p.masked_fill(good, 0).max(1).values.mean()),
    }


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present of the recall, (TPR + TNR) / 2: "always good" scores 0.5,
    whatever the share of good moves (plain accuracy would score that share).

    >>> balanced_accuracy(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 1, 0, 0]))
    0.75
    """
    recalls = [(predicted[labels == c] == c).float().mean().item() for c in labels.unique()]
    return float(np.mean(recalls))


@torch.no_grad()
def classification_bacc(
    model, tokenizer, probe: list[tuple[str, list[str]]], prompts: list[list[int]] | None = None
) -> float:
    """Balanced accuracy of the actor's verdict against the oracle, all 4 moves at probe states
    (observation, good moves). The prompts are the observations alone, unless `prompts` (ids, one
    per state: a history, then the observation) are given."""
    if prompts is None:
        prompts = encode_prompts(tokenizer, [o for o, _ in probe])
    asked = [p for p in prompts for _ in toy_env.ACTIONS]
    actions = [action_ids_for(tokenizer, a) for _ in probe for a in toy_env.ACTIONS]
    labels = torch.tensor([int(a in good) for _, good in probe for a in toy_env.ACTIONS])
    predicted = verdict_is_good(model, tokenizer, asked, actions).long().cpu()  # (S*4,)
    return balanced_accuracy(predicted, labels)


def coupling_probe(model, tokenizer, pairs: list[tuple[str, str, str]]) -> dict:
    """Gradient coupling between near-identical states, over (obs_good, obs_flawed, action)
    triples: the same move, good in the first observation and flawed in the second. Means over
    pairs, with g_x = grad_theta log pi(action | obs_x) (whole action, all parameters):

    coupling_cos   = cos(g_good, g_flawed)
    coupling_ratio = <g_good, g_flawed> / <g_good, g_good>. A small step theta += eta * g_good
                     raises log pi(a|s_good) by eta*|g_good|^2 and log pi(a|s_flawed) by
                     eta*<g_good, g_flawed> (first order): the ratio is the share of the intended
                     gain that leaks to the flawed twin (1 = all of it), free of step size and
                     scale. The median over pairs: where the good move is near-certain,
                     |g_good| ~ 0 and one pair's ratio explodes. A pair with a zero gradient
                     has no cosine and no ratio (NaN); it is left out of the mean and median.
    hidden_cos     = cos(h_good, h_flawed), last-layer hidden states where the move is predicted;
                     _move: at the move's last token (the verdict query follows it); _centred:
                     after subtracting the probe's mean state, a component every grid shares.

    Uses torch.autograd.grad (never .grad) and changes no weight: model, gradients and optimiser
    are left as they were; so is the train/eval mode."""
    was_training = model.training
    model.eval()  # no dropout noise in the probe
    params = [p for p in model.parameters() if p.requires_grad]
    cosines, ratios, states, moves = [], [], [], []
    for obs_good, obs_flawed, action in pairs:
        logps = action_logprobs(model, tokenizer, [obs_good, obs_flawed], [action, action])  # (2,)
        g_good = torch.cat(
            [g.flatten() for g in torch.autograd.grad(logps[0], params, retain_graph=True)]
        )
        g_flawed = torch.cat([g.flatten() for g in torch.autograd.grad(logps[1], params)])
        good_sq = (g_good @ g_good).item()
        flawed_sq = (g_flawed @ g_flawed).item()
        dot = (g_good @ g_flawed).item()
        cosines.append(
            dot / math.sqrt(good_sq * flawed_sq) if good_sq * flawed_sq > 0 else math.nan
        )
        ratios.append(dot / good_sq if good_sq > 0 else math.nan)
        with torch.no_grad():
            prompts = encode_prompts(tokenizer, [obs_good, obs_flawed])
            twice = [action_ids_for(tokenizer, action)] * 2
            ids, attention, _ = build_batch(prompts, twice, tokenizer.pad_token_id, logps.device)
            out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
            hidden = out.hidden_states[-1]  # (2, T, d)
        states.append(hidden[[0, 1], [len(p) - 1 for p in prompts]])  # (2, d) a is predicted here
        moves.append(hidden[[0, 1], attention.sum(1) - 1])  # (2, d) a's last token
    model.train(was_training)
    states = torch.stack(states)  # (pairs, 2, d)
    moves = torch.stack(moves)  # (pairs, 2, d)
    centred = states - states.mean(dim=(0, 1))  # (pairs, 2, d)
    finite_ratios = [r for r in ratios if not math.isnan(r)]
    finite_cosines = [c for c in cosines if not math.isnan(c)]

    def twin_cosine(h: torch.Tensor) -> float:
        return F.cosine_similarity(h[:, 0], h[:, 1], dim=1).mean().item()

    return {
        "coupling_cos": float(np.mean(finite_cosines)) if finite_cosines else math.nan,
        "coupling_ratio": float(np.median(finite_ratios)) if finite_ratios else math.nan,
        "hidden_cos": twin_cosine(states),
        "hidden_cos_move": twin_cosine(moves),
        "hidden_cos_centred": twin_cosine(centred),
    }


FAILURE_KINDS = ("bump_toward", "detour_toward", "away", "off_format")


def flaw_kind(move: Move, env: toy_env.GridWorld) -> str:
    """Which of FAILURE_KINDS a move the oracle calls flawed is; `env` is its episode's (walls and
    goal). Only meaningful for flawed moves: a good detour move would come out as "away"."""
    if move.action is None:
        return "off_format"
    toward = env.heads_for_goal(move.action, move.cell)
    bumped = env.next_pos(move.cell, move.action) == move.cell
    if toward and bumped:
        return "bump_toward"
    return "detour_toward" if toward else "away"


def failure_anatomy(moves: list[Move], envs: list[toy_env.GridWorld]) -> dict:
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
    by_episode: dict[int, list[Move]] = {}
    for m in moves:  # in the order played
        by_episode.setdefault(m.episode, []).append(m)
    kinds, repeats = [], []
    for episode, played in by_episode.items():
        env = envs[episode]
        if env.pos != env.goal:
            kinds.append(flaw_kind(next(m for m in played if not m.good), env))
        for move, after in zip(played, played[1:]):
            if move.action is not None and env.next_pos(move.cell, move.action) == move.cell:
                repeats.append(after.action_ids == move.action_ids)
    row = {
        f"fail_{kind}": kinds.count(kind) / len(kinds) if kinds else math.nan
        for kind in FAILURE_KINDS
    }
    row["repeat_after_bump"] = float(np.mean(repeats)) if repeats else math.nan
    return row


def after_bump_prompts(tokenizer, bumps: list[tuple[str, str]], history: int) -> list[list[int]]:
    """Prompts right after a bump, one per (observation, move) pair where the move bumps into a
    wall: that observation and that move as the last turn, then the same observation again."""
    prefix = prompt_prefix(tokenizer)
    seen = encode_observations(tokenizer, [o for o, _ in bumps])
    written = [action_ids_for(tokenizer, a) for _, a in bumps]
    return [history_prompt(prefix, [(o, a)], o, history) for o, a in zip(seen, written)]


@torch.no_grad()
def repeat_probability(model, tokenizer, bumps: list[tuple[str, str]], history: int) -> float:
    """The recovery probe: over states right after a bump (after_bump_prompts), the mean
    probability of bumping again,

        p_repeat = mean pi(move | [observation, move] as the last turn, then the same observation)

    With history = 0 the prompt is the observation alone: nothing tells the policy it just bumped,
    and p_repeat is the probability of the move at that state."""
    prompts = after_bump_prompts(tokenizer, bumps, history)
    written = [action_ids_for(tokenizer, a) for _, a in bumps]
    logps = sequence_logprobs(model, prompts, written, tokenizer.pad_token_id)  # (S,)
    return logps.exp().mean().item()


# ---- Training loop: warm-up, then GRPO iterations (rollout -> credit -> update -> log) ---------
def random_walk(env: toy_env.GridWorld, pos: tuple, steps: int, rng: np.random.Generator):
    """`steps` random moves from `pos` (bumps included, never onto the goal): the turns of a
    made-up history, as (observation, move) pairs, and the cell where it ends."""
    turns = []
    for _ in range(steps):
        options = [a for a in toy_env.ACTIONS if env.next_pos(pos, a) != env.goal]
        move = options[rng.integers(len(options))]
        turns.append((env.observation(pos), move))
        pos = env.next_pos(pos, move)
    return turns, pos


def sft_warmup(
    model,
    tokenizer,
    layouts: list[str],
    steps: int,
    lr: float,
    batch: int,
    rng: np.random.Generator,
    history: int = 0,
) -> list[float]:
    """Supervised warm-up: maximise log pi(oracle move | random state), action tokens only.
    With history > 0 each prompt is in the format RL will show: a random walk of 0..history turns
    (bumps included; never more than an episode can have) leads to the state, so RL does not
    start out of distribution."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    device = next(model.parameters()).device
    prefix = prompt_prefix(tokenizer)
    losses = []
    for _ in range(steps):
        prompts, targets = [], []
        for env in (envs[k] for k in rng.integers(len(envs), size=batch)):
            pos = env.free_cells()[rng.integers(len(env.free_cells()))]  # a random state
            walked = []
            if history:  # an episode has at most max_steps - 1 turns before its last move
                longest = min(history, env.max_steps - 1)
                walked, pos = random_walk(env, pos, int(rng.integers(longest + 1)), rng)
            good = env.good_actions(pos)
            turns = [
                (encode_observations(tokenizer, [seen])[0], action_ids_for(tokenizer, move))
                for seen, move in walked
            ]
            observation_ids = encode_observations(tokenizer, [env.observation(pos)])[0]
            prompts.append(history_prompt(prefix, turns, observation_ids, history))
            targets.append(action_ids_for(tokenizer, good[rng.integers(len(good))]))  # a good move
        ids, attention, action_mask = build_batch(
            prompts, targets, tokenizer.pad_token_id, device
        )  # (n, T) each
        nll = -(token_logprobs(model, ids, attention) * action_mask).sum() / action_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        nll.backward()
        optimizer.step()
        losses.append(nll.item())
    return losses


@torch.no_grad()
def greedy_episodes(
    model,
    tokenizer,
    layouts: list[str],
    max_action_tokens: int,
    seed: int,
    self_check: int = 0,
    temperature: float = 1.0,
    history: int = 0,
):
    """One greedy episode per layout: (moves, rewards (B, 1), envs); restores the train/eval mode
    it found. With self_check = K, a move the actor's own verdict calls bad is resampled (at
    `temperature`, from a generator seeded with `seed`) up to K times."""
    was_training = model.training
    model.eval()

    def judge(prompts, actions):
        return verdict_is_good(model, tokenizer, prompts, actions).tolist()

    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    played = rollout(
        model,
        tokenizer,
        layouts,
        1,
        max_action_tokens,
        temperature,
        greedy=True,
        generator=generator,
        judge=judge,
        tries=self_check,
        history=history,
    )
    model.train(was_training)
    return played


def evaluate(
    model,
    tokenizer,
    layouts: list[str],
    max_action_tokens: int,
    seed: int,
    self_check: int = 0,
    temperature: float = 1.0,
    history: int = 0,
) -> float:
    """Greedy success rate, one episode per layout (see greedy_episodes)."""
    _, rewards, _ = greedy_episodes(
        model, tokenizer, layouts, max_action_tokens, seed, self_check, temperature, history
    )
    return rewards.mean().item()


def task_sets(s: Settings) -> tuple[list[str], dict[str, list[str]]]:
    """The fixed train layouts; eval sets: the first `eval_tasks` of them (in-domain) and as many
    unseen held-out layouts."""
    pool = toy_env.sample_layouts("train", s.train_tasks, seed=s.data_seed)
    held_out = toy_env.sample_layouts("held_out", s.eval_tasks, seed=s.data_seed)
    return pool, {"train": pool[: s.eval_tasks], "held_out": held_out}


def all_observations(layouts: list[str]) -> list[str]:
    """The observation of every state the agent can stand in, over all `layouts`."""
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    return [env.observation(pos) for env in envs for pos in env.free_cells()]


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


def measure(model, tokenizer, eval_sets: dict, s: Settings, log, it: int) -> dict:
    """Greedy success on both evaluation sets, how held-out episodes fail, then the probes; logs
    one line."""
    t = time.time()
    row = {}
    for split, layouts in eval_sets.items():
        moves, rewards, envs = greedy_episodes(
            model, tokenizer, layouts, s.max_action_tokens, s.seed, history=s.history
        )
        row[f"eval_{split}_success"] = rewards.mean().item()
        if split == "held_out":
            row.update(failure_anatomy(moves, envs))
    if s.self_check and it == s.iters:  # at the end only: costly, and final
        row["eval_held_out_success_self_check"] = evaluate(
            model,
            tokenizer,
            eval_sets["held_out"],
            s.max_action_tokens,
            s.seed,
            s.self_check,
            s.temperature,
            s.history,
        )
    row["eval_s"] = time.time() - t
    start_states = {}  # split -> [(observation, good moves)] at the start of its first layouts
    for split, layouts in eval_sets.items():
        envs = [toy_env.GridWorld.from_string(x) for x in layouts[: s.probe_states]]
        start_states[split] = [(env.observation(), env.good_actions()) for env in envs]
    pairs = []  # (obs_good, obs_flawed, move)
    for good_layout, flawed_layout, action in toy_env.coupled_pairs(
        "train", s.probe_pairs, s.data_seed
    ):
        good_obs = toy_env.GridWorld.from_string(good_layout).observation()
        flawed_obs = toy_env.GridWorld.from_string(flawed_layout).observation()
        pairs.append((good_obs, flawed_obs, action))
    row.update(flawed_mass(model, tokenizer, start_states["train"]))
    row.update(coupling_probe(model, tokenizer, pairs))
    row["cls_bacc_train"] = classification_bacc(model, tokenizer, start_states["train"])
    row["cls_bacc_held_out"] = classification_bacc(model, tokenizer, start_states["held_out"])
    bumps = bump_states("held_out", s.probe_states, s.data_seed)  # (observation, move, good)
    row["p_repeat_bump"] = repeat_probability(model, tokenizer, [b[:2] for b in bumps], s.history)
    after_bump = after_bump_prompts(tokenizer, [b[:2] for b in bumps], s.history)
    probe = [(o, good) for o, _, good in bumps]
    row["cls_bacc_after_bump"] = classification_bacc(model, tokenizer, probe, after_bump)
    row["probe_s"] = time.time() - t - row["eval_s"]
    shown = " | ".join(f"{k} {v:.4f}" for k, v in row.items() if not k.endswith("_s"))
    log(f"measure @ iter {it}: {shown}")
    return row


def oracle_labelled_pairs(moves: list[Move], tokenizer):
    """The upper bound only a toy allows: all 4 moves (in the action format) at every distinct
    prompt visited, labelled by the oracle (1 = good, 0 = bad): (prompts, actions, labels). With
    history a prompt is a (history, observation) pair: the verdict is read in the context the
    move was made in, and a cell reached along several paths appears once per path."""
    states = {tuple(m.prompt_ids): m.good_moves for m in moves}  # distinct visited states
    pairs = [(state, a) for state in states for a in toy_env.ACTIONS]
    prompts = [list(state) for state, _ in pairs]
    actions = [action_ids_for(tokenizer, a) for _, a in pairs]
    labels = torch.tensor([int(a in states[state]) for state, a in pairs], dtype=torch.long)
    return prompts, actions, labels


def sample_iteration(model, tokenizer, pool: list[str], s: Settings, rng, generator):
    """One iteration's rollouts: B layouts drawn from `pool` with `rng`, G episodes each."""
    picked = rng.choice(len(pool), size=s.tasks_per_iter, replace=False)  # (B,)
    layouts = [pool[k] for k in picked]
    return rollout(
        model,
        tokenizer,
        layouts,
        s.group_size,
        s.max_action_tokens,
        s.temperature,
        generator=generator,
        history=s.history,
    )


def rollout_stats(moves: list[Move], rewards: torch.Tensor, move_adv: torch.Tensor) -> dict:
    """What one iteration's rollouts look like, for the log (oracle labels: diagnostics only)."""
    off_format = [m.action is None and toy_env.parse_action(m.text) is not None for m in moves]
    label_wrong = [(a > 0) != m.good for m, a in zip(moves, move_adv.tolist()) if a != 0]
    return {
        "success": rewards.mean().item(),
        "moves": len(moves),
        "valid_frac": float(np.mean([m.action is not None for m in moves])),
        "off_format_frac": float(np.mean(off_format)),
        "good_frac": float(np.mean([m.good for m in moves])),
        "mixed_groups": (rewards.std(dim=1) > 0).float().mean().item(),
        "adv_abs_mean": move_adv.abs().mean().item(),
        **flawed_step_stats(moves, move_adv),
        "cls_label_noise": float(np.mean(label_wrong)) if label_wrong else math.nan,
    }


def log_line(row: dict, s: Settings) -> str:
    """The fixed-format line printed for each iteration."""
    parts = [
        f"it {row['iter']:3d}/{s.iters}",
        f"succ {row['success']:.2f}",
        f"valid {row['valid_frac']:.2f}",
        f"good {row['good_frac']:.2f}",
        f"mixed {row['mixed_groups']:.2f}",
        f"lr {row['lr']:.1e}",
        f"loss {row['loss']:+.4f}",
        f"clip {row['clip_frac']:.2f}",
        f"A flawed {row['adv_flawed_mean']:+.2f} good {row['adv_good_mean']:+.2f}"
        f" (flawed A>0 {row['flawed_pos_adv_frac']:.2f})",
    ]
    if s.cls_coef:
        parts.append(f"cls {row['cls_loss']:.3f}")
    parts.append(f"roll {row['rollout_s']:.2f}s upd {row['update_s']:.2f}s")
    return " | ".join(parts)


def warm_start(model, tokenizer, s: Settings, log=print) -> dict:
    """The supervised warm-up, done to `model` in place. Returns its weights and time, and the
    state of the numpy rng that RL goes on from: everything before RL, which the arms of one seed
    in experiments.py share."""
    rng = np.random.default_rng(s.seed)  # tasks, warm-up states, minibatch order
    t = time.time()
    pool = task_sets(s)[0]
    losses = sft_warmup(model, tokenizer, pool, s.sft_steps, s.sft_lr, s.sft_batch, rng, s.history)
    if losses:
        took = time.time() - t
        log(f"warm-up: {s.sft_steps} steps, nll {losses[0]:.3f} -> {losses[-1]:.3f} ({took:.1f}s)")
    return {"policy": model.state_dict(), "rng": rng.bit_generator.state, "sft_s": time.time() - t}


def load_policy(s: Settings, device: torch.device):
    """(model, tokenizer) for these settings, the model checked to hold the longest sequence."""
    tokenizer = load_tokenizer(s.model)
    return load_model(s, tokenizer, positions_for(s, tokenizer), device), tokenizer


def positions_for(s: Settings, tokenizer) -> int:
    """The longest sequence this run reads, over every state of its layouts. A prompt holds at
    most (longest budget - 1) turns of history: a larger --history adds nothing."""
    pool, eval_sets = task_sets(s)
    layouts = pool + eval_sets["held_out"]
    longest_budget = max(toy_env.GridWorld.from_string(x).max_steps for x in layouts)
    history_turns = min(s.history, longest_budget - 1)
    observations = all_observations(layouts)
    return positions_needed(tokenizer, observations, s.max_action_tokens, history_turns)


def train(s: Settings, out_dir: str, log=print, start: dict | None = None):
    """Warm-up (or `start`, a warm_start of these settings), then `s.iters` GRPO iterations, each
    a line of metrics.jsonl. Returns (model, tokenizer, summary)."""
    begin = time.time()
    device = resolve_device(s.device)
    model, tokenizer = load_policy(s, device)
    # Dropout off for the whole run (as TRL does): the policy that samples, whose log-probs are
    # recorded, must be the very function the loss scores. Gradients flow in eval mode all the same.
    model.eval()
    pool, eval_sets = task_sets(s)
    num_params = sum(p.numel() for p in model.parameters())
    log(
        f"policy: {s.model or TINY_NAMES[s.tiny_arch]}, {num_params:,} parameters, on {device}; "
        f"{len(pool)} train layouts; greedy evaluation on {len(eval_sets['train'])} in-domain "
        f"and {len(eval_sets['held_out'])} held-out layouts"
    )
    start = start or warm_start(model, tokenizer, s, log)
    model.load_state_dict(start["policy"])  # a copy onto itself unless `start` was given
    rng = np.random.default_rng()
    rng.bit_generator.state = start["rng"]  # as the warm-up left it: same runs either way
    generator = torch.Generator(device=device).manual_seed(s.seed)  # rollout sampling
    ref_model = copy.deepcopy(model) if s.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr)
    measured = {0: measure(model, tokenizer, eval_sets, s, log, 0)}
    rows = []
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    with open(metrics_path, "w", buffering=1) as metrics_file:  # line-buffered: on disk at once
        for it in range(1, s.iters + 1):
            t0 = time.time()
            moves, rewards, envs = sample_iteration(model, tokenizer, pool, s, rng, generator)
            t1 = time.time()
            prompts = [m.prompt_ids for m in moves]
            actions = [m.action_ids for m in moves]
            episodes = [m.episode for m in moves]
            anchors = None  # GiGPO's step groups: (task, current observation)
            if s.step_credit_coef:
                anchors = step_anchors(episodes, [m.observation_ids for m in moves], s.group_size)
            move_adv = move_advantages(
                rewards, episodes, anchors, s.step_credit_coef, s.gamma, s.scale_by_std
            )  # (N,)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(it, s.lr, s.lr_warmup_iters, s.iters)
            cls_set = None
            if s.cls_coef > 0:
                if s.cls_labels == "advantage":
                    labelled = advantage_labelled_pairs(prompts, actions, move_adv)
                else:
                    labelled = oracle_labelled_pairs(moves, tokenizer)
                cls_prompts, cls_actions, cls_labels = labelled
                pick = rng.permutation(len(cls_prompts))[: s.cls_samples]  # at random, capped
                cls_set = (
                    [cls_prompts[k] for k in pick],
                    [cls_actions[k] for k in pick],
                    cls_labels[pick],
                )
            stats = grpo_update(
                model,
                tokenizer,
                prompts,
                actions,
                [m.sample_logps for m in moves],
                move_adv,
                optimizer,
                rng,
                clip_eps=s.clip_eps,
                epochs=s.epochs,
                minibatch_moves=s.minibatch_moves,
                temperature=s.temperature,
                ref_model=ref_model,
                kl_coef=s.kl_coef,
                cls_set=cls_set,
                cls_coef=s.cls_coef,
            )
            row = {
                "iter": it,
                **rollout_stats(moves, rewards, move_adv),
                "lr": optimizer.param_groups[0]["lr"],
                **stats,
                "rollout_s": round(t1 - t0, 3),
                "update_s": round(time.time() - t1, 3),
            }
            if it % s.eval_every == 0 or it == s.iters:
                measured[it] = measure(model, tokenizer, eval_sets, s, log, it)
                row.update(measured[it])
            rows.append(row)
            without_nan = {k: None if v != v else v for k, v in row.items()}  # NaN -> null
            metrics_file.write(json.dumps(without_nan) + "\n")
            log(log_line(row, s))
            if s.render_every and it % s.render_every == 0:
                log(f"-- a sampled episode at iter {it} --\n" + render_episode(moves, envs[0], 0))
    return model, tokenizer, summarise(measured, rows, start["sft_s"], begin)


def summarise(measured: dict, rows: list[dict], sft_s: float, begin: float) -> dict:
    """summary.json: the last measure, the first one, and the run's totals."""
    last = measured[max(measured)]
    timing = {"sft_s": sft_s}
    for key in ("rollout_s", "update_s", "eval_s", "probe_s"):
        timing[key] = sum(r.get(key, 0.0) for r in [measured[0], *rows])
    no_signal = float(np.mean([r["mixed_groups"] == 0 for r in rows])) if rows else math.nan
    over_run = {}  # over all iterations, under the advantage actually used
    for key in ("adv_flawed_mean", "adv_abs_mean", "flawed_pos_adv_frac"):
        over_run[key] = float(np.nanmean([r[key] for r in rows])) if rows else math.nan
    return {
        "eval_train_success": last["eval_train_success"],
        "eval_held_out_success": last["eval_held_out_success"],
        "start": measured[0],
        "end": last,
        "no_signal_iters_frac": no_signal,
        "decisions_per_second": sum(r["moves"] for r in rows) / max(timing["rollout_s"], 1e-9),
        **{k: round(v, 2) for k, v in timing.items()},
        "wall_seconds": round(time.time() - begin, 2),
        "torch_threads": torch.get_num_threads(),
        "over_run": over_run,
    }


def run(s: Settings, out_dir: str, log=print, start: dict | None = None) -> dict:
    """One training run: settings.json first, metrics.jsonl as it goes, then policy/ and
    summary.json."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    if s.model:  # a model too short for this run is refused before anything is written
        config = AutoConfig.from_pretrained(s.model)
        check_positions(s, config, positions_for(s, load_tokenizer(s.model)))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "settings.json"), "w") as f:
        json.dump(dataclasses.asdict(s), f, indent=1)
    model, tokenizer, summary = train(s, out_dir, log, start)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar
    model.save_pretrained(os.path.join(out_dir, "policy"))
    tokenizer.save_pretrained(os.path.join(out_dir, "policy"))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump({**summary, "settings": dataclasses.asdict(s)}, f, indent=1)
    log(
        f"done in {summary['wall_seconds']:.0f}s: greedy success "
        f"train {summary['eval_train_success']:.2f}, "
        f"held-out {summary['eval_held_out_success']:.2f}; "
        f"{summary['no_signal_iters_frac']:.0%} of iterations had no mixed group; "
        f"{summary['decisions_per_second']:.0f} decisions/s in rollouts; outputs in {out_dir}/"
    )
    return summary


# ---- Command line -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    s = parse_settings(argv)
    print("settings: " + json.dumps(dataclasses.asdict(s)))
    out_dir = s.out_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-seed{s.seed}")
    try:
        run(s, out_dir)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
