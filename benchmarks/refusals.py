"""Run bad inputs and faults against the scripts, as a hostile user would, and print a markdown table:
each case, its exit code, whether a raw traceback was printed, and the message.

    python benchmarks/refusals.py            # about 4 minutes on 2 CPU cores (each case is a fresh process)

Expected: every case exits non-zero (2 for flags, 1 for the rest) with one `error:` line and no traceback.
"""
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    tmp = tempfile.mkdtemp(prefix="nanorlhf-refusals-")
    world = os.environ.get("NANORLHF_WORLD") or os.path.join(tmp, "world")
    env = dict({k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, NANORLHF_WORLD=world,
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join([ROOT, tmp]),
               HOME=tmp)  # (no wandb key or login: its refusal, or "cannot reach" without a network)
    subprocess.run([sys.executable, "-m", "nanorlhf.world"], env=env, capture_output=True, check=True)
    w = lambda *p: os.path.join(world, *p)  # noqa: E731
    t = lambda *p: os.path.join(tmp, *p)  # noqa: E731
    with open(t("latin1.jsonl"), "wb") as f:
        f.write('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with gzip.open(t("cut.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(2000))
    with open(t("cut.jsonl.gz"), "rb") as f:
        data = f.read()
    with open(t("cut.jsonl.gz"), "wb") as f:
        f.write(data[:len(data) // 2])
    with open(t("notjson.jsonl"), "w") as f:
        f.write('{"prompt": "a"}\n{"prompt": \n')
    with open(t("nochosen.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with open(t("empty.jsonl"), "w"):
        pass
    with open(t("afile"), "w") as f:
        f.write("x")
    os.makedirs(t("noconfig"), exist_ok=True)
    with open(t("rewards.py"), "w") as f:
        f.write("def scalar(p, c):\n    return 1.0\n"
                "def short(p, c):\n    return [0.0]\n"
                "def nan(p, c):\n    return [float('nan')] * len(c)\n"
                "def boom(p, c):\n    raise KeyError('mood')\n"
                "def pref(p, a, b):\n    return [2.0] * len(a)\n")
    with open(t("emptycontent.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": [{"role": "user", "content": " "}]}) + "\n")
    with open(t("mixed.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}],
                            "rejected": [{"role": "assistant", "content": "b"}]}) + "\n")
    shutil.copytree(w("policy"), t("policy-copy"))
    gold = ["--reward_fn", "nanorlhf.world:gold_reward"]
    cases = [
        ("train_reward.py", ["--learning_rate", "-1"]), ("train_reward.py", ["--max_grad_norm", "-1"]),
        ("train_reward.py", ["--logging_steps", "0"]), ("train_reward.py", ["--warmup_ratio", "2"]),
        ("train_reward.py", ["--num_train_epochs", "0"]), ("train_reward.py", ["--save_total_limit", "-1"]),
        ("train_reward.py", ["--fsdp"]), ("train_reward.py", ["--learning_rat", "1e-3"]),
        ("train_reward.py", ["--eval_fraction", "1"]), ("train_reward.py", ["--lr_scheduler_type", "cosin"]),
        ("train_rloo.py", ["--temperature", "0"]), ("train_rloo.py", ["--kl_coef", "nan"]),
        ("train_rloo.py", ["--cliprange", "0"]), ("train_rloo.py", ["--rloo_k", "1"]),
        ("train_rloo.py", ["--stop_token", "eot"]), ("train_xpo.py", ["--beta", "inf"]),
        ("train_xpo.py", ["--loss_type", "ipo", "--beta", "0"]), ("train_xpo.py", ["--second_sample", "policy"]),
        ("train_nash_md.py", ["--beta", "0.1:0.2:0.3"]), ("train_nash_md.py", ["--mixture_coef", "1.5"]),
        ("train_reward.py", ["--dataset_name", t("latin1.jsonl")]),
        ("train_reward.py", ["--dataset_name", t("cut.jsonl.gz")]),
        ("train_reward.py", ["--dataset_name", t("notjson.jsonl")]),
        ("train_reward.py", ["--dataset_name", t("nochosen.jsonl")]),
        ("train_reward.py", ["--dataset_name", t("empty.jsonl")]),
        ("train_reward.py", ["--dataset_name", "data/train.jsonl"]),
        ("train_reward.py", ["--dataset_name", "someone/no-such-dataset"]),
        ("train_reward.py", ["--model_name_or_path", t("noconfig")]),
        ("train_reward.py", ["--model_name_or_path", "someone/no-such-model"]),
        ("train_reward.py", ["--output_dir", t("afile")]),
        ("train_reward.py", ["--output_dir", "/proc/nanorlhf-refusals"]),
        ("train_reward.py", ["--resume", "--output_dir", t("never-ran")]),
        ("train_rloo.py", ["--model_name_or_path", w("policy"), "--dataset_name", w("preferences"), "--reward_model_path",
                           w("policy")]),
        ("train_rloo.py", ["--reward_fn", "rewards:scalar"]), ("train_rloo.py", ["--reward_fn", "rewards:short"]),
        ("train_rloo.py", ["--reward_fn", "rewards:nan"]), ("train_rloo.py", ["--reward_fn", "rewards:boom"]),
        ("train_rloo.py", ["--reward_fn", "nomodule:fn"]), ("train_nash_md.py", ["--preference_fn", "rewards:pref"]),
        ("train_xpo.py", ["--sft_model_path", t("noconfig")]),
        ("train_rloo.py", ["--dataset_name", t("latin1.jsonl"), *gold]),
        ("train_ppo.py", ["--gamma", "1.5"]), ("train_ppo.py", ["--vf_coef", "-0.1"]),
        ("train_ppo.py", ["--kl_estimator", "k2"]), ("train_ppo.py", ["--value_model_path", t("noconfig")]),
        ("train_ppo.py", ["--value_model_path", w("policy"), "--reward_model_path", w("policy")]),
        # the third round (issue 24)
        ("train_rloo.py", ["--model_name_or_path", t("policy-copy"), "--output_dir", t("policy-copy"),
                           "--overwrite_output_dir"]),
        ("train_rloo.py", ["--total_episodes", "-5"]), ("train_ppo.py", ["--total_episodes", "0",
                                                                         "--num_train_epochs", "0.0001"]),
        ("evaluate.py", ["--model_name_or_path", w("policy"), "--num_prompts", "-5"]),
        ("evaluate.py", ["--model_name_or_path", w("policy"), "--num_prompts", "0"]),
        ("train_rloo.py", ["--use_peft", "--lora_target_modules", "q_proj", "v_prj"]),
        ("train_rloo.py", ["--dataset_name", t("emptycontent.jsonl"), *gold]),
        ("train_reward.py", ["--dataset_name", t("mixed.jsonl")]),
        ("train_reward.py", ["--report_to", "wandb"]),
        # GRPO (issue 25)
        ("train_grpo.py", ["--num_generations", "1"]), ("train_grpo.py", ["--loss_type", "sapo"]),
        ("train_grpo.py", ["--reward_funcs", "rewards:short"]), ("train_grpo.py", ["--reward_funcs", "rewards.boom"]),
        ("train_grpo.py", ["--reward_funcs", "nomodule.fn"]), ("train_grpo.py", ["--reward_weights", "1", "2"]),
        ("train_grpo.py", ["--gradient_accumulation_steps", "2", "--steps_per_generation", "1"]),
        ("train_grpo.py", ["--model_name_or_path", w("policy"), "--dataset_name", w("prompts")]),
    ]
    fast = {"train_reward.py": ["--max_steps", "2", "--per_device_train_batch_size", "4"],
            "train_rloo.py": ["--total_episodes", "16", "--per_device_train_batch_size", "8", "--response_length", "8"],
            "train_xpo.py": ["--max_steps", "2", "--per_device_train_batch_size", "4"],
            "train_nash_md.py": ["--max_steps", "2", "--per_device_train_batch_size", "4"],
            "train_ppo.py": ["--total_episodes", "16", "--per_device_train_batch_size", "8", "--response_length", "8"],
            "train_grpo.py": ["--max_steps", "2", "--per_device_train_batch_size", "16",
                              "--max_completion_length", "8"],
            "evaluate.py": ["--max_new_tokens", "8"]}
    print("| script | flags | exit | traceback | message |\n|---|---|---|---|---|")
    tracebacks = 0
    for n, (script, flags) in enumerate(cases):
        out = [] if "--output_dir" in flags else ["--output_dir", t(f"out{n}")]
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), *fast[script], *out, *flags], env=env,
                           capture_output=True, text=True, timeout=600)
        traceback = "Traceback" in r.stderr
        tracebacks += traceback
        lines = [x for x in r.stderr.splitlines() if "error:" in x] or r.stderr.strip().splitlines()[-1:] or ["-"]
        shown = " ".join(str(f).replace(tmp, "$TMP") for f in flags)
        message = lines[0].replace(tmp, "$TMP").replace("|", "/")[:160]
        print(f"| {script} | `{shown}` | {r.returncode} | {'YES' if traceback else 'no'} | {message} |", flush=True)
    print(f"\n{len(cases)} cases, {tracebacks} raw tracebacks")


if __name__ == "__main__":
    main()
