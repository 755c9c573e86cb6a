"""bench/rollout.py: tokens are counted only when every row has exactly the asked length, the
greedy agreement measures common prefixes, and a run of two engines on one model reports
them side by side with their greedy tokens equal."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def rollout(repo_module):
    return repo_module("bench/rollout.py")


def test_generated_tokens_counts_full_rows_and_rejects_short_ones(rollout):
    assert rollout.generated_tokens([[1, 2, 3]] * 4, rows=4, new_tokens=3) == 12
    with pytest.raises(RuntimeError, match=r"expected 4 rows of 3 tokens"):
        rollout.generated_tokens([[1, 2, 3]] * 3 + [[1, 2]], rows=4, new_tokens=3)
    with pytest.raises(RuntimeError, match=r"returned 3 rows"):
        rollout.generated_tokens([[1, 2, 3]] * 3, rows=4, new_tokens=3)


def test_greedy_agreement_is_the_mean_common_prefix_fraction(rollout):
    assert rollout.greedy_agreement([[1, 2, 3, 4]], [[1, 2, 3, 4]]) == 1.0
    assert rollout.greedy_agreement([[1, 2, 3, 4]], [[9, 2, 3, 4]]) == 0.0
    assert rollout.greedy_agreement([[1, 2, 3, 4], [5, 6]], [[1, 2, 0, 4], [5, 6]]) == 0.75


def test_two_engines_side_by_side_on_the_same_model(run_repo_script, repo_module):
    proc = run_repo_script(
        "bench/rollout.py",
        "--shape", "tiny", "--engines", "jax,torch", "--prompts", "2", "--n", "3",
        "--prompt-len", "8", "--new-tokens", "5", "--repeats", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["engines"]) == {"jax", "torch"}
    for row in out["engines"].values():
        assert row["generated_tokens"] == 2 * 3 * 5
        assert row["tokens_per_s"] == pytest.approx(30 / row["median_s"])
    # the embedded sampler and transformers decode the same random model greedily alike
    assert out["greedy_agreement"] == {"jax_vs_torch": 1.0}
    ratio = out["engines"]["jax"]["tokens_per_s"] / out["engines"]["torch"]["tokens_per_s"]
    assert out["jax_over_torch"] == pytest.approx(ratio)
    assert out["params"] == 426752  # the tiny shape of bench/peers/workload.py
    assert out["measured"]["copy_bytes_per_s"] > 0 and out["measured"]["matmul_flops_per_s"] > 0
    bound_s = out["bound"]["decode_bound_s"] + out["bound"]["prefill_bound_s"]
    for row in out["engines"].values():
        assert row["prefill_s"] > 0
        assert row["fraction_of_bound"] == pytest.approx(bound_s / row["median_s"])
    summary = repo_module("bench/gpu_rows.py").other_lines([{"row": "rollout_tiny", **out}])
    assert summary[0].startswith("- rollout tiny float32, 6 rows × 5 new tokens (tokens/s): jax ")
    assert "jax_over_torch" in summary[0] and "jax_vs_torch 1.00" in summary[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--engines", "jax,sglang"], "--engines jax,sglang"),
        (["--new-tokens", "0"], "--new-tokens 0 must be >= 1"),
    ],
)
def test_bad_arguments_are_named(run_repo_script, args, message):
    proc = run_repo_script("bench/rollout.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_a_failing_engine_is_an_error_row_and_the_others_still_run(run_repo_script):
    proc = run_repo_script(
        "bench/rollout.py",
        "--shape", "tiny", "--engines", "jax,torch", "--prompts", "1", "--n", "1",
        "--prompt-len", "4100", "--new-tokens", "2", "--repeats", "1",
    )  # fmt: skip
    # the embedded sampler refuses prompts past the model's 4,096 positions; transformers
    # runs them (RoPE has no hard limit)
    assert proc.returncode == 1
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "4100" in out["engines"]["jax"]["error"] or "4096" in out["engines"]["jax"]["error"]
    assert out["engines"]["torch"]["generated_tokens"] == 2
    assert out["greedy_agreement"] == {} and "jax_over_torch" not in out
    assert "[rollout] jax failed" in proc.stderr


def test_decode_bytes_and_prefill_flops_match_a_hand_count(rollout):
    tiny = rollout.SHAPES["tiny"]  # H 128, 2 layers, 4 q / 2 kv heads of 32, F 256, V 512
    # weights read per step: all 426,752 parameters but the 512 x 128 embedding, fp32
    weights = (426_752 - 512 * 128) * 4
    # 5 new tokens: steps 1..4 read 8 + s cached tokens in each of 6 rows; K and V of one
    # token in 2 layers of 2 kv heads x 32 dims in fp32 = 1,024 bytes
    kv = 6 * ((8 + 1) + (8 + 2) + (8 + 3) + (8 + 4)) * 1024
    kw = dict(lengths=[5] * 6, prompt_len=8, itemsize=4, kv_itemsize=4)
    assert rollout.decode_bytes(tiny, **kw) == 4 * weights + kv == 6_037_504
    # bf16 KV halves only the cache term
    assert rollout.decode_bytes(tiny, **{**kw, "kv_itemsize": 2}) == 4 * weights + kv // 2
    # varied lengths (stop ids): 4 steps for the longest row; a 2-token row reads 8 + 1 once
    varied = {**kw, "lengths": [5, 2, 1]}
    assert rollout.decode_bytes(tiny, **varied) == 4 * weights + (42 + 9) * 1024
    per_layer = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 256 + 2 * 32 + 2 * 128
    layers = 2 * (2 * per_layer) * (2 * 8)  # 2 FLOPs x 2 layers x 2 prompts of 8 tokens
    attention = 2 * 2 * 2 * 8 * 8 * 128  # 2 layers x 2 prompts x (2 P^2 N D) causal halves
    head = 2 * 2 * 512 * 128  # the last column of each prompt
    expected = layers + attention + head
    assert rollout.prefill_flops(tiny, prompts=2, prompt_len=8) == expected == 9_785_344


def test_stop_every_makes_every_kth_id_a_stop_and_counts_ragged_rows(rollout):
    a = rollout.parse_args(["--shape", "tiny", "--stop-every", "100"])
    assert rollout.stop_ids(a) == (99, 199, 299, 399, 499)  # the tiny vocab is 512
    assert rollout.stop_ids(rollout.parse_args([])) == ()
    assert rollout.generated_tokens([[1, 2], [3]], rows=2, new_tokens=3, exact=False) == 3
    with pytest.raises(RuntimeError, match="expected 2 rows of 1 to 3 tokens"):
        rollout.generated_tokens([[1, 2, 3, 4], [3]], rows=2, new_tokens=3, exact=False)


def test_hardware_bound_divides_by_the_measured_rates(rollout):
    a = rollout.parse_args(["--prompts", "2", "--n", "3", "--prompt-len", "8", "--new-tokens", "5"])
    bound = rollout.hardware_bound(
        rollout.SHAPES["tiny"], a, copy_bytes_per_s=1e9, matmul_flops_per_s=1e10
    )
    assert bound["decode_bound_s"] == pytest.approx(6_037_504 / 1e9)
    assert bound["prefill_bound_s"] == pytest.approx(9_785_344 / 1e10)
    assert bound["kv_bytes_per_row"] == (8 + 5) * 1024
    row = {"median_s": 0.5, "prefill_s": 0.1}
    fractions = rollout.bound_fractions(row, bound)
    assert fractions["decode_fraction_of_bound"] == pytest.approx(6_037_504 / 1e9 / 0.4)
    assert fractions["prefill_fraction_of_bound"] == pytest.approx(9_785_344 / 1e10 / 0.1)
