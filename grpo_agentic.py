"""Agentic GRPO on a text gridworld, in one file: a teaching reference for arXiv 2509.23870.

    pip install -r requirements.txt && python grpo_agentic.py    # about 2 minutes on 2 CPU cores
    python grpo_agentic.py --help                                # every setting, with its meaning
    python grpo_agentic.py --model runs/<run>/policy --iters 0 --sft-steps 0   # evaluate a policy

A tiny Llama (built from a config: nothing is downloaded) is warm-started on oracle moves, then
trained with GRPO. Each iteration it plays G episodes on each of B layouts; every turn it reads the
grid as text (with --history H, also its last H turns) and *writes* its move; the reward is 1 if the
goal is reached within the budget, else 0. Every move inherits its episode's advantage: the reward
standardised within its group of G. With --cls-coef the actor also learns to judge its own moves
good or bad (the paper's classification objective, GCD: Generative Classification Disentanglement).
Every --eval-every iterations: greedy success on seen and unseen layouts, the verdict's accuracy
and the gradient-coupling probe. `--model` trains a pretrained causal LM instead (a .gguf too).

Sections follow the data: settings -> model and prompts -> rollout -> advantages -> loss ->
classification -> update -> diagnostics -> training loop -> command line. `CORE` marks what is
worth copying: those functions take a model, a tokenizer, ids, tensors and plain numbers, never
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
    out_dir: str = arg("", "where the run's files go ('' = runs/<time>-seed<seed>)")
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
        for name in ("lr", "sft_lr", "temperature"):
            value = getattr(self, name)
            rules[name] = (value > 0 and math.isfinite(value), "a positive number")
        at_least = {
            1: "tasks_per_iter epochs minibatch_moves max_action_tokens sft_batch eval_every "
            "eval_tasks cls_samples probe_pairs probe_states tiny_layers tiny_dim",
            0: "iters data_seed lr_warmup_iters clip_eps kl_coef history sft_steps render_every "
            "cls_coef",
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


class NonFiniteError(RuntimeError):
    """A loss or the logits became NaN/inf: stop rather than train on garbage."""


# ---- Model, tokenizer, and CORE: prompts as ids -----------------------------------------------
# The verdict (GCD): after a move the text " verdict:" is appended, and the actor's own LM head
# scores the verdict words. Listed by label, so that verdict column c is label c everywhere.
VERDICT_QUERY = " verdict:"
VERDICTS = (" bad", " good")
BAD, GOOD = 0, 1
# Chat prompts (--chat, for instruct models): the task in words, as the system message; the
# verdict is asked as a user turn after the move and answered as the assistant's next turn.
CHAT_SYSTEM = (
    "You move the agent A on a grid to the goal G. '#' is a wall, '.' is floor, and everything "
    "outside the grid is wall too. Each turn you see the grid; answer with one word: up, down, "
    "left or right."
)
CHAT_VERDICT_QUESTION = "Was your last move good or bad? Answer with one word."
CHAT_VERDICTS = ("bad", "good")  # listed by label, as VERDICTS


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
    if arch not in ("gpt2", "llama"):
        raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")
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


def action_ids_for(tokenizer, action: str, chat: bool = False) -> list[int]:
    """The one action format, as ids: ' left' + end-of-text in a plain prompt, 'left' + end-of-text
    in a chat (where the assistant's turn starts on a line of its own, and end-of-text is the
    end-of-turn token: see chat_format). A rollout takes exactly these ids as a well-formed move,
    so every probe that scores this sequence scores what the policy really does."""
    text = action if chat else " " + action
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def prompt_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text: Llama's <s>, nothing for GPT-2's.
    Read off a word encoded with and without them, so that a token it adds *after* a text (an
    end-of-text some tokenizers append) never lands in front of every prompt."""
    plain = tokenizer("A", add_special_tokens=False)["input_ids"]
    marked = tokenizer("A", add_special_tokens=True)["input_ids"]
    starts = [k for k in range(len(marked)) if marked[k : k + len(plain)] == plain]
    return marked[: starts[0]] if starts else []


def encode_observations(tokenizer, observations: list[str]) -> list[list[int]]:
    """Each observation's ids, no special tokens: encoded once, then only ever concatenated."""
    if not observations:  # a tokenizer fails on an empty batch
        return []
    return tokenizer(observations, add_special_tokens=False)["input_ids"]


@dataclass
class PromptFormat:
    """The ids that frame observations and moves. A prompt with the last turns of an episode is

        prefix + [obs + after_observation + move + after_move] per past turn
               + obs + after_observation

    and a verdict is asked by appending verdict_query after a move. Plain text (the built-in
    model): prefix = the tokenizer's start tokens, nothing between turns. Chat: the pieces of the
    tokenizer's own chat template (chat_format). Every piece is encoded once; prompts are only ever
    concatenated ids (token-in/token-out)."""

    prefix: list[int]
    after_observation: list[int]
    after_move: list[int]
    turn_end: list[int]  # chat: [end-of-turn], added to a move cut off by the token budget
    verdict_query: list[int]
    verdicts: list[list[int]]  # the verdict words' ids, listed by label: column c is label c


def plain_format(tokenizer) -> PromptFormat:
    """Bare text: the observation ends in 'action:', the move follows, then the next observation."""
    return PromptFormat(
        prefix=prompt_prefix(tokenizer),
        after_observation=[],
        after_move=[],
        turn_end=[],
        verdict_query=tokenizer(VERDICT_QUERY, add_special_tokens=False)["input_ids"],
        verdicts=[tokenizer(w, add_special_tokens=False)["input_ids"] for w in VERDICTS],
    )


