"""nanorlhf: losses, sampling, log-probabilities and plumbing shared by the train_*.py scripts.

One convention for rewards (data.encode, rewards.Scorer): a completion ends at its first EOS, inclusive,
and a reward model reads its score at that EOS, in reward training and in RL scoring alike, whether the
policy's ids are scored directly or the texts are re-encoded with the reward model's own tokenizer;
template text after the EOS (ChatML's "\n" after <|im_end|>) is never part of the sequence.
"""
from .config import (InputError, apply_defaults, check_flags, clean_errors, given_flags, parse_args, parse_schedule,
                     usage_error)
from .data import (MissingSplit, encode, epoch_order, held_out, keep_end, load_rows, pad, preference_pairs, prompts_of,
                   render, tokenize_pairs, tokenize_prompts)
from .dist import (all_reduce_metrics, check_finite, checkpoints, full_state_dict, global_mean_var, global_whiten,
                   init_distributed, is_main, load_checkpoint, load_hf, load_tokenizer, print0, rng_state,
                   save_checkpoint, set_rng_state, shard, shutdown, transformer_blocks)
from .losses import (bradley_terry_loss, dpo_loss, gae_advantages, grpo_advantages, grpo_loss, nanstd, nash_md_loss,
                     ppo_clip_loss, rloo_advantages, value_loss, xpo_loss)
from .models import AdapterOff, add_lora, disable_dropout, policy_and_reference, save_adapter, save_hf, save_policy
from .ops import (completion_logprobs, contains_eos, entropy_from_logits, kl_estimators, masked_mean,
                  position_ids_from_mask, prompt_forward, selective_log_softmax,
                  truncate_at_eos)
from .rewards import (Scorer, call_reward_fn, call_reward_funcs, head_logits, last_token_index, load_function,
                      max_positions, reward_model_scores, rm_sequences, score_completions, token_values, mean_interval,
                      win_outcomes, win_rate_interval)
from .runs import (append_jsonl, check_output_dir, finish_run, load_training_state, preempted, require_steps,
                   save_training_state, start_run)
from .sampling import Rollouts, generate, generate_mixture, rollout_seeds
from .trackers import Tracker

__version__ = "0.1.0"
