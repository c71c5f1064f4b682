"""--bf16 (bf16 compute from float32 weights) on the CPU, where torch runs the same autocast and FSDP2 mixed-precision
code as on a GPU: the reference scores exactly as the initial policy (KL 0 before any update) and the old log-probs
are computed as the update computes them (ratio exactly 1 while the policy has not moved)."""
import pytest

from scripts import metrics, run

FAST = ["--per_device_train_batch_size", 8, "--total_episodes", 16, "--response_length", 8, "--num_eval_prompts", 8,
        "--num_sample_generations", 0, "--num_ppo_epochs", 2, "--learning_rate", 1e-4, "--warmup_ratio", 0.5]


def _first_step(out):
    # warmup_ratio 0.5 of 2 steps: ceil(1.0) = 1 warmup step, so step 1's rate is 0 and none of its updates moves
    # the policy: every ratio of step 1 must be exactly 1, and its KL (sampling policy vs reference) exactly 0
    recs = metrics(out)
    (step0,) = [r for r in recs if r["step"] == 0]
    first = [r for r in recs if r["step"] == 1 and "val/ratio" in r][0]
    assert first["lr"] == 0.0
    return step0, first


@pytest.mark.parametrize("script", ["train_rloo.py", "train_ppo.py"])
def test_bf16_reference_scores_as_the_policy_and_the_first_ratio_is_one(world_root, tmp_path, script):
    # before: the reference in bf16 weights gave k1 KL ~0.07 per 32 tokens at step 0, and old log-probs computed
    # in other chunks than the update's gave sequence ratios of 0.72-1.23 before any update (SmolLM2, CPU bf16)
    run(script, "--output_dir", tmp_path / "o", "--bf16", *FAST)
    step0, first = _first_step(tmp_path / "o")
    assert step0["eval/kl"] == 0.0 and first["objective/kl"] == 0.0
    assert first["val/ratio"] == 1.0 and first["val/ratio_var"] == 0.0 and first["policy/clipfrac_avg"] == 0.0


@pytest.mark.dist
def test_bf16_under_fsdp2_mixed_precision(world_root, tmp_path):
    # --fsdp --bf16: FSDP2's MixedPrecisionPolicy (bf16 parameters, float32 reductions) on policy and reference alike
    run("train_rloo.py", "--output_dir", tmp_path / "o", "--bf16", "--fsdp", *FAST, "--per_device_train_batch_size", 4,
        procs=2)
    step0, first = _first_step(tmp_path / "o")
    assert step0["eval/kl"] == 0.0 and first["objective/kl"] == 0.0 and first["val/ratio"] == 1.0
