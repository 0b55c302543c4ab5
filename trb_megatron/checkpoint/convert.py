"""Hugging Face safetensors <-> Megatron distributed checkpoints, and a logits check between them.

A converted Megatron directory holds:
    trb_checkpoint.json   format version, parameter dtype, source
    model/                the Megatron distributed checkpoint (loads at any TP/PP layout)
    hf/                   the source config.json, generation_config.json and tokenizer files
Conversions build the model once at TP=1/PP=1 (the only full copy in memory), stream tensors one
at a time, write into a staging directory next to the output and rename it into place only when
complete: a failure leaves no partial output behind.
"""

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from trb_megatron.checkpoint.hf_names import ignorable_hf_name, param_specs, resolve_name
from trb_megatron.checkpoint.safetensors_io import HFWeights, ShardedWriter
from trb_megatron.checkpoint.writer import save_distributed
from trb_megatron.models.arch import ModelArch
from trb_megatron.models.builder import build_model
from trb_megatron.parallel import detect_profile, initialize_parallel

FORMAT_VERSION = 1
META = "trb_checkpoint.json"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
              "tokenizer.model", "chat_template.jinja")


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def parallel_layout(tensor_parallel=1, pipeline_parallel=1, seed=0):
    """Megatron's parallel state at the given layout for the duration of the block."""
    from megatron.core import parallel_state

    groups = initialize_parallel(detect_profile(), tensor_parallel_size=tensor_parallel,
                                 pipeline_parallel_size=pipeline_parallel, seed=seed)
    try:
        yield groups
    finally:
        parallel_state.destroy_model_parallel()


def check_output_dir(out_dir, overwrite: bool) -> None:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_output(out_dir, overwrite: bool):
    """Yield a staging directory that becomes `out_dir` only if the block succeeds (collective)."""
    out = Path(out_dir)
    stage = out.with_name(out.name + ".partial")
    check_output_dir(out, overwrite)
    if _rank0():
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    _barrier()
    try:
        yield stage
        _barrier()
    except BaseException:
        if _rank0():
            shutil.rmtree(stage, ignore_errors=True)
        raise
    if _rank0():
        old = out.with_name(out.name + ".old")
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def source_fingerprint(hf_dir) -> str:
    """Identity of a Hugging Face directory's contents (names, sizes and mtimes of its config
    and weight files), recorded at conversion so a cached conversion of a changed source is
    detected."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(hf_dir).glob("*")):
        if path.suffix in (".safetensors", ".json"):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _copy_side_files(src: Path, dst: Path):
    dst.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_meta(megatron_dir) -> dict:
    path = Path(megatron_dir) / META
    if not path.is_file():
        raise ValueError(f"{megatron_dir} is not a trb_megatron checkpoint ({META} missing)")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} is not "
                         f"{FORMAT_VERSION}")
    return meta


def _check_hf_tensors(weights: HFWeights, arch: ModelArch, specs):
    wanted = {name for spec in specs for name in spec.hf}
    missing = sorted(wanted - weights.names())
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing from {weights.dir}: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for spec in specs:
        for name, shape in zip(spec.hf, spec.hf_shapes):
            if weights.shape(name) != shape:
                raise ValueError(f"tensor {name!r} in {weights.dir} has shape "
                                 f"{weights.shape(name)}, its config.json implies {shape}")
    unexpected = sorted(n for n in weights.names() - wanted if not ignorable_hf_name(n, arch))
    if unexpected:
        raise ValueError(f"{weights.dir} holds tensors this {arch.family} config does not "
                         f"explain: {', '.join(unexpected[:5])} (config/weights mismatch?)")


def inspect_hf(hf_dir):
    """(arch, weights, specs) of a Hugging Face directory, every tensor name and shape checked
    against its config (reads only the safetensors headers)."""
    arch = ModelArch.from_hf_dir(hf_dir)
    weights = HFWeights(hf_dir)
    specs = param_specs(arch)
    _check_hf_tensors(weights, arch, specs)
    return arch, weights, specs


def hf_to_megatron(hf_dir, out_dir, *, overwrite=False, progress=True):
    """Convert a Hugging Face model directory into a Megatron distributed checkpoint."""
    hf_dir = Path(hf_dir)
    arch, weights, specs = inspect_hf(hf_dir)
    dtype = weights.dtype(specs[0].hf[0])
    with staged_output(out_dir, overwrite) as stage, parallel_layout() as groups:
        model = build_model(arch, detect_profile(), groups, trainable=True, params_dtype=dtype)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for spec in tqdm(specs, desc="hf -> megatron", disable=not (progress and _rank0())):
                value = spec.to_megatron(*(weights.get(name) for name in spec.hf))
                param = params[resolve_name(spec.megatron, params)]
                if value.shape != param.shape:
                    raise ValueError(f"tensor(s) {', '.join(spec.hf)} give shape "
                                     f"{tuple(value.shape)} for {spec.megatron}, the config "
                                     f"implies {tuple(param.shape)}")
                param.copy_(value)
        if _rank0():
            (stage / "model").mkdir()
        _barrier()
        save_distributed(model.sharded_state_dict(), str(stage / "model"))
        if _rank0():
            _copy_side_files(hf_dir, stage / "hf")
            meta = {"format_version": FORMAT_VERSION, "params_dtype": _dtype_name(dtype),
                    "source": str(hf_dir.resolve()),
                    "source_fingerprint": source_fingerprint(hf_dir)}
            (stage / META).write_text(json.dumps(meta, indent=2))


def load_megatron(megatron_dir, groups, *, params_dtype=None, trainable=False, profile=None):
    """Build the model of a converted checkpoint for this rank's TP/PP stage and load it.
    profile: the backend profile to build with (default: this machine's, FP8 off)."""
    from megatron.core import dist_checkpointing

    megatron_dir = Path(megatron_dir)
    meta = read_meta(megatron_dir)
    arch = ModelArch.from_hf_dir(megatron_dir / "hf")
    dtype = params_dtype or getattr(torch, meta["params_dtype"])
    model = build_model(arch, profile or detect_profile(), groups, trainable=trainable,
                        params_dtype=dtype)
    sharded = model.sharded_state_dict()
    loaded = dist_checkpointing.load(sharded, str(megatron_dir / "model"))
    # a training checkpoint also holds optimizer and trainer state: keep the model's entries
    model.load_state_dict({key: loaded[key] for key in sharded})
    return arch, model


def megatron_to_hf(megatron_dir, out_dir, *, overwrite=False, progress=True,
                   max_shard_bytes=5 << 30):
    """Write a converted (or trained) Megatron checkpoint back as Hugging Face safetensors."""
    megatron_dir = Path(megatron_dir)
    with staged_output(out_dir, overwrite) as stage, parallel_layout() as groups:
        arch, model = load_megatron(megatron_dir, groups)
        params = dict(model.named_parameters())
        if _rank0():
            writer = ShardedWriter(stage, max_shard_bytes)
            for spec in tqdm(param_specs(arch), desc="megatron -> hf", disable=not progress):
                parts = spec.to_hf(params[resolve_name(spec.megatron, params)].detach())
                for name, tensor in zip(spec.hf, parts):
                    writer.add(name, tensor.clone())
            writer.finish()
            _copy_side_files(megatron_dir / "hf", stage)
            if not (stage / "generation_config.json").exists():
                generation = {"eos_token_id": list(arch.eos_token_ids)}
                (stage / "generation_config.json").write_text(json.dumps(generation, indent=2))
