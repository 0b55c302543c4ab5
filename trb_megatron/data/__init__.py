"""Prompt datasets (local .jsonl/.json/.parquet files or `datasets` names), rendered with the
student's chat template or as raw text, tokenized, with over-long prompts dropped and counted."""

from .prompts import (PAPER_SYSTEM_PROMPT, DataConfig, PromptSet, load_prompts, load_tokenizer,
                      names_local_path, tokenizer_path)

__all__ = ["PAPER_SYSTEM_PROMPT", "DataConfig", "PromptSet", "load_prompts", "load_tokenizer",
           "names_local_path", "tokenizer_path"]
