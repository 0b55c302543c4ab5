"""pass@1 of a checkpoint on a prompt dataset:

    python -m trb_megatron.eval --checkpoint DIR --data FILE_OR_NAME [options]   (--help for all)

See trb_megatron/eval/command.py.
"""

from trb_megatron.eval.command import main

if __name__ == "__main__":
    raise SystemExit(main())