def chat_format(tokenizer) -> PromptFormat:
    """The pieces of the tokenizer's chat template, cut out of one render of a two-turn chat with
    placeholder texts: [system: CHAT_SYSTEM, user: O1, assistant: M1, user: O2] and the generation
    prompt. For ChatML (SmolLM2, Qwen2.5):

        prefix            '<|im_start|>system\\n{CHAT_SYSTEM}<|im_end|>\\n<|im_start|>user\\n'
        after_observation '<|im_end|>\\n<|im_start|>assistant\\n'   (the generation prompt)
        after_move        '\\n<|im_start|>user\\n'   (the move's own ids end in '<|im_end|>')

    The sampler stops at end-of-text, so the template's end-of-turn token must be the tokenizer's
    eos_token; what follows it goes into after_move. The rendered text is encoded without special
    tokens added: a start token the template writes is not doubled. A template that renders turns
    some other way (a system prompt it rewrites per turn, a reasoning block) is refused."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat template: use plain prompts (chat off) or set one"
        )
    o1, m1, o2 = "OBSERVATION_ONE", "MOVE_ONE", "OBSERVATION_TWO"  # placeholders

    def render(messages: list[tuple[str, str]]) -> str:
        conversation = [{"role": role, "content": text} for role, text in messages]
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True
        )

    system = ("system", CHAT_SYSTEM)
    two_turns = render([system, ("user", o1), ("assistant", m1), ("user", o2)])
    head, _, rest = two_turns.partition(o1)
    after_observation, _, rest = rest.partition(m1)
    after_move, _, tail = rest.partition(o2)
    end = tokenizer.eos_token
    if tail != after_observation or render([system, ("user", o1)]) != head + o1 + tail:
        raise ValueError("this chat template does not render turns as fixed pieces around them")
    if not after_move.startswith(end):
        raise ValueError(
            f"the chat template ends an assistant turn with {after_move[:12]!r}, not with the "
            f"tokenizer's end-of-text {end!r}: set tokenizer.eos_token to its end-of-turn token"
        )

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    after_move = after_move[len(end) :]
    return PromptFormat(
        prefix=ids(head),
        after_observation=ids(after_observation),
        after_move=ids(after_move),
        turn_end=[tokenizer.eos_token_id],
        verdict_query=ids(after_move + CHAT_VERDICT_QUESTION + after_observation),
        verdicts=[ids(w) for w in CHAT_VERDICTS],
    )


def prompt_format(tokenizer, chat: bool) -> PromptFormat:
    return chat_format(tokenizer) if chat else plain_format(tokenizer)


def closed(move: list[int], fmt: PromptFormat) -> list[int]:
    """A move as it stands in a later prompt: its ids as sampled, and in a chat an end-of-turn
    token after a move that the token budget cut off (the template closes every turn)."""
    if fmt.turn_end and move[-len(fmt.turn_end) :] != fmt.turn_end:
        return move + fmt.turn_end
    return move


def history_prompt(
    fmt: PromptFormat, turns: list[tuple], observation_ids: list[int], history: int
) -> list[int]:
    """The prompt of one move, as ids: the last `history` turns of the episode, then what the agent
    sees now. `turns` holds (observation ids, action ids as sampled) pairs, oldest first:

        prompt = prefix + obs_{t-H} + act_{t-H} + ... + obs_{t-1} + act_{t-1} + obs_t

    with the format's pieces between them (PromptFormat; none in plain text). Token-in/token-out:
    the actions are the ids the policy wrote, never decoded text encoded again (which can give
    other ids: ' le' + 'ft' decodes to ' left', one token when encoded again).

    >>> fmt = PromptFormat([9], [], [], [], [], [])
    >>> history_prompt(fmt, [([1, 2], [5, 0]), ([1, 3], [6, 0])], [1, 4], history=1)
    [9, 1, 3, 6, 0, 1, 4]
    """
    ids = list(fmt.prefix)
    for seen, written in turns[max(0, len(turns) - history) :] if history else []:
        ids += seen + fmt.after_observation + closed(written, fmt) + fmt.after_move
    return ids + observation_ids + fmt.after_observation


def no_history_prompts(tokenizer, observations: list[str], chat: bool = False) -> list[list[int]]:
    """Prompts of the current observation alone (history 0)."""
    fmt = prompt_format(tokenizer, chat)
    return [history_prompt(fmt, [], ids, 0) for ids in encode_observations(tokenizer, observations)]


def positions_needed(
    tokenizer, layouts: list[str], max_action_tokens: int, history: int, chat: bool = False
) -> int:
    """The longest sequence a run on `layouts` reads: its longest prompt (the history's turns of
    the longest observation and action, then the longest observation), a whole action (generated,
    or in the action format the probes score), the verdict query and the longest verdict word.
    A prompt holds at most (longest budget - 1) turns: a larger history adds nothing."""
    fmt = prompt_format(tokenizer, chat)
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    observations = [env.observation(pos) for env in envs for pos in env.free_cells()]
    longest_observation = max(len(ids) for ids in encode_observations(tokenizer, observations))
    probed = max(len(action_ids_for(tokenizer, a, chat)) for a in toy_env.ACTIONS)  # probes score
    longest_action = max(max_action_tokens + len(fmt.turn_end), probed)
    turns = min(history, max(env.max_steps for env in envs) - 1)
    framed = longest_observation + len(fmt.after_observation)  # an observation in its frame
    turn = framed + longest_action + len(fmt.after_move)
    longest_prompt = len(fmt.prefix) + turns * turn + framed
    verdict = max(len(ids) for ids in fmt.verdicts)
    return longest_prompt + longest_action + len(fmt.verdict_query) + verdict


def gguf_to_folder(path: str, cache: str, log=print) -> str:
    """The float32 folder of the model in a .gguf file, made on first use in `cache` and reused
    (found by the file's name: a file of the same name is taken for the same model). transformers
    dequantises a GGUF on loading but will not save a model so loaded; its weights are copied into
    a plain model of the same config, which saves and loads as any other."""
    folder = os.path.join(cache, os.path.basename(path).removesuffix(".gguf") + "-float32")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    import importlib.util

    if not all(importlib.util.find_spec(name) for name in ("gguf", "accelerate")):
        raise ValueError(
            f"--model {path}: reading .gguf needs two packages: pip install gguf accelerate"
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
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--model {s.model}: its tokenizer has no end-of-text token")
    if tokenizer.pad_token_id is None:  # harmless: padding is always known from lengths and masks
        tokenizer.pad_token = tokenizer.eos_token
    positions = positions_needed(tokenizer, layouts, s.max_action_tokens, s.history, s.chat)
    most = getattr(AutoConfig.from_pretrained(name), "max_position_embeddings", None)
    if most is not None and most < positions:  # checked before the weights are loaded
        raise ValueError(
            f"--model {s.model} reads at most {most} positions; a prompt of --history "
            f"{s.history}, an action of --max-action-tokens {s.max_action_tokens} and the "
            f"verdict need {positions}"
        )
    torch.manual_seed(s.seed)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    return model.to(device), tokenizer


# ---- CORE: rollout -- all live episodes step together, one batched forward per token ----------
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
    """left_pad on the model's device, after the two checks a model of one's own can fail: a pad
    id inside its vocabulary (padding is masked, so end-of-text serves), and positions for the
    longest sequence plus `more_tokens` (a rotary model would read past them without an error)."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if pad_id is None or (vocab is not None and not 0 <= pad_id < vocab):
        raise ValueError(f"pad id {pad_id} is not a token of the model: pad with end-of-text")
    held = getattr(config, "max_position_embeddings", None)
    longest = max(len(x) for x in seqs) + more_tokens
    if held is not None and longest > held:
        raise ValueError(
            f"a prompt and its action need {longest} positions, the model holds {held}: "
            "shorten the history or the action budget"
        )
    return left_pad(seqs, pad_id, next(model.parameters()).device)


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
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; greedy=True takes argmax")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"the generator is on {generator.device}, the model on {device}: "
            "make it with torch.Generator(device=...)"
        )
    if model.training:
        warnings.warn("the model samples in train mode: dropout adds noise; call model.eval()")
    n = len(prompts)
    ids, mask, positions = model_inputs(model, prompts, tokenizer.pad_token_id, max_tokens)
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
        cache = getattr(out, "cache", None)
        if cache is None:
            raise ValueError(
                "the model returned no cache: transformers >= 5 takes cache= and returns "
                "out.cache (4.x: past_key_values)"
            )
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

    episode: int  # index into the rollout's environments (in a group-major batch: group = e // G)
    prompt_ids: list[int]  # everything the policy read: history, then the current observation
    observation_ids: list[int]  # the current observation alone
    action_ids: list[int]  # as sampled; end-of-text included when it was generated
    sample_logps: list[float]  # log pi(token) recorded while sampling, one per action id
    text: str  # decoded, for logs
    action: str | None  # what the parser made of the ids; None = off-format
    info: dict  # what the environment's step returned; an oracle's label is info["good"]


