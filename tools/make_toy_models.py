"""Build the embedded toy default: 4-digit addition data, a character-level tokenizer, a strong
Qwen3 teacher and a weak Qwen3 student, trained on CPU (a few minutes on 2 cores).

    .venv/bin/python tools/make_toy_models.py [--out-dir runs/toy_models] [--seed 0] [--force]

Writes OUT/data/{train,test,val}.jsonl, OUT/teacher/, OUT/student/ (Hugging Face checkpoints
with the same tokenizer) and OUT/manifest.json (arguments, sizes, measured held-out accuracies).
A second run with the same arguments reuses OUT; --force rebuilds it. The size options exist for
tests and experiments; the defaults are the toy default.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _parser():
    from trb_megatron.toy.build import ToyBuildSpec

    d = ToyBuildSpec()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out-dir", default="runs/toy_models", help="output directory")
    parser.add_argument("--seed", type=int, default=d.seed, help="seeds data, init and order")
    parser.add_argument("--force", action="store_true", help="rebuild even if OUT is cached")
    parser.add_argument("--threads", type=int, default=d.threads,
                        help="torch CPU threads; part of the build (results depend on it)")
    g = parser.add_argument_group("sizes (tests and experiments)")
    g.add_argument("--n-train", type=int, default=d.n_train)
    g.add_argument("--n-test", type=int, default=d.n_test)
    g.add_argument("--n-val", type=int, default=d.n_val)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--head-dim", type=int, default=d.teacher.head_dim,
                   help="head_dim of both models")
    g.add_argument("--kv-heads", type=int, default=d.teacher.num_kv_heads,
                   help="num_key_value_heads of both models")
    for who, size in (("teacher", d.teacher), ("student", d.student)):
        g.add_argument(f"--{who}-layers", type=int, default=size.layers)
        g.add_argument(f"--{who}-heads", type=int, default=size.num_heads,
                       help="attention heads (hidden = heads * head_dim)")
        g.add_argument(f"--{who}-intermediate", type=int, default=size.intermediate)
    g.add_argument("--teacher-steps", type=int, default=d.teacher_steps)
    g.add_argument("--teacher-eval-every", type=int, default=d.teacher_eval_every)
    g.add_argument("--student-max-steps", type=int, default=d.student_max_steps)
    g.add_argument("--student-eval-every", type=int, default=d.student_eval_every)
    g.add_argument("--student-target", type=float, default=d.student_target,
                   help="snapshot the student once its greedy validation accuracy reaches this")
    return parser


def _spec(args):
    from trb_megatron.toy.build import ToyBuildSpec
    from trb_megatron.toy.train import ModelSize

    def size(who):
        heads = getattr(args, f"{who}_heads")
        return ModelSize(layers=getattr(args, f"{who}_layers"), hidden=heads * args.head_dim,
                         num_heads=heads, intermediate=getattr(args, f"{who}_intermediate"),
                         num_kv_heads=args.kv_heads, head_dim=args.head_dim)

    return ToyBuildSpec(seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                        n_val=args.n_val, teacher=size("teacher"), student=size("student"),
                        batch_size=args.batch_size, teacher_steps=args.teacher_steps,
                        teacher_eval_every=args.teacher_eval_every,
                        student_max_steps=args.student_max_steps,
                        student_eval_every=args.student_eval_every,
                        student_target=args.student_target, threads=args.threads)


def main(argv=None):
    args = _parser().parse_args(argv)
    from trb_megatron.toy.build import build_pinned

    try:
        manifest = build_pinned(args.out_dir, _spec(args), force=args.force)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    for who in ("teacher", "student"):
        m = manifest[who]
        print(f"{who}: {m['size']['parameters']} parameters, held-out greedy "
              f"{m['test_greedy_accuracy']:.1%}, sampled {m['test_sampled_accuracy']:.1%}")
    return manifest


if __name__ == "__main__":
    main()
