"""The TRB composite model for SGLang (student + teacher in one model class, blending inside the
forward) and its plugin registration.

Importing this package never imports sglang: `version`, `weights` and `wire` are pure; `model`
imports sglang when it is imported, which only SGLang's scheduler processes do (through the
`sglang.srt.plugins` entry point `trb_megatron.sglang_plugin.model:register`, declared in
setup.py). Pinned to sglang 0.5.23 (`version.require_sglang`).
"""
