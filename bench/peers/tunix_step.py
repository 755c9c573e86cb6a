"""tunix peer of bench/train_step.py: tunix's GRPO learner update on the issue-9 workload.

Runs inside the throwaway `tunix` virtualenv (pip `google-tunix`), never in jaxsd's .venv.
What is timed is exactly what tunix's GRPOLearner hands its actor trainer after rollout:
`tunix.rl.algo_core.grpo_loss_fn` (the registered "grpo" policy loss) on a fixed
`TrainExample` (B = 8 sequences, prompt 128 + completion 128), differentiated and applied by
`PeftTrainer`'s own jitted train step (nnx.value_and_grad + nnx.Optimizer, AdamW + clip).
tunix has no self-distillation (SDPO) loss, so its row is the GRPO learner step; no teacher
forward, top-k or EMA are in it (say so when comparing with an SDPO step).
Prints one JSON object; a failure records {"error": ...} with the exception instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
import workload as W
from flax import nnx


def make_model(shape: str, dtype: str = "float32") -> Any:
    """tunix's own Qwen3 (tunix.models.qwen3) with the workload's shape, untied head, fp32
    weights; `dtype` is the compute dtype (bfloat16 = bf16 matmuls over fp32 weights)."""
    from tunix.models.qwen3 import model as qwen3

    s = W.shape(shape)
    cfg = qwen3.ModelConfig(
        num_layers=s["num_hidden_layers"], vocab_size=s["vocab_size"],
        embed_dim=s["hidden_size"], hidden_dim=s["intermediate_size"],
        num_heads=s["num_attention_heads"], head_dim=s["head_dim"],
        num_kv_heads=s["num_key_value_heads"], rope_theta=1_000_000, norm_eps=1e-6,
        use_tied_embedding=False, dtype=jnp.dtype(dtype), param_dtype=jnp.float32,
    )  # fmt: skip
    return qwen3.Qwen3(cfg, rngs=nnx.Rngs(W.SEED))


def make_example(vocab: int) -> Any:
    """A fixed GRPO TrainExample: random prompts/completions (ids >= 2: 0 = pad, 1 = eos)."""
    from tunix.rl.grpo.grpo_learner import TrainExample

    b, p, r = W.BATCH, W.PROMPT, W.RESPONSE
    k1, k2, k3 = jax.random.split(jax.random.key(W.SEED), 3)
    return TrainExample(
        prompt_ids=jax.random.randint(k1, (b, p), 2, vocab),
        prompt_mask=jnp.ones((b, p), jnp.int32),
        completion_ids=jax.random.randint(k2, (b, r), 2, vocab),
        completion_mask=jnp.ones((b, r), jnp.int32),
        advantages=jnp.linspace(-1.0, 1.0, b),
        ref_per_token_logps=None,
        old_per_token_logps=-jax.random.uniform(k3, (b, r)) * math.log(vocab),
    )


def grpo_step(shape: str, dtype: str = "float32") -> Any:
    from tunix.rl import algo_core
    from tunix.rl.grpo.grpo_learner import GRPOConfig
    from tunix.sft import peft_trainer

    model = make_model(shape, dtype)
    example = make_example(model.config.vocab_size)
    algo = GRPOConfig(num_generations=W.BATCH, beta=0.0, epsilon=0.2, loss_agg_mode="token-mean")
    algo.temperature = 1.0  # GRPOLearner copies this in from its rollout config; no rollout here
    tx = optax.chain(
        optax.clip_by_global_norm(W.GRAD_CLIP),
        optax.adamw(W.LR, weight_decay=W.WEIGHT_DECAY),
    )
    trainer = peft_trainer.PeftTrainer(
        model, tx, peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=10**6)
    )

    def loss_fn(model, train_example):  # what GRPOLearner registers with its actor trainer
        return algo_core.grpo_loss_fn(model, train_example, algo_config=algo, pad_id=0, eos_id=1)

    trainer.with_loss_fn(loss_fn, has_aux=True)
    trainer.with_gen_model_input_fn(lambda x: {"train_example": x})
    train_step, _ = trainer.jit_train_and_eval_step()
    return lambda: jax.block_until_ready(train_step(example))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(W.SHAPES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype; the weights stay float32")  # fmt: skip
    args = ap.parse_args()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            times = W.time_steps(grpo_step(args.shape, args.dtype), args.steps, args.warmup)
            stats = jax.devices()[0].memory_stats() or {}
            peak = {"device_peak_bytes": stats["peak_bytes_in_use"]} if stats else {}
            result = W.step_record(times, algorithm="grpo", **peak)
    except Exception as e:  # an API tunix moved is a result to report, not a crash
        result = W.error_record(e)
    W.emit({
        "peer": "tunix", "shape": args.shape, "dtype": args.dtype,
        "layers": W.shape(args.shape)["num_hidden_layers"],
        "versions": W.versions("google-tunix", "jax", "flax", "optax"),
        "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
        "cpu_count": os.cpu_count(),
        "variants": {"tunix_grpo": result},
    })  # fmt: skip


if __name__ == "__main__":
    main()
