"""A custom logit processor that returns the logits unchanged.

SGLang delivers a request's sampling_params.custom_params to the model (the per-request
behaviour parameters, see wire.py) only when the request carries a custom logit
processor and the engine runs with enable_custom_logit_processor; this one satisfies that and
changes nothing."""

from trb_megatron.sglang_plugin.version import require_sglang

require_sglang()  # a clear message (and the version pin) before any sglang import

from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor


class PassThrough(CustomLogitProcessor):
    def __call__(self, logits, custom_param_list=None):
        return logits
