"""The toy models' tokenizer: a real Hugging Face fast tokenizer (tokenizers WordLevel) with one
token per character and <pad>/<bos>/<eos>/<unk> specials.

`tokenizer(prompt)` prepends <bos> (the models are trained on <bos> prompt response <eos>);
`tokenizer(text, add_special_tokens=False)` gives the bare characters; decode concatenates the
characters without spaces.
"""

from trb_megatron.toy.task import BOS, CHARS, EOS, PAD, SPECIAL_TOKENS, UNK


def build_tokenizer():
    """A transformers PreTrainedTokenizerFast; ids: specials 0..3 (pad, bos, eos, unk), then
    the characters of the task. Save it with `.save_pretrained(dir)`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, padding_side="left",
                                   model_max_length=1024, clean_up_tokenization_spaces=False)


def special_ids(tokenizer) -> dict:
    """{"pad_token_id", "bos_token_id", "eos_token_id"} of the tokenizer."""
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}
