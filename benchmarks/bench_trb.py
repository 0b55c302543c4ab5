"""Benchmark of the TRB method core: blend solver, communication and reverse-KL loss.

    bash scripts/bench.sh                                   # full size (a few minutes, 2 cores)
    .venv/bin/python benchmarks/bench_trb.py --rows 32 --vocab 8192 --repeats 1   # quick look

Every number comes from this run on this machine; ratios are against baselines measured in the
same run. Never part of the test suite.
1. solve_beta on [rows, vocab] peaked logits for eps in 0.001/0.01/0.05: time relative to one
   torch.logsumexp pass over the same (float32) logits, mean/max Newton evaluations per token;
   eager float64 (the default), fused float64 and fused float32 with tol=1e-5 (fused =
   torch.compile).
2. Bytes one rank receives per token under a 2-rank gloo group (counted on the real
   all-gather calls) for one solver evaluation and for the TrOPD objective (forward and
   backward, fkl outliers over the teacher's top-64), versus all-gathering both models' logits.
3. reverse_kl_loss("full", eager and fused) forward+backward versus megatron-core's
   vocab_parallel_cross_entropy
   on the same logits: time ratio, and peak-memory ratio (growth of the peak RSS, VmHWM, of a
   fresh process for each, reset after the inputs exist and one warm-up step; Linux).
Targets (issue 2): mean evaluations <= 5; solver <= 8x logsumexp; loss <= 2x CE time and
<= 1.5x CE peak memory.
"""

import argparse
import concurrent.futures as futures
import multiprocessing
import os
import socket
import time

import torch
import torch.distributed as dist

from trb_megatron.methods import reverse_kl_loss, solve_beta

EPS = (0.001, 0.01, 0.05)


def peaked_logits(rows, vocab, seed):
    """LLM-like student/teacher logits: a broad Gaussian floor, correlated models, and one
    dominant token per row that the two models often disagree on. Built in place so that
    creating them leaves no transient allocations behind."""
    g = torch.Generator().manual_seed(seed)
    s = torch.empty(rows, vocab).normal_(generator=g).mul_(2.5)
    t = torch.empty(rows, vocab).normal_(generator=g).mul_(1.5).add_(s, alpha=0.8)
    r = torch.arange(rows)
    s[r, torch.randint(0, vocab, (rows,), generator=g)] += 12.0
    t[r, torch.randint(0, vocab, (rows,), generator=g)] += 14.0
    return s, t


def best_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_solver(s, t, repeats):
    lse = best_time(lambda: torch.logsumexp(s, dim=1), repeats)
    print(f"\n## solve_beta, N={s.shape[0]} V={s.shape[1]}; one torch.logsumexp pass: "
          f"{lse * 1e3:.1f} ms")
    print(f"{'variant':<16}{'eps':>7}{'ms':>9}{'x lse':>8}{'mean it':>9}{'max it':>8}"
          f"{'beta mean':>11}{'teacher=1':>11}")
    for name, kw in (("eager float64", {}), ("fused float64", {"fused": True}),
                     ("fused float32", {"fused": True, "dtype": torch.float32, "tol": 1e-5})):
        for eps in EPS:
            sol = solve_beta(s, t, eps, **kw)
            took = best_time(lambda: solve_beta(s, t, eps, **kw), repeats)
            print(f"{name:<16}{eps:>7}{took * 1e3:>9.1f}{took / lse:>8.2f}"
                  f"{sol.token_iterations.double().mean():>9.2f}{sol.iterations:>8d}"
                  f"{sol.beta.mean():>11.3f}{sol.teacher_feasible.double().mean():>11.3f}")


def _counted(fn, calls):
    """fn() with every all-gather of the method functions recorded as (rows, bytes received)."""
    from trb_megatron.methods import vocab as vocab_module

    upstream = vocab_module._GATHER_INTO_TENSOR

    def counting(output, tensor, group=None, async_op=False):
        received = output.numel() * output.element_size() - tensor.numel() * tensor.element_size()
        calls.append((tensor.shape[0], received))
        return upstream(output, tensor, group=group, async_op=async_op)

    vocab_module._GATHER_INTO_TENSOR = counting
    try:
        return fn()
    finally:
        vocab_module._GATHER_INTO_TENSOR = upstream


def _comm_worker(rank, world, port, rows, vocab, queue):
    from trb_megatron.methods import SOURCE_TEACHER, TokenInputs, TrOPD

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    s, t = peaked_logits(rows, vocab, seed=1)
    width = vocab // world
    local = slice(rank * width, (rank + 1) * width)
    solve_calls, tropd_forward, tropd_backward = [], [], []
    sol = _counted(lambda: solve_beta(s[:, local].contiguous(), t[:, local].contiguous(), 0.01,
                                      group=dist.group.WORLD), solve_calls)
    g = torch.Generator().manual_seed(3)
    inputs = TokenInputs(tokens=torch.randint(0, vocab, (rows,), generator=g),
                         from_teacher=torch.arange(rows) % 8 == SOURCE_TEACHER,
                         uniforms=torch.rand(rows, generator=g, dtype=torch.float64))
    student = s[:, local].contiguous().requires_grad_(True)
    terms = _counted(lambda: TrOPD(outlier_topk=64).terms(student, t[:, local].contiguous(), inputs,
                                                        group=dist.group.WORLD, vocab=None),
                     tropd_forward)
    _counted(lambda: terms.loss.sum().backward(), tropd_backward)
    if rank == 0:
        queue.put((solve_calls, sol.token_iterations.double().mean().item(), tropd_forward,
                   tropd_backward))
    dist.destroy_process_group()