def exact_format_parser(tokenizer, actions: tuple[str, ...], chat: bool = False):
    """A parser of action ids: the action whose ids are exactly ' action' + end-of-text (see
    action_ids_for; 'action' + end-of-text in a chat), else None. Anything else, say
    'left \\n \\n', is off-format."""
    formats = {tuple(action_ids_for(tokenizer, a, chat)): a for a in actions}

    def parse(ids: list[int]) -> str | None:
        return formats.get(tuple(ids))

    parse.tokens_needed = max(len(ids) for ids in formats)  # rollout checks its budget against it
    return parse


def rollout(
    model,
    tokenizer,
    envs: list,
    parse,
    max_action_tokens: int,
    temperature: float,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    history: int = 0,
    sample=None,
    chat: bool = False,
):
    """Play one episode in each environment, all at once: (moves in the order played, rewards).

    envs: objects with reset() -> observation text and step(action) -> (observation text, reward,
    done, info). parse(action ids) -> the action given to step (None for off-format ids: step must
    take it and move nothing). rewards (len(envs),): each episode's summed rewards (an outcome
    reward: what its last step returned). Each prompt holds the episode's last `history` turns and
    the current observation (history_prompt); an observation is encoded once, and the actions in
    the history are the ids as sampled. `chat`: the prompt is the tokenizer's chat template of
    [system: CHAT_SYSTEM] + [user: observation, assistant: move] per past turn + [user: now],
    assembled from ids (chat_format); else plain text. `sample` (default: generate_actions) has
    its signature (the lab's self-check wraps it). Each step's info is kept with its move, never
    trained on. For GRPO pass the envs group-major (a task's G episodes side by side), so that
    rewards.view(B, G) holds one group per row, as move_advantages reads it."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-text token: set one (moves end with it)")
    if max_action_tokens < getattr(parse, "tokens_needed", 0):
        raise ValueError(
            f"max_action_tokens {max_action_tokens} is shorter than the action format "
            f"({parse.tokens_needed} tokens with end-of-text): no move could be well-formed"
        )
    if len({id(env) for env in envs}) < len(envs):
        raise ValueError("envs holds one environment several times: make one per episode")
    sample = sample or generate_actions
    fmt = prompt_format(tokenizer, chat)
    seen = encode_observations(tokenizer, [env.reset() for env in envs])  # current observation
    turns = [[] for _ in envs]  # per episode: (observation ids, action ids) of each turn so far
    rewards = torch.zeros(len(envs))  # (len(envs),)
    moves = []
    live = list(range(len(envs)))  # episodes still running
    while live:
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
    return moves, rewards


# ---- CORE: credit -- one advantage per episode, inherited by every move of it ------------------
def grpo_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6):
    """Group-relative advantage, (num_groups, G) -> (num_groups, G).

        A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps),   std with ddof=0 (population std)
        A_ij =  r_ij - mean_j r_ij                          if not scale_by_std (Dr. GRPO)

    A group whose rewards are all equal carries no signal and gets exactly 0 (never NaN).

    >>> grpo_advantages(torch.tensor([[1., 0., 0., 1.], [1., 1., 1., 1.]]))
    tensor([[ 1.0000, -1.0000, -1.0000,  1.0000],
            [ 0.0000,  0.0000,  0.0000,  0.0000]])

    A 1-D tensor is refused rather than read as one group: rollout returns (B*G,) rewards, and
    one baseline across all tasks is the silent result of a forgotten .view(B, G).
    """
    if rewards.dim() != 2:
        raise ValueError(
            f"rewards must be (num_groups, G), got {tuple(rewards.shape)}: "
            "use rewards.view(B, G), or rewards[None] for one group"
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

    rewards (B, G) is one outcome per episode; episodes[i] = e(i), the index in B*G of the episode
    move i belongs to. Every move inherits its episode's group-relative advantage: good and flawed
    moves of one episode get the same credit, and only the average over many episodes tells them
    apart (the paper's Lemma 3.1). GiGPO adds a step-level term to it: experiments.py.

    Two groups of two: episode 0 won in two moves, 1 lost in one; 2 and 3 both won (no signal).
    >>> move_advantages(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), [0, 1, 0, 2, 3])
    tensor([ 1.0000, -1.0000,  1.0000,  0.0000,  0.0000])
    """
    if set(map(int, episodes)) != set(range(rewards.numel())):  # rollout plays each at least once
        raise ValueError(
            f"episode ids must be 0..{rewards.numel() - 1}, each with a move: call rollout once "
            "on all B*G envs in group-major order (one call per group restarts the ids at 0)"
        )
    episode_adv = grpo_advantages(rewards, scale_by_std).flatten()  # (B*G,)
    return episode_adv[episodes]  # (N,) each move inherits its episode's


