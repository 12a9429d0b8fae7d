"""
One MOPD step, sample + teacher score + update, of ours (train_mopd.mopd_step) against TRL's
DistillationTrainer (issue #5), on the same tiny student and teacher, batch and lengths,
measured in one run. Target (issue 15): ours >= 4x TRL's completion tokens/s.

TRL 1.16 has `trl.DistillationTrainer` (trl/trainer/distillation_trainer.py): always
on-policy (the student generates every batch, one completion per prompt), its loss the
generalised JSD over the full vocabulary from chunked hidden states x lm_head; beta=1 is the
reverse KL(student || teacher), the MOPD direction. So no stand-in (GKD, GOLD) is needed.

Setup (shared with bench_rl.py, see there): the 4.98M-param random Qwen3 as the student, a
second random Qwen3 of the same shape (another seed) as the teacher, the character tokenizer
saved beside both, 16 prompts x 1 completion, prompts of 32 tokens, exactly 64 new tokens
(TRL: min_new_tokens; ours: no EOS id), temperature 1, AdamW lr 1e-4, grad clip 1, fp32, one
optimiser step per generation batch, TRL's gradient checkpointing off unless --trl_grad_ckpt.

Ours is the real training code, mopd_step itself, with a one-domain adapter (the domain's
reward is the cheap even-token-id fraction; mopd_step computes it for its metrics), in
three variants (--variants=LOSS:EXACT_KL_ROWS,...), each with its own model and optimiser:
- pg:8, the training default: loss=pg (the paper's): generate, the teacher's log-probs of
  the sampled tokens (Teachers.score), mopd.pg_update with mopd.mopd_advantage; and the
  exact full-vocab KL that mopd_step logs on exact_kl_rows=8 rows. That metric is half of
  this 16-row batch (an eighth of the toy preset's 64), so it is also timed without:
- pg:0, the same with exact_kl_rows=0.
- reverse_kl:0, loss=reverse_kl: TRL's objective at beta=1, the exact full-vocab reverse
  KL (mopd.distill_update, vocab_kernels.kl), without the (redundant) KL metric.
A TRL step, then one of each variant, alternate in one process (from a TrainerCallback); the
first step of each is a warm-up; the table reports the median of the timed steps.

    python bench/bench_mopd.py --threads=2                     # the full run (2 threads, as in README)
    OMP_NUM_THREADS=1 python bench/bench_mopd.py --threads=1   # when other jobs share the cores
    python bench/bench_mopd.py --skip_trl --steps=2            # ours only
The command line is every script's (config.py): --key=value or --key value, --threads=N
(torch's threads; 0, the default, leaves torch's own), --help.
"""

import os
import statistics
import sys
import tempfile
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_rl import (BENCH_LIMITS, BenchConfig, IgnoreEOS, Ours, bench_domain, check_lengths,  # noqa: E402
                      instrumented, load_label, make_checkpoint, make_prompts, matmul_params, num_params,
                      print_results, require_trl, run_alternating, sampling_kernels_alone, trl_common_args,
                      _trl_version)
from config import cli, parse_config  # noqa: E402

LOSSES = ("pg", "reverse_kl")


@dataclass
class Config(BenchConfig):  # the options shared with bench_rl.py: bench_rl.BenchConfig
    prompts: int = 16              # prompts per step (one completion each)
    # ours
    variants: str = "pg:8,pg:0,reverse_kl:0"  # ours as LOSS:EXACT_KL_ROWS,... with LOSS in pg, reverse_kl
                                              # (8 rows: the training default)


LIMITS = {**BENCH_LIMITS, "required": "variants"}


def ours_mopd(student_dir, teacher_dir, args, prompts, loss, exact_kl_rows):
    """train_mopd.mopd_step on this benchmark's batch, with the adapter."""
    from teachers import Teachers, validate
    from train_mopd import Config as TrainConfig, mopd_step
    from train_utils import load_for_training
    cfg = TrainConfig(init=student_dir, out_dir=os.path.join(student_dir, "unused_out"), domains="bench",
                       teacher=f"bench={teacher_dir}", prompts_per_step=args.prompts, n=1,
                       max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, loss=loss, lr=1e-4, grad_clip=1.0,
                       exact_kl_rows=exact_kl_rows, seed=args.seed)
    tok, model, opt, _, _ = load_for_training(cfg)  # the training script's own loader and AdamW
    validate(tok, model, teacher_dir, "bench")  # what train_mopd.main checks before any step
    teachers = Teachers({"bench": teacher_dir}, device=cfg.device)
    model.config.eos_token_id = None  # with IgnoreEOS: no stop token, exactly max_new_tokens per row
    tok, domain = IgnoreEOS(tok), bench_domain(prompts)
    update = {"pg": "update (mopd.pg_update: student forward + backward)",
              "reverse_kl": "update (mopd.distill_update without its teacher forwards: student fwd + bwd, "
                            "full-vocab KL; + grad clip, AdamW step)"}[loss]
    metric = f"exact-KL metric on {exact_kl_rows} rows" if exact_kl_rows else "no exact-KL metric"
    return Ours(f"ours (train_mopd.mopd_step, loss={loss}, {metric})",
                lambda i: mopd_step(model, opt, tok, [domain], [1.0], teachers, cfg, i), args.warmup,
                [("sample", "sampling (rollout.generate, KV cache)"),
                 ("reward", "reward for the metrics (decoded text)"),
                 ("teacher", "teacher scoring (Teachers.score: prefill, log-probs of the sampled tokens)"),
                 ("update", update)]
                + ([("exact_kl", f"metrics: exact full-vocab KL on {exact_kl_rows} rows")] if exact_kl_rows else []),
                row_update=loss != "pg")


