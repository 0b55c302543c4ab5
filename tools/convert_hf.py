"""Convert checkpoints between Hugging Face safetensors and Megatron distributed checkpoints.

    python tools/convert_hf.py hf-to-megatron --hf-dir HF --out-dir MEGATRON [--overwrite]
    python tools/convert_hf.py megatron-to-hf --megatron-dir MEGATRON --out-dir HF [--overwrite]
    python tools/convert_hf.py verify --hf-dir HF --megatron-dir MEGATRON [--tp 2 --pp 2]

Run directly, each command starts its own local processes (gloo on CPU; `verify` starts TP x PP
of them). Under torchrun/srun it uses the launch's processes instead. Supported: Qwen3, Qwen2 and
Llama 3.x. A converted Megatron checkpoint loads at any TP/PP layout.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trb_megatron.parallel.local_launch import spawn_local  # noqa: E402


def _hf_to_megatron(rank, world, args):
    from trb_megatron.checkpoint.convert import hf_to_megatron

    hf_to_megatron(args.hf_dir, args.out_dir, overwrite=args.overwrite)
    if rank == 0:
        print(f"wrote {args.out_dir}")


def _megatron_to_hf(rank, world, args):
    from trb_megatron.checkpoint.convert import megatron_to_hf

    megatron_to_hf(args.megatron_dir, args.out_dir, overwrite=args.overwrite,
                   max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    if rank == 0:
        print(f"wrote {args.out_dir}")


def _verify(rank, world, args):
    from trb_megatron.checkpoint.convert import parallel_layout
    from trb_megatron.checkpoint.verify import max_logit_difference

    with parallel_layout(args.tp, args.pp) as groups:
        diff = max_logit_difference(args.hf_dir, args.megatron_dir, groups, seq=args.seq)
    if rank == 0:
        verdict = "OK" if diff <= args.tol else "FAILED"
        print(f"max |logit difference| at TP={args.tp} PP={args.pp}: {diff:.3e} "
              f"(tolerance {args.tol:g}) {verdict}")
    if diff > args.tol:
        raise SystemExit(1)


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF safetensors -> Megatron distributed checkpoint")
    a.add_argument("--hf-dir", required=True, help="HF model directory (config.json, *.safetensors)")
    a.add_argument("--out-dir", required=True, help="output Megatron checkpoint directory")
    a.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    a.set_defaults(fn=_hf_to_megatron)
    b = sub.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF safetensors")
    b.add_argument("--megatron-dir", required=True, help="checkpoint written by hf-to-megatron "
                   "or by the trainer")
    b.add_argument("--out-dir", required=True, help="output HF model directory")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    b.set_defaults(fn=_megatron_to_hf)
    c = sub.add_parser("verify", help="compare logits of an HF model and its Megatron conversion")
    c.add_argument("--hf-dir", required=True)
    c.add_argument("--megatron-dir", required=True)
    c.add_argument("--tp", type=int, default=1, help="tensor parallel size for the Megatron side")
    c.add_argument("--pp", type=int, default=1, help="pipeline parallel size for the Megatron side")
    c.add_argument("--seq", type=int, default=16, help="tokens per sequence of the random batch")
    c.add_argument("--tol", type=float, default=1e-4, help="max allowed |logit difference|")
    c.set_defaults(fn=_verify)
    return parser


def _preflight(args):
    """Cheap checks in the parent, so bad input gives one clear line instead of a traceback."""
    from trb_megatron.checkpoint.convert import check_output_dir, inspect_hf, read_meta

    if args.command in ("hf-to-megatron", "verify"):
        inspect_hf(args.hf_dir)
    if args.command in ("megatron-to-hf", "verify"):
        read_meta(args.megatron_dir)
    if args.command != "verify":
        check_output_dir(args.out_dir, args.overwrite)
    elif args.tp < 1 or args.pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got {args.tp} and {args.pp}")


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        _preflight(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:  # torchrun / srun
        import torch.distributed as dist

        from trb_megatron.parallel import detect_profile

        dist.init_process_group(detect_profile().distributed_backend)
        args.fn(dist.get_rank(), dist.get_world_size(), args)
        dist.destroy_process_group()
    else:
        world = args.tp * args.pp if args.command == "verify" else 1
        spawn_local(args.fn, world, args)


if __name__ == "__main__":
    main()