# ---- CORE: the loss -- a clipped surrogate over the action tokens ------------------------------
def action_token_logprobs(
    model, prompts: list[list[int]], actions: list[list[int]], pad_id: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(a_k | prompt, a_<k) of every action token, with logits at the action positions only:

        logp[i, k] = log softmax(logits / temperature)[a_ik]        (N, K), K = longest action

    and on_action (N, K), True on real action tokens. pi = softmax(logits / temperature): the loss
    must score the distribution the rollout sampled from, so there is no default temperature.

    Each prompt + action is left-padded (left_pad: positions count real tokens, as when sampling),
    so every action ends at the right edge: the last K + 1 positions hold the logits that predict
    every action token of the batch, and `logits_to_keep` makes the model build only those,
    (N, K + 1, V) instead of (N, T, V) -- for a 50k vocabulary and 256-token prompts, the memory
    of the whole update. Row i's action fills its last len(a_i) columns (right-aligned):

        prompts [[7, 8], [9]], actions [[1, 2], [3]]  ->  rows [7 8 1 2], [pad pad 9 3];
        logp[0] = [lp(1), lp(2)], logp[1] = [0, lp(3)]; on_action [[T, T], [F, T]]
    """
    device = next(model.parameters()).device
    k = max(len(a) for a in actions)
    sequences = [p + a for p, a in zip(prompts, actions)]
    ids, attention, positions = model_inputs(model, sequences, pad_id)  # (N, T) each
    out = model(
        input_ids=ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=False,  # one forward: a key/value cache would only hold memory
        logits_to_keep=k + 1,
    )
    logits = out.logits[:, -(k + 1) : -1].float() / temperature  # (N, K, V) predict the last K
    logp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, -k:, None]).squeeze(2)  # (N, K)
    lengths = torch.tensor([len(a) for a in actions], device=device)  # (N,)
    on_action = torch.arange(k, device=device)[None, :] >= k - lengths[:, None]  # (N, K)
    return logp.masked_fill(~on_action, 0.0), on_action


def sequence_logprobs(
    model, prompts: list[list[int]], actions: list[list[int]], pad_id: int, temperature: float
) -> torch.Tensor:
    """log pi(action | prompt) of each pair: the sum over the action's tokens, (N,). The probes
    and the verdict score the policy itself: temperature 1."""
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
):
    """PPO-clipped surrogate over the action tokens, token-level average, plus an optional KL.
    logp, old_logp, ref_logp and action_mask are (N, K), the action columns of
    action_token_logprobs (any (N, T) layout with its mask works the same); advantages (N,). Sums
    run over the action tokens t only (action_mask_t = 1), and n_tok is their count:

        ratio_t = exp(logp_t - old_logp_t)
        L_pg    = -(1 / n_tok) * sum_t min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A)
        KL      =  (1 / n_tok) * sum_t (exp(d_t) - d_t - 1),   d_t = ref_logp_t - logp_t
        L       = L_pg + kl_coef * KL

    The KL is Schulman's k3 estimator of KL(pi || pi_ref). Normaliser: every action token of the
    minibatch weighs the same, however the tokens split into moves and episodes. Masked positions
    (a shorter action's padding) are left out before any exp, so they can never overflow into NaN.
    Returns (L, info): info["pg_loss"] is L_pg alone, info["ratio_dev"] = max_t |ratio_t - 1|
    (0 when the sampler and the scorer agree)."""
    # Constants, or the ratio is 1 through the graph and the surrogate's gradient about 0:
    if old_logp.requires_grad or (ref_logp is not None and ref_logp.requires_grad):
        raise ValueError("old_logp and ref_logp: compute them under torch.no_grad() or .detach()")
    if old_logp.shape != logp.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"old_logp {tuple(old_logp.shape)} must be logp's (N, T) = {tuple(logp.shape)} "
            f"and advantages {tuple(advantages.shape)} must be (N,): one advantage per move"
        )
    if kl_coef > 0 and ref_logp is None:  # the KL would read 0.0: "no drift"
        raise ValueError("kl_coef > 0 needs ref_logp: pass the reference policy's log-probs")
    advantages = advantages.to(logp.device)  # (N,) wherever they were computed
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
    model, tokenizer, prompts: list[list[int]], actions: list[list[int]], chat: bool = False
) -> torch.Tensor:
    """The actor's own verdict on (state, move) pairs, read from its LM head (no new parameters):

        scores[i, c] = log p(verdict_c | prompt_i, action_i, query)      (N, 2)

    Plain prompts ask ' verdict:' straight after the move and read ' bad' / ' good'; a chat asks
    CHAT_VERDICT_QUESTION as the next user turn and reads 'bad' / 'good' as the reply (see
    PromptFormat). Column c is label c. A verdict of several tokens scores the sum of their
    log-probs; when each is one token, both are read at the one position after the query, one
    forward with the logits of that position alone."""
    if not prompts:
        raise ValueError("no (state, move) pairs to judge: the verdict needs at least one")
    fmt = prompt_format(tokenizer, chat)
    if fmt.verdicts[BAD] == fmt.verdicts[GOOD] or tokenizer.unk_token_id in sum(fmt.verdicts, []):
        raise ValueError("the tokenizer cannot write the verdict words: add them to its vocabulary")
    asked = [p + closed(a, fmt) + fmt.verdict_query for p, a in zip(prompts, actions)]
    pad = tokenizer.pad_token_id
    if all(len(v) == 1 for v in fmt.verdicts):
        ids, attention, positions = model_inputs(model, asked, pad)  # (N, T) each
        out = model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=False,
            logits_to_keep=1,
        )
        last = out.logits[:, -1].float()  # (N, V) after the query
        return torch.log_softmax(last, dim=-1)[:, [v[0] for v in fmt.verdicts]]  # (N, 2)
    scores = [sequence_logprobs(model, asked, [v] * len(asked), pad, 1.0) for v in fmt.verdicts]
    return torch.stack(scores, dim=1)  # (N, 2)


def verdict_is_good(
    model, tokenizer, prompts: list[list[int]], actions: list[list[int]], chat: bool = False
):
    """(N,) bool: does the actor's verdict call each move good? A tie counts as good."""
    scores = verdict_logits(model, tokenizer, prompts, actions, chat)  # (N, 2)
    return scores[:, GOOD] >= scores[:, BAD]


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the verdict, (N, 2) scores and (N,) labels (column = label) -> (), each
    class weighing the same whatever its count (unweighted, where most moves are good, "always
    good" would be a minimum):

        L = mean over the classes c present of ( mean_{i: y_i = c} -log softmax(logits_i)[y_i] )

    Two good moves scored log 2 each, one bad move scored log(1 + e^2):
    >>> logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    >>> round(balanced_cross_entropy(logits, torch.tensor([1, 1, 0])).item(), 4)
    1.41
    """
    if len(labels) == 0:  # the loss would be NaN (0 / 0)
        raise ValueError("no labelled pairs: skip the classification loss when there are none")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError(f"labels must be 0 (bad) or 1 (good), got {labels.unique().tolist()}")
    target = labels.to(logits.device).long()  # (N,) class ids, also from 0./1. or bools
    count = torch.bincount(target, minlength=2).float()  # (2,)
    weight = torch.where(count > 0, 1 / count.clamp(min=1), 0.0)  # (2,)
    return F.cross_entropy(logits, target, weight=weight)


def classification_loss(
    model,
    tokenizer,
    prompts: list[list[int]],
    actions: list[list[int]],
    labels: torch.Tensor,
    chat: bool = False,
) -> torch.Tensor:
    """Balanced cross-entropy of the actor's verdict on (state, move) pairs; labels 1 = good."""
    scores = verdict_logits(model, tokenizer, prompts, actions, chat)  # (N, 2)
    return balanced_cross_entropy(scores, labels)


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
    if not 1 <= it <= total:  # it = 0 would be a step of rate 0; past total the rate is negative
        raise ValueError(f"iteration {it} is outside 1..{total}: iterations are 1-based, 1..total")
    rising = it / warmup if warmup else 1.0
    falling = (total + 1 - it) / max(1, total + 1 - warmup)
    return peak * min(1.0, rising, falling)


RATIO_TOLERANCE = 1e-3  # the first minibatch's max |ratio - 1| when sampler and scorer agree


def grpo_update(
    model,
    tokenizer,
    prompts: list[list[int]],
    actions: list[list[int]],
    old_logps: list[list[float]],
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    *,
    temperature: float,
    clip_eps: float = 0.2,
    epochs: int = 1,
    minibatch_moves: int = 96,
    ref_model=None,
    kl_coef: float = 0.0,
    cls_set: tuple | None = None,
    cls_coef: float = 0.0,
    chat: bool = False,
) -> dict:
    """One GRPO update over the moves of an iteration; returns statistics for the log.

    Inputs, one entry per move: prompt ids, action ids (as sampled), the log-prob of each action id
    recorded while sampling (the *old* log-probs) and the move's advantage, (N,). `temperature`
    is the one the rollout sampled at (no default: a mismatch scores another distribution).

    Only moves with A != 0 enter the loss; the others have no gradient through the surrogate and,
    left in, would only dilute the token average (and take the KL where they carry no signal).
    `epochs` passes, each a fresh shuffle cut into minibatches of about `minibatch_moves` moves:
    one AdamW step per minibatch, gradient norm clipped at 1. With `cls_set` = (prompts, actions,
    labels) and cls_coef > 0, each step also takes its share of the classification pairs:
    L = L_pg + kl_coef * KL + cls_coef * L_cls (`chat`: the verdict is asked in the chat format).
    `rng` orders the minibatches; `tokenizer` gives the pad id and the verdict's words. The
    defaults are those of Settings.

    The first minibatch is scored by the very weights that sampled, so its ratio is 1 up to float
    error (ratio_dev_first); a deviation over RATIO_TOLERANCE warns, naming the usual causes."""
    device = next(model.parameters()).device
    cls_prompts, cls_actions, cls_labels = cls_set or ([], [], torch.zeros(0, dtype=torch.long))
    if (kl_coef > 0) != (ref_model is not None):
        raise ValueError("kl_coef > 0 needs a ref_model, and a ref_model needs kl_coef > 0")
    if (cls_coef > 0) != (cls_set is not None):
        raise ValueError("cls_coef > 0 needs a cls_set, and a cls_set needs cls_coef > 0")
    if [len(lp) for lp in old_logps] != [len(a) for a in actions]:
        raise ValueError("old_logps must hold one log-prob per action id of each move, as sampled")
    if not torch.is_tensor(advantages) or advantages.shape != (len(actions),):
        raise ValueError("advantages: one per move, (N,); see move_advantages")
    if ref_model is model:
        raise ValueError("ref_model is the policy itself: pass copy.deepcopy(model).eval()")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if any(id(p) not in held for p in model.parameters() if p.requires_grad):
        raise ValueError("the optimizer does not hold the model's trainable parameters")
    if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        warnings.warn(
            "the model's weights are not float32: small AdamW steps round away in bf16/fp16, "
            "and sampler and scorer disagree; load it with dtype=torch.float32",
            stacklevel=2,
        )
    signal = (advantages != 0).nonzero().flatten().tolist()  # indices of moves with A != 0
    steps = []
    for _ in range(epochs if signal or len(cls_prompts) else 0):
        parts = minibatches(len(signal), minibatch_moves, rng)  # [empty] when there is no signal
        cls_parts = np.array_split(rng.permutation(len(cls_prompts)), len(parts))
        for part, cls_part in zip(parts, cls_parts):
            loss = torch.zeros((), device=device)
            info = {"pg_loss": math.nan, "clip_frac": math.nan, "kl": math.nan}
            if len(part):
                idx = [signal[k] for k in part]
                batch_prompts = [prompts[i] for i in idx]
                batch_actions = [actions[i] for i in idx]
                pad = tokenizer.pad_token_id
                logp, on_action = action_token_logprobs(
                    model, batch_prompts, batch_actions, pad, temperature
                )  # (n, K) each, actions right-aligned
                old = torch.zeros_like(logp)  # (n, K)
                recorded = [lp for i in idx for lp in old_logps[i]]  # row by row, in token order
                old[on_action] = torch.tensor(recorded, device=device)
                ref = None
                if ref_model is not None:
                    with torch.no_grad():
                        ref, _ = action_token_logprobs(
                            ref_model, batch_prompts, batch_actions, pad, temperature
                        )  # (n, K)
                move_adv = advantages[idx].to(device)  # (n,)
                loss, info = grpo_loss(logp, old, move_adv, on_action, clip_eps, ref, kl_coef)
                if not steps and info["ratio_dev"] > RATIO_TOLERANCE:
                    warnings.warn(
                        f"the first minibatch's ratio is off 1 by {info['ratio_dev']:.3g}: the "
                        "scorer does not score what the sampler sampled (the same temperature? "
                        "dropout off: model.eval()? float32 weights? position_ids honoured?)",
                        stacklevel=2,
                    )
            cls_loss = None
            if len(cls_part):
                cls_loss = classification_loss(
                    model,
                    tokenizer,
                    [cls_prompts[k] for k in cls_part],
                    [cls_actions[k] for k in cls_part],
                    cls_labels[cls_part],
                    chat,
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


# ---- CORE: diagnostics -- the paper's claims, measured (oracle labels, never trained on) -------
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
    onehot = F.one_hot(torch.tensor(action, device=probs.device), len(probs)).to(probs.dtype)
    z = torch.log(probs) + lr * advantage * (onehot - probs)
    return torch.softmax(z, dim=0)


def action_logprobs(
    model, tokenizer, observations: list[str], actions: list[str], chat: bool = False
) -> torch.Tensor:
    """log pi(action | observation) of whole actions in the one action format, no history, (N,)."""
    prompts = no_history_prompts(tokenizer, observations, chat)
    action_ids = [action_ids_for(tokenizer, a, chat) for a in actions]
    return sequence_logprobs(model, prompts, action_ids, tokenizer.pad_token_id, 1.0)


def coupling_probe(model, tokenizer, pairs: list[tuple[str, str, str]], chat: bool = False) -> dict:
    """Gradient coupling between near-identical states, over (obs_good, obs_flawed, action)
    triples: the same move, good in the first observation and flawed in the second. Over the
    pairs, with g_x = grad_theta log pi(action | obs_x) (whole action, all parameters):

    coupling_cos   = cos(g_good, g_flawed)
    coupling_ratio = <g_good, g_flawed> / <g_good, g_good> = coupling_cos * |g_flawed| / |g_good|.
                     A small step theta += eta * g_good raises log pi(a|s_good) by eta*|g_good|^2
                     and log pi(a|s_flawed) by eta*<g_good, g_flawed> (first order): the ratio is
                     the share of the intended gain that leaks to the flawed twin. It can rise
                     while the cosine falls: as the good move becomes near-certain, |g_good|
                     shrinks. The median over pairs (one near-certain pair's ratio explodes).
    hidden_cos     = cos(h_good, h_flawed), last-layer hidden states where the move is predicted;
                     _move: at the move's last token (where a verdict is read); _centred:
                     after subtracting the probe's mean state, a component every grid shares.
    A pair with a zero gradient has no cosine (and, if it is g_good's, no ratio): left out.
    One pair has no hidden_cos_centred (NaN): centred on the mean of its own two states, the
    twins are each other's negative, a cosine of -1 by construction. Dot products and cosines
    are taken in float32 (in bfloat16, twins 0.999 alike read exactly 1.0).

    Uses torch.autograd.grad (never .grad) and changes no weight: model, gradients and optimiser
    are left as they were; so is the train/eval mode."""
    if not pairs:
        raise ValueError("coupling_probe needs at least one (obs_good, obs_flawed, action) pair")
    was_training = model.training
    model.eval()  # no dropout noise in the probe
    params = [p for p in model.parameters() if p.requires_grad]
    cosines, ratios, states, moves = [], [], [], []
    for obs_good, obs_flawed, action in pairs:
        observations = [obs_good, obs_flawed]
        logps = action_logprobs(model, tokenizer, observations, [action, action], chat)  # (2,)
        g_good = torch.cat(
            [g.flatten() for g in torch.autograd.grad(logps[0], params, retain_graph=True)]
        ).float()
        g_flawed = torch.cat([g.flatten() for g in torch.autograd.grad(logps[1], params)]).float()
        good_sq = (g_good @ g_good).item()
        flawed_sq = (g_flawed @ g_flawed).item()
        dot = (g_good @ g_flawed).item()
        if good_sq * flawed_sq > 0:
            cosines.append(dot / math.sqrt(good_sq * flawed_sq))
        if good_sq > 0:
            ratios.append(dot / good_sq)
        with torch.no_grad():  # left-padded: both rows end with the move's last token
            prompts = no_history_prompts(tokenizer, observations, chat)
            move = action_ids_for(tokenizer, action, chat)
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
    model.train(was_training)
    states = torch.stack(states)  # (pairs, 2, d)
    moves = torch.stack(moves)  # (pairs, 2, d)
    centred = states - states.mean(dim=(0, 1))  # (pairs, 2, d)

    def twin_cosine(h: torch.Tensor) -> float:
        return F.cosine_similarity(h[:, 0], h[:, 1], dim=1).mean().item()

    return {
        "coupling_cos": float(np.mean(cosines)) if cosines else math.nan,
        "coupling_ratio": float(np.median(ratios)) if ratios else math.nan,
        "hidden_cos": twin_cosine(states),
        "hidden_cos_move": twin_cosine(moves),
        "hidden_cos_centred": twin_cosine(centred) if len(pairs) > 1 else math.nan,
    }


def balanced_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present of the recall, (TPR + TNR) / 2: "always good" scores 0.5,
    whatever the share of good moves (plain accuracy would score that share).

    >>> balanced_accuracy(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 1, 0, 0]))
    0.75
    """
    labels = labels.to(predicted.device)  # (N,) beside the predictions, wherever they are
    recalls = [(predicted[labels == c] == c).float().mean().item() for c in labels.unique()]
    return float(np.mean(recalls))


@torch.no_grad()
def classification_bacc(
    model,
    tokenizer,
    prompts: list[list[int]],
    good_moves: list[tuple[str, ...]],
    chat: bool = False,
) -> float:
    """Balanced accuracy of the actor's verdict against the oracle. States are given as prompts
    (ids) and, for each, the moves the oracle calls good there; the verdict judges all 4 moves."""
    asked = [p for p in prompts for _ in toy_env.ACTIONS]
    actions = [action_ids_for(tokenizer, a, chat) for _ in prompts for a in toy_env.ACTIONS]
    labels = torch.tensor([int(a in good) for good in good_moves for a in toy_env.ACTIONS])
    predicted = verdict_is_good(model, tokenizer, asked, actions, chat).long().cpu()  # (S*4,)
    return balanced_accuracy(predicted, labels)


# ---- Training loop: warm-up, then GRPO iterations (rollout -> credit -> update -> log) ---------
def task_sets(train_tasks: int, eval_tasks: int, data_seed: int):
    """The fixed train layouts; eval sets: the first `eval_tasks` of them (in-domain) and as many
    unseen ("held-out") layouts, denser in walls."""
    pool = toy_env.sample_layouts("train", train_tasks, seed=data_seed)
    held_out = toy_env.sample_layouts("held_out", eval_tasks, seed=data_seed)
    return pool, {"train": pool[:eval_tasks], "held_out": held_out}


def sft_warmup(
    model,
    tokenizer,
    layouts: list[str],
    steps: int,
    lr: float,
    batch: int,
    rng: np.random.Generator,
    history: int = 0,
    chat: bool = False,
) -> list[float]:
    """Supervised warm-up: maximise log pi(oracle move | random state), action tokens only.
    With history > 0 each prompt is in the format RL will show: a random walk of 0..history turns
    (bumps included, never onto the goal, never more than an episode can have) leads to the state,
    so RL does not start out of distribution (`chat`: in the chat format). Returns the loss of
    each step: the mean NLL per action token."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    fmt = prompt_format(tokenizer, chat)
    losses = []
    for _ in range(steps):
        prompts, targets = [], []
        for env in (envs[k] for k in rng.integers(len(envs), size=batch)):
            pos = env.free_cells()[rng.integers(len(env.free_cells()))]  # a random state
            turns = []
            walk = int(rng.integers(min(history, env.max_steps - 1) + 1)) if history else 0
            for _ in range(walk):
                options = [a for a in toy_env.ACTIONS if env.next_pos(pos, a) != env.goal]
                move = options[rng.integers(len(options))]
                seen = encode_observations(tokenizer, [env.observation(pos)])[0]
                turns.append((seen, action_ids_for(tokenizer, move, chat)))
                pos = env.next_pos(pos, move)
            good = env.good_actions(pos)
            observation_ids = encode_observations(tokenizer, [env.observation(pos)])[0]
            prompts.append(history_prompt(fmt, turns, observation_ids, history))
            target = good[rng.integers(len(good))]  # a good move
            targets.append(action_ids_for(tokenizer, target, chat))
        logp, on_action = action_token_logprobs(
            model, prompts, targets, tokenizer.pad_token_id, temperature=1.0
        )  # (n, K) each
        nll = -logp.sum() / on_action.sum()  # per action token
        optimizer.zero_grad(set_to_none=True)
        nll.backward()
        optimizer.step()
        losses.append(nll.item())
    return losses


def warm_start(model, tokenizer, s: Settings, log=print) -> dict:
    """The supervised warm-up, done to `model` in place. Returns its weights and time, and the
    state of the numpy rng that RL goes on from: everything before RL (the lab shares it between
    the arms of one seed)."""
    rng = np.random.default_rng(s.seed)  # tasks, warm-up states, minibatch order
    t = time.time()
    pool, _ = task_sets(s.train_tasks, s.eval_tasks, s.data_seed)
    losses = sft_warmup(
        model, tokenizer, pool, s.sft_steps, s.sft_lr, s.sft_batch, rng, s.history, s.chat
    )
    if losses:
        took = time.time() - t
        log(f"warm-up: {s.sft_steps} steps, nll {losses[0]:.3f} -> {losses[-1]:.3f} ({took:.1f}s)")
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return {"policy": weights, "rng": rng.bit_generator.state, "sft_s": time.time() - t}


def sample_iteration(model, tokenizer, pool: list[str], s: Settings, rng, generator):
    """One iteration's rollouts: B layouts drawn from `pool` with `rng`, G episodes each, in
    group-major order: (moves, rewards (B, G), envs)."""
    picked = rng.choice(len(pool), size=s.tasks_per_iter, replace=False)  # (B,)
    envs = [toy_env.GridWorld.from_string(pool[k]) for k in picked for _ in range(s.group_size)]
    parse = exact_format_parser(tokenizer, toy_env.ACTIONS, s.chat)
    moves, rewards = rollout(
        model,
        tokenizer,
        envs,
        parse,
        s.max_action_tokens,
        s.temperature,
        generator=generator,
        history=s.history,
        chat=s.chat,
    )
    return moves, rewards.view(s.tasks_per_iter, s.group_size), envs  # rewards (B, G)


@torch.no_grad()
def greedy_episodes(model, tokenizer, layouts: list[str], s: Settings, sample=None):
    """One greedy episode per layout: (moves, rewards (B,), envs). A `sample` that resamples (the
    lab's self-check) draws at --temperature from a generator seeded with --seed."""
    envs = [toy_env.GridWorld.from_string(x) for x in layouts]
    device = next(model.parameters()).device
    moves, rewards = rollout(
        model,
        tokenizer,
        envs,
        exact_format_parser(tokenizer, toy_env.ACTIONS, s.chat),
        s.max_action_tokens,
        s.temperature if sample else 1.0,  # plain greedy: the argmax of the logits themselves
        greedy=True,
        generator=torch.Generator(device=device).manual_seed(s.seed),
        history=s.history,
        sample=sample,
        chat=s.chat,
    )
    return moves, rewards, envs


def measure(model, tokenizer, s: Settings, it: int, probes=(), log=print) -> dict:
    """Greedy success on both evaluation sets, the verdict's balanced accuracy against the oracle
    at start states, the coupling probe, then each of `probes`; logs one line.

    A probe is probe(model, tokenizer, it, played) -> dict of columns, where played[split] holds
    that split's greedy (moves, rewards, envs)."""
    t = time.time()
    row, played = {}, {}
    eval_sets = task_sets(s.train_tasks, s.eval_tasks, s.data_seed)[1]
    for split, layouts in eval_sets.items():
        played[split] = greedy_episodes(model, tokenizer, layouts, s)  # (moves, rewards, envs)
        row[f"eval_{split}_success"] = played[split][1].mean().item()
    row["eval_s"] = time.time() - t
    for split, layouts in eval_sets.items():  # the verdict at start states: all 4 moves each
        envs = [toy_env.GridWorld.from_string(x) for x in layouts[: s.probe_states]]
        prompts = no_history_prompts(tokenizer, [env.observation() for env in envs], s.chat)
        good_moves = [env.good_actions() for env in envs]
        row[f"cls_bacc_{split}"] = classification_bacc(
            model, tokenizer, prompts, good_moves, s.chat
        )
    pairs = []  # (obs_good, obs_flawed, move): grids one cell apart; the move is good in the first,
    # a bump into the wall that cell holds in the second (toy_env.coupled_pairs)
    for good, flawed, action in toy_env.coupled_pairs("train", s.probe_pairs, s.data_seed):
        good_obs = toy_env.GridWorld.from_string(good).observation()
        flawed_obs = toy_env.GridWorld.from_string(flawed).observation()
        pairs.append((good_obs, flawed_obs, action))
    row.update(coupling_probe(model, tokenizer, pairs, s.chat))
    for probe in probes:
        row.update(probe(model, tokenizer, it, played))
    row["probe_s"] = time.time() - t - row["eval_s"]
    shown = " | ".join(f"{k} {v:.4f}" for k, v in row.items() if not k.endswith("_s"))
    log(f"measure @ iter {it}: {shown}")
    return row


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


TIMES = ("rollout_s", "update_s", "eval_s", "probe_s")  # seconds, summed over the run


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
    num_params = sum(p.numel() for p in model.parameters())
    log(
        f"policy: {s.model or 'tiny ' + s.tiny_arch}, {num_params:,} parameters, on {device}; "
        f"{len(pool)} train layouts; greedy evaluation on "
        f"{len(eval_sets['train'])} in-domain and {len(eval_sets['held_out'])} held-out layouts"
    )
    start = start or warm_start(model, tokenizer, s, log)  # its weights: a copy, on the CPU
    model.load_state_dict(start["policy"])
    rng = np.random.default_rng()
    rng.bit_generator.state = start["rng"]  # as the warm-up left it: same runs either way
    generator = torch.Generator(device=device).manual_seed(s.seed)  # rollout sampling
    ref_model = copy.deepcopy(model) if s.kl_coef > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr)
    measured = {0: measure(model, tokenizer, s, 0, probes, log)}
    rows = []
    with open(os.path.join(out_dir, "metrics.jsonl"), "w", buffering=1) as metrics_file:
        for it in range(1, s.iters + 1):
            t0 = time.time()
            moves, rewards, envs = sample_iteration(model, tokenizer, pool, s, rng, generator)
            t1 = time.time()
            prompts = [m.prompt_ids for m in moves]
            actions = [m.action_ids for m in moves]
            if credit is None:
                move_adv = move_advantages(rewards, [m.episode for m in moves], s.scale_by_std)
            else:
                move_adv = credit(rewards, moves)  # (N,)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(it, s.lr, s.lr_warmup_iters, s.iters)
            cls_set = None
            if s.cls_coef > 0:
                if labeller is None:
                    labelled = advantage_labelled_pairs(prompts, actions, move_adv)
                else:
                    labelled = labeller(moves, move_adv, tokenizer)
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
                chat=s.chat,
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
                measured[it] = measure(model, tokenizer, s, it, probes, log)
                row.update(measured[it])
            rows.append(row)
            without_nan = {k: None if v != v else v for k, v in row.items()}  # NaN -> null
            metrics_file.write(json.dumps(without_nan) + "\n")
            log(log_line(row, s.iters))
            if s.render_every and it % s.render_every == 0:
                marks = {True: "+", False: "-"}  # the oracle's label, where the env gives one
                first = [m for m in moves if m.episode == 0]
                steps = [f"{m.text!r}{marks.get(m.info.get('good'), '')}" for m in first]
                outcome = "reached the goal" if rewards[0, 0] > 0 else "failed"
                log(f"-- a sampled episode at iter {it} (+ good, - flawed) --")
                log(f"{envs[0].to_string()}\n  moves: {' '.join(steps)}  -> {outcome}")
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
    model, tokenizer = load_policy(s, resolve_device(s.device), log)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "settings.json"), "w") as f:
        json.dump(dataclasses.asdict(s), f, indent=1)
    summary = train(model, tokenizer, s, out_dir, log, **extensions)
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
