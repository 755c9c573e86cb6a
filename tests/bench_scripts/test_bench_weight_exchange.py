"""bench/weight_exchange.py --no-engine: save + host restore per publisher, against the disk."""

from __future__ import annotations

import json


def test_engine_less_run_times_both_publishers_and_compares_with_the_disk(
    run_repo_script, repo_module, tmp_path
):
    proc = run_repo_script(
        "bench/weight_exchange.py", "--no-engine", "--sizes=tiny", "--reps=1",
        "--dtype", "bfloat16", "--dir", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (size,) = json.loads(proc.stdout)["sizes"]
    # The tiny shape's HF tensors in bf16: embedding + untied head + 2 layers, counted here.
    sizes = repo_module("bench/weight_exchange.py").SIZES
    hidden, layers, heads, kv, head_dim, inter, vocab = sizes["tiny"]
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter + 2 * hidden
    per_layer += 2 * head_dim  # q_norm, k_norm
    params = 2 * vocab * hidden + layers * per_layer + hidden
    assert size["param_bytes"] == 2 * params
    assert [r["publisher"] for r in size["steps"]] == [
        "warm-up", "publish_weights", "publish_weights_fsync"
    ]  # fmt: skip
    for medians in (size, size["baseline_fsync"]):
        total = medians["median_save_s"] + medians["median_restore_s"]
        assert medians["median_save_to_generating_s"] == total > 0
        bound = medians["disk_bound_s"]
        assert medians["ratio_to_disk_bound"] == total / bound
    disk = size["disk"]
    mb = size["param_bytes"] / 1e6
    assert size["disk_bound_s"] == mb / disk["write_MBps"] + mb / disk["read_MBps"]


def test_compare_ram_runs_both_folders_and_reports_the_ratio(repo_module, tmp_path, monkeypatch):
    bench = repo_module("bench/weight_exchange.py")
    seen = []

    def fake_bench_size(size, root, reps, baseline=False):
        on_ram = str(root).startswith(bench.RAM_ROOT)
        seen.append(("ram" if on_ram else "disk", root))
        return {"median_save_to_generating_s": 0.5 if on_ram else 1.5, "steps": [], "reps": reps}

    monkeypatch.setattr(bench, "bench_size", fake_bench_size)
    first = bench.compare_ram("tiny", tmp_path, 2)
    second = bench.compare_ram("small", tmp_path, 2)
    assert [w for w, _ in seen] == ["disk", "ram", "ram", "disk"]  # alternating order
    assert first["ram_vs_disk"] == {"disk_s": 1.5, "ram_s": 0.5, "speedup": 3.0,
                                    "order": ["disk", "ram"]}  # fmt: skip
    assert second["ram"]["median_save_to_generating_s"] == 0.5
    assert not any(r.exists() for w, r in seen if w == "ram")  # the RAM folder is freed