def main(argv=None):
    args = parse_config(Config, argv, limits=LIMITS)
    try:
        variants = [(v.split(":")[0], int(v.split(":")[1])) for v in args.variants.split(",") if v]
        assert all(loss in LOSSES and rows >= 0 for loss, rows in variants) and variants
    except (IndexError, ValueError, AssertionError):
        raise SystemExit(f"--variants={args.variants}: expected LOSS:ROWS,... with LOSS in {','.join(LOSSES)}")
    require_trl(args)
    tokens_per_step = args.prompts * args.new_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); {load_label()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        student_dir = make_checkpoint(os.path.join(tmp, "student"), args, args.seed)
        teacher_dir = make_checkpoint(os.path.join(tmp, "teacher"), args, args.seed + 1)
        prompts = make_prompts(256, args.prompt_len, args.vocab, args.seed)
        ours = [ours_mopd(student_dir, teacher_dir, args, prompts, loss, rows) for loss, rows in variants]

        def make_trainer(callback):
            from datasets import Dataset
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from trl import DistillationConfig, DistillationTrainer
            cfg = DistillationConfig(**trl_common_args(os.path.join(tmp, "trl_out"), args, args.prompts),
                                     beta=1.0, learning_rate=1e-4, use_vllm=False)
            load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)  # noqa: E731
            return DistillationTrainer(model=load(student_dir), teacher_model=load(teacher_dir), args=cfg,
                                       train_dataset=Dataset.from_dict({"prompt": prompts}),
                                       processing_class=AutoTokenizer.from_pretrained(student_dir),
                                       callbacks=[callback])

        import mopd
        import train_mopd
        with instrumented((mopd, "pg_update", "update"),
                          (train_mopd, "exact_reverse_kl", "exact_kl")):
            trl_times, trl_lens, flops, trl_gen = run_alternating(make_trainer, ours, args)
        check_lengths(ours, trl_lens, args.new_tokens)
        kernel_s = sampling_kernels_alone(student_dir, args, args.prompts, 1, statistics.median(f for f, _ in flops))
    P = matmul_params(args)
    seq = args.prompt_len + args.new_tokens - 1  # positions the training forward sees per row
    R = args.prompts
    work = [("sampling", 2 * P * R * (args.prompt_len + args.new_tokens)),
            ("teacher prefill", 2 * P * R * seq),
            ("student forward + backward", 6 * P * R * seq)]
    reads = [("sampling", 4 * P * args.new_tokens)]  # the prefill, then new_tokens - 1 decode steps
    trl_name = f"TRL {_trl_version()} DistillationTrainer (on-policy, beta=1)" if trl_times else ""
    ckpt = "on" if args.trl_grad_ckpt else "off"
    return print_results(
        f"MOPD step: ours vs TRL DistillationTrainer (on-policy, beta=1 = reverse KL) ({R} prompts x 1 "
        f"completion, prompt {args.prompt_len}, {args.new_tokens} new tokens, student and teacher "
        f"{num_params(args) / 1e6:.2f}M-param Qwen3, CPU fp32, {torch.get_num_threads()} threads)",
        trl_name, trl_times, trl_gen, ours, tokens_per_step, work, flops,
        [f"TRL: DistillationConfig(beta=1.0, per_device_train_batch_size={R}, gradient_accumulation_steps=1, "
         f"max_completion_length={args.new_tokens}, generation_kwargs={{min_new_tokens: {args.new_tokens}}}, "
         f"temperature=1, use_cpu, bf16=False, gradient_checkpointing={ckpt}, no vLLM); its loss is the exact "
         f"full-vocab reverse KL, the objective of our loss=reverse_kl row. "
         f"{len(ours[0].times)} timed steps each after {args.warmup} warm-up, alternating in one process; "
         f"{load_label()} at the end."], reads, [("sampling", kernel_s)])


if __name__ == "__main__":
    cli(main)