def bench_communication(rows, vocab):
    world = 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_comm_worker, args=(r, world, port, rows, vocab, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    calls, mean_it, tropd_forward, tropd_backward = queue.get(timeout=600)
    for p in procs:
        p.join()
    evals = [(n, b) for n, b in calls if n > 0]
    per_token = max(b / n for n, b in evals)
    total = sum(b for _, b in evals) / rows
    gather_vocab = 2 * (vocab - vocab // world) * 4  # both models' other shards, fp32
    print(f"\n## communication under a {world}-rank gloo group (N={rows}, V={vocab}, eps=0.01)")
    print(f"all_gather calls: {len(calls)}; largest per token per call: {per_token:.0f} B; "
          f"whole solve per token: {total:.0f} B (mean {mean_it:.2f} Newton evaluations)")
    print(f"all-gathering both models' vocabularies instead: {gather_vocab} B per token "
          f"({gather_vocab / per_token:.0f}x one evaluation, {gather_vocab / total:.0f}x the "
          "whole solve)")
    forward = sum(b for _, b in tropd_forward) / rows
    backward = sum(b for _, b in tropd_backward) / rows
    print(f"TrOPD objective (fkl outliers over the teacher's top-64): forward "
          f"{len(tropd_forward)} all-gathers, {forward:.0f} B per token received; backward "
          f"{len(tropd_backward)}, {backward:.0f} B; vs {gather_vocab} B to gather both "
          f"vocabularies ({gather_vocab / (forward + backward):.0f}x)")


def _loss_run(which, rows, vocab, measure_memory):
    """One forward+backward in this process; returns (seconds, peak RSS growth in bytes)."""
    torch.set_num_threads(int(os.environ.get("TRB_BENCH_THREADS", "2")))
    if which == "ce":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["TRB_BENCH_PORT"],
                          RANK="0", WORLD_SIZE="1")
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        from trb_megatron.parallel import detect_profile, initialize_parallel

        initialize_parallel(detect_profile(), tensor_parallel_size=1, pipeline_parallel_size=1,
                            seed=0)
    s, t = peaked_logits(rows, vocab, seed=2)
    s.requires_grad_(True)
    target = torch.zeros(rows, 1, dtype=torch.int64).random_(0, vocab)

    def step():
        if which == "ce":
            # megatron subtracts the max in place: a clone is part of the price of using it.
            loss = vocab_parallel_cross_entropy(s.clone().view(rows, 1, vocab), target).mean()
        else:
            loss = reverse_kl_loss(s, t, fused=which == "kl-fused")
        loss.backward()
        s.grad = None

    if not measure_memory:
        return best_time(step, 5), 0
    step()  # warm-up (torch.compile compiles here), then measure a steady-state step
    with open("/proc/self/clear_refs", "w") as f:  # reset this process's peak RSS to now
        f.write("5")
    before = _status_kib("VmHWM")
    start = time.perf_counter()
    step()
    took = time.perf_counter() - start
    return took, (_status_kib("VmHWM") - before) * 1024


def _status_kib(field):
    """A memory field of /proc/self/status in KiB (Linux; VmHWM is the peak RSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _fresh(which, rows, vocab, measure_memory):
    with futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_loss_run, which, rows, vocab, measure_memory).result()


def bench_loss(rows, vocab):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ["TRB_BENCH_PORT"] = str(sock.getsockname()[1])
    names = {"ce": "megatron vocab_parallel_cross_entropy", "kl": "reverse_kl_loss full",
             "kl-fused": "reverse_kl_loss full fused=True"}
    times = {k: _fresh(k, rows, vocab, False)[0] for k in names}
    # Memory processes get a fixed mmap threshold: glibc then returns every freed block of
    # >= 64 KiB to the OS at once, so the peak RSS counts live tensors, not allocator caching
    # (it slows small allocations down, hence separate processes for timing).
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    results = {k: (times[k], _fresh(k, rows, vocab, True)[1]) for k in names}
    del os.environ["MALLOC_MMAP_THRESHOLD_"]
    mib = 1 << 20
    ce_time, ce_mem = results["ce"]
    print(f"\n## loss forward+backward, N={rows} V={vocab} float32 "
          f"(one [N, V] fp32 tensor = {rows * vocab * 4 / mib:.0f} MiB)")
    print(f"{'':<40}{'ms':>9}{'peak MiB':>10}{'x CE time':>11}{'x CE mem':>10}")
    for key, name in names.items():
        took, mem = results[key]
        print(f"{name:<40}{took * 1e3:>9.1f}{mem / mib:>10.0f}{took / ce_time:>11.2f}"
              f"{mem / max(ce_mem, 1):>10.2f}")
    print("targets: time <= 2x CE, peak memory <= 1.5x CE")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256, help="tokens N")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary V (Qwen3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    s, t = peaked_logits(args.rows, args.vocab, seed=0)
    bench_solver(s, t, args.repeats)
    del s, t
    bench_communication(min(args.rows, 64), args.vocab)
    bench_loss(args.rows, args.vocab)


if __name__ == "__main__":
    main()
